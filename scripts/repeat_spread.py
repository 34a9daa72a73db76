"""The spread of a classifier's test figures over repeats of its training (one `predict` output per repeat).

    python scripts/repeat_spread.py --labels ../shared/data/cxr/metadata.csv --out docs/results/refit_repeat/spread.md \
        --run r0 TEST0.csv JSRT0.csv --run r1 TEST1.csv JSRT1.csv --run r2 TEST2.csv JSRT2.csv

For each repeat: macro-F1, accuracy, COVID-vs-rest AUC, top-label ECE (15 bins), mean top-class
probability − accuracy, Brier score, the median top-class probability, the within-adult COVID-vs-rest
AUC and how many adult non-COVID images are called COVID-19 (test part, age groups as `evaluate` reads
them), and how many external adult normals (e.g. held-out JSRT radiographs, every one normal) are
called normal; then the mean, standard deviation (n − 1) and range over the repeats. Every repeat must
score the same test images. Writes the markdown table and a .json beside it.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
from pathlib import Path

import numpy as np

from patchflannel._files import write_json, write_text
from patchflannel.calibrate import brier_score, expected_calibration_error
from patchflannel.errors import DataError
from patchflannel.stats import confound_report, load_evaluation, point_metrics

ROWS = (("macro_f1", "macro-F1", 3), ("accuracy", "accuracy", 3), ("covid_auc", "COVID-vs-rest AUC", 3),
        ("ece", "ECE (15 bins, top label)", 3), ("gap", "mean top-class probability − accuracy", 3),
        ("brier", "Brier score", 3), ("median_top", "median top-class probability", 2),
        ("adult_auc", "within-adult COVID-vs-rest AUC", 3), ("adult_called_covid", "adult non-COVID called COVID", 0),
        ("external_normal", "external adult normals called normal", 0))


def score(test_csv: Path, external_csv: Path, labels: Path) -> tuple[dict[str, float], dict[str, int], list[str]]:
    d, meta, _ = load_evaluation(test_csv, labels)
    pm = point_metrics(d)
    conf = d.probs.max(1)
    covid = d.pos
    neg = (d.y != covid) & (np.array(meta["age_group"]) == "adult")
    res = {"macro_f1": pm["macro_f1"], "accuracy": pm["accuracy"], "covid_auc": pm["covid_auc"],
           "ece": expected_calibration_error(d.probs, d.y),
           "gap": float(conf.mean() - (d.probs.argmax(1) == d.y).mean()),  # as the ECE: the top label
           "brier": brier_score(d.probs, d.y), "median_top": float(np.median(conf)),
           "adult_auc": confound_report(d, meta["age_group"], n_resamples=200)["within_adults"]["value"],
           "adult_called_covid": float(((d.pred == covid) & neg).sum())}
    with external_csv.open(encoding="utf-8") as f:
        ext = [r for r in csv.DictReader(f) if r.get("status", "ok") == "ok"]
    if not ext:
        raise DataError(f"{external_csv}: no predicted image (status ok)")
    res["external_normal"] = float(sum(r["label"] == "normal" for r in ext))
    counts = {"adult_non_covid": int(neg.sum()), "external": len(ext)}
    return res, counts, sorted(meta["image_id"]) + sorted("external:" + (r.get("file") or r["name"]) for r in ext)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--run", nargs=3, action="append", required=True, metavar=("NAME", "TEST_CSV", "EXTERNAL_CSV"))
    ap.add_argument("--out", type=Path, required=True, help="markdown file (a .json is written beside it)")
    args = ap.parse_args(argv)
    runs, counts, ids0 = {}, None, None
    if len({n for n, _, _ in args.run}) != len(args.run):
        print("every --run needs its own NAME", file=sys.stderr)
        return 2
    for name, test_csv, ext_csv in args.run:
        try:
            runs[name], c, ids = score(Path(test_csv), Path(ext_csv), args.labels)
        except (DataError, OSError, KeyError, ValueError) as e:
            print(f"{name}: cannot score ({e})", file=sys.stderr)
            return 2
        if ids0 is not None and (ids != ids0 or c != counts):
            print(f"{name}: scores other images than {args.run[0][0]} ({test_csv}, {ext_csv})", file=sys.stderr)
            return 2
        counts, ids0 = c, ids
    names = list(runs)
    head = "| | " + " | ".join(names) + " | mean ± std | range |"
    n_test = sum(not i.startswith("external:") for i in ids0)
    lines = [f"# Spread over {len(names)} repeats ({n_test} test images; {counts['adult_non_covid']} adult non-COVID; "
             f"{counts['external']} external adult normals)", "",
             "`python scripts/repeat_spread.py --labels " + str(args.labels) + " --out " + str(args.out) + " "
             + " ".join(f"--run {shlex.quote(n)} {t} {e}" for n, t, e in args.run) + "`", "", head,
             "|---|" + "---:|" * (len(names) + 2)]
    summary = {}
    for key, label, dig in ROWS:
        v = np.array([runs[n][key] for n in names])
        sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        summary[key] = {"values": dict(zip(names, v.tolist())), "mean": float(v.mean()), "std": sd,
                        "min": float(v.min()), "max": float(v.max())}
        f = (lambda x: f"{x:.{dig}f}") if dig else (lambda x: f"{x:.0f}")
        lines.append(f"| {label} | " + " | ".join(f(x) for x in v) + f" | {v.mean():.{max(dig, 1)}f} ± "
                     f"{sd:.{max(dig, 1)}f} | {f(v.min())} – {f(v.max())} |")
    write_text(args.out, "\n".join(lines) + "\n")
    write_json(args.out.with_suffix(".json"), {"runs": {n: {"test": t, "external": e} for n, t, e in args.run},
                                               "counts": counts, "n_test": n_test, "metrics": summary})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
