"""Fit the shipped classifier's temperature on images it never saw, and check it on others.

    python scripts/calibrate_shipped.py --predictions docs/results/eval335/predictions.csv \
        --labels ../shared/data/cxr/metadata.csv --out docs/results/calibration_shipped.json [--apply weights/ensemble]

The predictions are `predict` outputs of the uncalibrated classifier; since p = softmax(z), log p
equals z up to a per-image constant, so a temperature fitted on log p is the temperature of z.
Patients are split in two halves (seeded, grouped): the temperature is fitted on one half and
ECE/NLL/Brier are reported on the other, then (with --apply) the temperature fitted on all of them
is written into the classifier's config.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from patchflannel._files import write_json
from patchflannel.calibrate import brier_score, expected_calibration_error, fit_calibrator


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", type=Path, required=True)
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--apply", type=Path, default=None, help="classifier folder whose config.json gets the temperature")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    meta = {r["image_id"]: r for r in csv.DictReader(args.labels.open(encoding="utf-8"))}
    rows = [r for r in csv.DictReader(args.predictions.open(encoding="utf-8")) if r["status"] == "ok"]
    classes = [c[2:] for c in rows[0] if c.startswith("p_")]
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    y = np.array([classes.index(meta[r["name"]]["label"]) for r in rows])
    patients = np.array([meta[r["name"]]["patient_id"] for r in rows])
    z = np.log(np.clip(p, 1e-12, 1))
    rng = np.random.default_rng(args.seed)
    uniq = np.unique(patients)
    fit_set = set(rng.permutation(uniq)[: len(uniq) // 2].tolist())
    a = np.array([q in fit_set for q in patients])

    def scores(probs: np.ndarray, yy: np.ndarray) -> dict[str, float]:
        return {"ece": expected_calibration_error(probs, yy), "brier": brier_score(probs, yy),
                "nll": float(-np.mean(np.log(np.clip(probs[np.arange(len(yy)), yy], 1e-12, 1)))),
                "mean_confidence": float(probs.max(1).mean()), "accuracy": float((probs.argmax(1) == yy).mean())}

    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(v - v.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    half = fit_calibrator(z[a], y[a], "temperature")
    held = ~a
    report = {"predictions": str(args.predictions), "n": int(len(y)), "classes": classes,
              "fit_half": {"n": int(a.sum()), "patients": len(fit_set), "temperature": half.temperature},
              "held_out_half": {"n": int(held.sum()), "raw": scores(p[held], y[held]),
                                "calibrated": scores(softmax(z[held] / half.temperature), y[held])}}
    full = fit_calibrator(z, y, "temperature")
    report["temperature_all"] = full.temperature
    write_json(args.out, report)
    print(json.dumps(report, indent=1))
    if args.apply:
        cfg_path = args.apply / "config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["calibration"] = {"kind": "temperature", "temperature": full.temperature, "scale": [], "bias": []}
        cfg.setdefault("training", {})["calibration"] = (
            f"temperature fitted on {len(y)} images never seen in training (the 335 added after v0.1; "
            f"predict at K={rows[0]['k']}); held-out-half check in {args.out}")
        write_json(cfg_path, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
