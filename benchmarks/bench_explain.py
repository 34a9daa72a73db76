"""Cost of explanations: ``explain`` vs ``predict --exact`` (the path explanations run) on the same images and K, as a ratio in one run.

    python benchmarks/bench_explain.py [--images 4] [--k 100] [--repeats 2] [--threads 2]

Both paths start from images already read; each is timed as the median of ``--repeats`` passes
after one warm-up image. Writes ``benchmarks/results/explain_cpu_<versions>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

from patchflannel.explain import explain
from patchflannel.io import read_image
from patchflannel.pipeline import Classifier

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cxr")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="ensemble")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    meta = args.data / "metadata.csv"
    if not meta.is_file():
        print(f"bench_explain: no data at {args.data} (metadata.csv missing); nothing measured", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = list(csv.DictReader(meta.open(encoding="utf-8")))
    files = [args.data / rows[i * len(rows) // args.images]["file"] for i in range(args.images)]
    images = [read_image(f) for f in files]
    clf = Classifier.from_pretrained(args.weights)
    clf.predict(images[:1], k=args.k, batch_size=1, exact=True)
    explain(clf, images[:1], k=args.k, batch_size=1)

    def timed(fn) -> float:  # noqa: ANN001
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_pred = timed(lambda: clf.predict(images, k=args.k, batch_size=1, exact=True, workers=1))  # explain runs one at a time too
    t_expl = timed(lambda: explain(clf, images, k=args.k, batch_size=1))
    versions = f"torch{torch.__version__}"
    out = args.out or ROOT / "benchmarks" / "results" / f"explain_cpu_{versions}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    row = {"images": args.images, "k": args.k, "threads": args.threads, "repeats": args.repeats,
           "predict_s_per_image": round(t_pred / args.images, 3), "explain_s_per_image": round(t_expl / args.images, 3),
           "ratio_explain_over_predict": round(t_expl / t_pred, 3), "weights": args.weights}
    from patchflannel._files import write_csv

    write_csv(out, [row])
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
