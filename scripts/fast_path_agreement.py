"""Agreement of ``predict``'s fast path with the exact path, on every image of a labelled data folder.

Two steps, because the exact path costs ~2 s per image on 2 CPU cores:

``record``: for each image of ``<data>/metadata.csv``, run the exact path
(PyTorch models, all K crops: ``Classifier.predict(exact=True)``) and, on the
fast backend, every one of the same K crops, keeping each crop's learner votes
``q (K,N,M)``; one ``.npz`` per image in ``--out`` (resumable: done images are
skipped; each file is written atomically).

``replay``: the sequential vote of the fast path stops after the first n of
those K crops, at the point the :class:`~patchflannel.pipeline.StopRule`
decides (``Classifier.settled``, the code ``predict`` runs); its answer is the
combiner's on the mean of the first n votes. Replaying the rule on the recorded
votes gives, for any rule, the fast path's answer on every image without
running the networks again. Reports mean/median/p90 crops used, label agreement
with the exact path and mean |Δp| (calibrated probabilities; mean over classes,
and the mean of the per-image max), on the tuning images (every 5th row,
``row % 5 == 0``, where the rule's thresholds were chosen) and on the others.

    python scripts/fast_path_agreement.py record --out runs/agree/npz           # ~50 min for 965 images
    python scripts/fast_path_agreement.py replay --out runs/agree/npz --csv benchmarks/results/fast_path/agreement.csv

``compare``: a real ``patchflannel predict`` run over the same images (the
default fast path, as a user runs it) against the recorded exact answers:

    patchflannel predict ../shared/data/cxr/images --out runs/agree/fast965
    python scripts/fast_path_agreement.py compare --out runs/agree/npz --predictions runs/agree/fast965/predictions.csv

or against a real ``patchflannel predict --exact`` run instead of the records:

    patchflannel predict ../shared/data/cxr/images --exact --out runs/agree/exact965
    python scripts/fast_path_agreement.py compare --exact-predictions runs/agree/exact965/predictions.csv \
        --predictions runs/agree/fast965/predictions.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from patchflannel.io import read_image, resize, to_uint8
from patchflannel.pipeline import Classifier, StopRule, image_seed, prepare
from patchflannel.segment import WORK_SIZE

ROOT = Path(__file__).resolve().parents[1]


def rows_of(data: Path) -> list[dict[str, str]]:
    with open(data / "metadata.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def record(args: argparse.Namespace) -> None:
    clf = Classifier.from_pretrained(args.weights, backend=args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows_of(args.data)):
        f = out / f"{r['image_id']}.npz"
        if f.exists():
            continue
        t0 = time.perf_counter()
        try:
            im = read_image(args.data / r["file"])
        except Exception as exc:  # noqa: BLE001 - report and continue
            print(f"skip {r['image_id']}: {exc}", flush=True)
            continue
        prep = prepare([im], clf.segmenter)
        ex = clf.votes(prep, args.k, args.seed, stop=None, exact=True)[0]
        pe, _, _ = clf.combine(ex["P"][None])
        t1 = time.perf_counter()
        fa = clf.votes(prep, args.k, args.seed, stop=None, exact=False, keep_crops=True)[0]
        q = np.stack([fa["crops"][n] for n in clf.names], axis=1)  # (K,N,M) soft votes
        tmp = f.with_name(f".{f.stem}.tmp.npz")
        np.savez(tmp, P_exact=ex["P"].numpy(), probs_exact=pe[0], q=q, seed=image_seed(prep.work[0, 0].numpy(), args.seed),
                 t_exact=t1 - t0, t_fast=time.perf_counter() - t1)
        tmp.rename(f)
        print(i, r["image_id"], f"exact {t1 - t0:.2f} s", flush=True)


def replay_one(clf: Classifier, q: torch.Tensor, k: int, seed: int, stop: StopRule) -> int:
    """Crops the fast path uses on an image whose K per-crop votes are ``q``."""
    n = stop.next_chunk(0, k)
    while n < k and not clf.settled(q[:n], k, seed, stop):
        n += stop.next_chunk(n, k)
    return n


def replay(args: argparse.Namespace) -> None:
    if clf_distribution(args) != "soft":
        sys.exit("replay supports soft-vote classifiers only (the recorded votes are softmax means)")
    clf = Classifier.from_pretrained(args.weights)
    rows = rows_of(args.data)
    recs = []
    for i, r in enumerate(rows):
        f = Path(args.out) / f"{r['image_id']}.npz"
        if args.tune_only and i % 5:
            continue
        if f.exists():
            z = np.load(f)
            seed = int(z["seed"]) if "seed" in z else image_seed(
                to_uint8(resize(read_image(args.data / r["file"]), WORK_SIZE, "area")), args.seed)
            recs.append((i, r, torch.from_numpy(z["q"]).float(), z["probs_exact"], seed))
    if not recs:
        sys.exit(f"no recorded images in {args.out}; run `record` first")
    rules = [StopRule(chunk=c, min_k=m, flip=fl, tol=t) for c in args.chunk for m in args.min_k
             for fl in args.flip for t in args.tol]
    out_rows = []
    for rule in rules:
        res = {"tune": [], "test": []}
        for i, r, q, pe, seed in recs:
            n = replay_one(clf, q, args.k, seed, rule)
            p, _, _ = clf.combine(q[:n].mean(0, keepdim=True))
            d = np.abs(p[0] - pe)
            res["tune" if i % 5 == 0 else "test"].append((n, int(p[0].argmax() == pe.argmax()), d.mean(), d.max()))
        for part, vals in (*res.items(), ("all", res["tune"] + res["test"])):
            if not vals:
                continue
            a = np.array(vals, dtype=float)
            row = {"rule": f"chunk={rule.chunk} min_k={rule.min_k} flip={rule.flip} tol={rule.tol}", "part": part,
                   "images": len(a), "k_max": args.k, "mean_k": round(float(a[:, 0].mean()), 2),
                   "median_k": float(np.median(a[:, 0])), "p90_k": float(np.percentile(a[:, 0], 90)),
                   "label_agreement": round(float(a[:, 1].mean()), 4), "label_differs": int(len(a) - a[:, 1].sum()),
                   "mean_abs_dp": round(float(a[:, 2].mean()), 5), "mean_max_abs_dp": round(float(a[:, 3].mean()), 5),
                   "max_abs_dp": round(float(a[:, 3].max()), 4)}
            out_rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    _write(args.csv, out_rows)


def compare(args: argparse.Namespace) -> None:
    """A real ``patchflannel predict`` run (``--predictions``) against the exact answers: the recorded
    ones (``--out``) or those of a ``predict --exact`` run (``--exact-predictions``)."""
    if not args.predictions:
        sys.exit("compare needs --predictions PATH/predictions.csv of a predict run over the same images")
    by_file, classes = _predictions(args.predictions)
    exact_rows = _predictions(args.exact_predictions)[0] if args.exact_predictions else None
    res: dict[str, list[tuple[float, ...]]] = {"tune": [], "test": []}
    missing = failed = 0
    for i, r in enumerate(rows_of(args.data)):
        f = Path(args.out) / f"{r['image_id']}.npz"
        pr = by_file.get(Path(r["file"]).name)
        ex = exact_rows.get(Path(r["file"]).name) if exact_rows is not None else None
        if pr is None or (ex is None if exact_rows is not None else not f.exists()):
            missing += 1
            continue
        if pr["status"] != "ok" or (ex is not None and ex["status"] != "ok"):
            failed += 1
            continue
        pe = np.array([float(ex[f"p_{c}"]) for c in classes]) if ex is not None else np.load(f)["probs_exact"]
        p = np.array([float(pr[f"p_{c}"]) for c in classes])
        d = np.abs(p - pe)
        res["tune" if i % 5 == 0 else "test"].append((int(pr["k"]), int(p.argmax() == pe.argmax()), d.mean(), d.max()))
    out_rows = []
    for part, vals in (*res.items(), ("all", res["tune"] + res["test"])):
        a = np.array(vals, dtype=float)
        row = {"rule": "predict default (" + str(StopRule()) + ")", "part": part, "images": len(a), "k_max": args.k,
               "mean_k": round(float(a[:, 0].mean()), 2), "median_k": float(np.median(a[:, 0])),
               "p90_k": float(np.percentile(a[:, 0], 90)), "label_agreement": round(float(a[:, 1].mean()), 4),
               "label_differs": int(len(a) - a[:, 1].sum()), "mean_abs_dp": round(float(a[:, 2].mean()), 5),
               "mean_max_abs_dp": round(float(a[:, 3].mean()), 5), "max_abs_dp": round(float(a[:, 3].max()), 4)}
        out_rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"{missing} images without a recorded exact answer or a prediction row, {failed} not predicted (status ≠ ok)")
    _write(args.csv, out_rows)


def _predictions(path: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """A predictions.csv → (rows by file name, class names)."""
    by_file: dict[str, dict[str, str]] = {}
    classes: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            by_file[Path(r["file"]).name] = r
            classes = classes or [c[2:] for c in r if c.startswith("p_")]
    return by_file, classes


def _write(csv_path: str, out_rows: list[dict[str, object]]) -> None:
    if not csv_path:
        return
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(out_rows[0]))
        w.writeheader()
        w.writerows(out_rows)
    print(f"wrote {path}")


def clf_distribution(args: argparse.Namespace) -> str:
    import json

    from patchflannel.hub import resolve_weights

    return json.loads((resolve_weights(args.weights) / "config.json").read_text()).get("distribution", "soft")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["record", "replay", "compare"])
    ap.add_argument("--predictions", default="", help="compare: predictions.csv of a predict run over --data")
    ap.add_argument("--exact-predictions", default="", help="compare: predictions.csv of a predict --exact run "
                                                             "(instead of the records in --out)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cxr")
    ap.add_argument("--out", default="runs/agree/npz", help="folder of the recorded .npz files")
    ap.add_argument("--weights", default="ensemble")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, nargs="+", default=[StopRule.chunk])
    ap.add_argument("--min-k", type=int, nargs="+", default=[StopRule.min_k])
    ap.add_argument("--flip", type=float, nargs="+", default=[StopRule.flip])
    ap.add_argument("--tol", type=float, nargs="+", default=[StopRule.tol])
    ap.add_argument("--csv", default="")
    ap.add_argument("--tune-only", action="store_true", help="replay the tuning images (row %% 5 == 0) only")
    args = ap.parse_args()
    if not (args.data / "metadata.csv").is_file():
        sys.exit(f"{args.data}: no metadata.csv (pass --data the labelled CXR folder)")
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(2)
    {"record": record, "replay": replay, "compare": compare}[args.step](args)


if __name__ == "__main__":
    main()
