"""Soft voting and each learner alone, from one `predict` run's per-image JSON files.

    python scripts/learner_rows.py runs/refit/pred_v05 --out runs/refit/pred_v05_rows

`predict` writes every learner's vote distribution into OUT/json/NAME.json (the mean over its member
models of the mean crop softmax). This writes, in predictions.csv format so that `evaluate` and
`scripts/compare_predictions.py` read them: ``OUT/soft_voting.csv`` (the unweighted mean of the
learners' distributions) and ``OUT/learner_<name>.csv`` (one learner alone) — the Table-3 rows for
the shipped classifier's own members on the same crops, without running any model again. Their
probabilities are the raw distributions (not calibrated: compare labels and AUCs, not ECE).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from patchflannel._files import write_csv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predict_dir", type=Path, help="a `predict --out` folder (predictions.csv, json/)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    table = args.predict_dir / "predictions.csv"
    if not table.is_file():
        print(f"{table}: not found (a `predict` output folder holds predictions.csv and json/)", file=sys.stderr)
        return 2
    rows = [r for r in csv.DictReader(table.open(encoding="utf-8")) if r["status"] == "ok"]
    classes = [c[2:] for c in rows[0] if c.startswith("p_")] if rows else []
    out: dict[str, list[dict]] = {}
    for r in rows:
        path = args.predict_dir / "json" / f"{r['name']}.json"
        try:
            learners = json.loads(path.read_text(encoding="utf-8"))["learners"]
            dists = {n: np.array([float(v["distribution"][c]) for c in classes]) for n, v in learners.items()}
        except (OSError, ValueError, KeyError) as e:
            print(f"{path}: cannot read the learners' distributions ({e})", file=sys.stderr)
            return 2
        sets = {"soft_voting": np.mean(list(dists.values()), axis=0),
                **{f"learner_{n.replace('/', '_')}": d for n, d in dists.items()}}
        for key, p in sets.items():
            out.setdefault(key, []).append({"file": r["file"], "name": r["name"], "status": "ok",
                                            "label": classes[int(np.argmax(p))], "confidence": f"{p.max():.6f}",
                                            **{f"p_{c}": f"{v:.6f}" for c, v in zip(classes, p)}})
    args.out.mkdir(parents=True, exist_ok=True)
    for key, rs in out.items():
        write_csv(args.out / f"{key}.csv", rs)
        print(f"{args.out / (key + '.csv')}: {len(rs)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
