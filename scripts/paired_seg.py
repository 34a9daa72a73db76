"""Two segmenters on the same held-out images: the paired difference of a per-image metric, with a bootstrap CI.

    python scripts/paired_seg.py A/eval_jsrt_metrics.csv B/eval_jsrt_metrics.csv --convention scr --metric jaccard
    python scripts/paired_seg.py A/eval_v7_metrics.csv B/eval_v7_metrics.csv --convention scr --metric added \
        --metadata ../shared/data/v7/metadata.csv

Reads two `eval-seg` per-image CSVs (``image, convention, jaccard, dice, missed, added, …``), keeps the images
both scored in ``--convention``, and prints the mean of A − B with a 95 % percentile interval over resamples of
patients (``--metadata``: a CSV with ``image_id``/``patient_id`` columns, as V7's; without it each image is its own
patient, as in JSRT), and how many images are lower, equal or higher in A. ``--json`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from patchflannel._files import write_json
from patchflannel.stats import cluster_weights


def _read(path: Path, convention: str, metric: str) -> dict[str, float]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or metric not in rows[0] or "image" not in rows[0]:
        raise SystemExit(f"{path}: not an eval-seg metrics CSV with an {metric!r} column")
    return {r["image"]: float(r[metric]) for r in rows if r.get("convention") == convention and r[metric] != ""}


def _patients(metadata: Path | None, images: list[str]) -> np.ndarray:
    """Patient codes of ``images`` (eval-seg's ``image`` column holds the image ids exactly as the
    metadata's ``image_id``; V7 ids contain dots, ``1-s2.0-…``, so nothing is cut from them)."""
    if metadata is None:
        return np.arange(len(images))
    with metadata.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image_id", "patient_id"} <= set(rows[0]):
        raise SystemExit(f"{metadata}: needs image_id and patient_id columns")
    pid = {r["image_id"]: r["patient_id"] or r["image_id"] for r in rows}
    missing = [i for i in images if i not in pid]
    if missing:
        raise SystemExit(f"{metadata}: no patient for {len(missing)} image(s), e.g. {missing[0]!r}")
    _, codes = np.unique([pid[i] for i in images], return_inverse=True)
    return codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="eval-seg metrics CSV of segmenter A")
    ap.add_argument("b", type=Path, help="eval-seg metrics CSV of segmenter B (same images)")
    ap.add_argument("--convention", default="scr")
    ap.add_argument("--metric", default="jaccard", choices=("jaccard", "dice", "missed", "added"))
    ap.add_argument("--metadata", type=Path, help="CSV with image_id and patient_id: resample patients, not images")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    a, b = _read(args.a, args.convention, args.metric), _read(args.b, args.convention, args.metric)
    images = sorted(set(a) & set(b))
    if not images:
        raise SystemExit(f"no image scored in convention {args.convention!r} in both files")
    d = np.array([a[i] - b[i] for i in images])
    clusters = _patients(args.metadata, images)
    w = cluster_weights(clusters, args.resamples, np.random.default_rng(args.seed))  # (resamples, n) image weights
    boot = (w @ d) / w.sum(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    result = {"a": str(args.a), "b": str(args.b), "convention": args.convention, "metric": args.metric,
              "n_images": len(images), "n_patients": int(len(np.unique(clusters))),
              "mean_a": float(np.mean([a[i] for i in images])), "mean_b": float(np.mean([b[i] for i in images])),
              "mean_a_minus_b": float(d.mean()), "ci95": [float(lo), float(hi)], "resamples": args.resamples,
              "a_lower": int((d < 0).sum()), "equal": int((d == 0).sum()), "a_higher": int((d > 0).sum())}
    print(f"{args.metric} ({args.convention}), {len(images)} images / {result['n_patients']} patients: "
          f"A {result['mean_a']:.4f}, B {result['mean_b']:.4f}, A − B {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]; "
          f"A lower on {result['a_lower']}, higher on {result['a_higher']}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
