"""Two `predict` outputs on the same images, compared pairwise (bootstrap over patients).

    python scripts/compare_predictions.py A/predictions.csv B/predictions.csv \
        --labels ../shared/data/cxr/metadata.csv --names refit v0.4 --out docs/results/refit_v05/paired.md

For each of macro-F1, accuracy, the COVID AUC and ECE (15 bins, top label): A, B and A − B with a
paired 95 % bootstrap interval over patients (both scored on the same resamples), and each set's
mean top-class probability against its accuracy (the calibration gap), with a paired interval for the
difference of the absolute gaps. Both files must predict the
same labelled images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from patchflannel._files import write_json, write_text
from patchflannel.calibrate import brier_score, ece_noise_floor, expected_calibration_error
from patchflannel.errors import DataError
from patchflannel.stats import EvalData, cluster_weights, load_evaluation, paired_bootstrap, point_metrics

METRICS = ("macro_f1", "accuracy", "covid_auc", "ece")
QUANTILES = ("min", "10%", "25%", "median", "75%", "90%", "max")
QUANTILE_VALUES = (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1)


def _aligned(csv_path: Path, labels: Path) -> tuple[EvalData, list[str]]:
    d, meta, _ = load_evaluation(csv_path, labels)
    ids = list(meta["image_id"])
    if "" in ids or len(set(ids)) != len(ids):
        raise DataError(f"{csv_path}: every scored image needs its own image_id in {labels} to be paired")
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    return EvalData(d.y[order], d.probs[order], d.classes, d.pred[order], d.clusters[order]), [ids[i] for i in order]


def compare(a_csv: Path, b_csv: Path, labels: Path, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired differences A − B (see the module docstring). Raises DataError unless both score the same images."""
    a, ids_a = _aligned(a_csv, labels)
    b, ids_b = _aligned(b_csv, labels)
    if ids_a != ids_b:
        only = sorted(set(ids_a) ^ set(ids_b))
        raise DataError(f"{a_csv} and {b_csv} do not score the same labelled images ({a.n} vs {b.n}; "
                        f"{len(only)} in one only, e.g. {only[:3]})")
    names = point_metrics(a)
    diffs = paired_bootstrap(a, b, [m for m in METRICS if m in names], resamples, seed)
    gaps = {}
    for name, d in (("a", a), ("b", b)):
        conf = d.probs.max(1)
        acc = float((d.pred == d.y).mean())
        ece = expected_calibration_error(d.probs, d.y)
        gaps[name] = {"mean_confidence": float(conf.mean()), "accuracy": acc, "gap": float(conf.mean() - acc),
                      "brier": brier_score(d.probs, d.y),
                      "top_probability_quantiles": dict(zip(QUANTILES, np.quantile(conf, QUANTILE_VALUES).tolist())),
                      # the ECE a perfectly calibrated model with these confidences shows on this many images
                      "ece_if_perfectly_calibrated": ece_noise_floor(d.probs, seed=seed, observed=ece)}
    # |confidence − accuracy| of A minus that of B, on the same patient resamples
    rng = np.random.default_rng(seed)
    w = cluster_weights(a.clusters, resamples, rng)

    def abs_gap(d: EvalData) -> np.ndarray:
        return np.abs(w @ (d.probs.max(1) - (d.pred == d.y)) / w.sum(1))
    dv = abs_gap(a) - abs_gap(b)
    point = abs(gaps["a"]["gap"]) - abs(gaps["b"]["gap"])
    gaps["abs_gap_diff"] = {"diff": point, "ci_low": float(np.quantile(dv, 0.025)), "ci_high": float(np.quantile(dv, 0.975)),
                            "n_resamples": resamples}
    return {"n": a.n, "patients": int(len(np.unique(a.clusters))), "metrics": diffs, "calibration": gaps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--names", nargs=2, default=["A", "B"])
    ap.add_argument("--out", type=Path, required=True, help="markdown file (a .json with the numbers is written beside it)")
    ap.add_argument("--resamples", type=int, default=2000)
    args = ap.parse_args(argv)
    try:
        res = compare(args.a, args.b, args.labels, args.resamples)
    except (DataError, ValueError) as e:
        print(f"cannot compare: {e}", file=sys.stderr)
        return 2
    na, nb = args.names
    lines = [f"# {na} vs {nb}: the same {res['n']} images ({res['patients']} clusters: patients, or images without "
             "patient_id), paired", "",
             f"`python scripts/compare_predictions.py {args.a} {args.b} --labels {args.labels} --names {na} {nb}`", "",
             f"| metric | {na} | {nb} | {na} − {nb} [95 % CI, paired over patients] | p (no difference) |",
             "|---|---:|---:|---|---:|"]
    for m, d in res["metrics"].items():
        lines.append(f"| {m} | {d['a']:.4f} | {d['b']:.4f} | {d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] "
                     f"| {d['p']:.3f} |")
    lines += ["", "| | mean top-class probability | accuracy | gap (confidence − accuracy) | Brier | ECE of a perfectly "
              "calibrated model with these confidences: median [95 % range]; share of draws ≥ the observed ECE | "
              "top-class probability: " + " / ".join(QUANTILES) + " |", "|---|---:|---:|---:|---:|---|---|"]
    for key, name in (("a", na), ("b", nb)):
        g = res["calibration"][key]
        fl = g["ece_if_perfectly_calibrated"]
        lines.append(f"| {name} | {g['mean_confidence']:.3f} | {g['accuracy']:.3f} | {g['gap']:+.3f} | {g['brier']:.3f} | "
                     f"{fl['median']:.3f} [{fl['low']:.3f}, {fl['high']:.3f}]; {fl['p_observed_or_more']:.3f} | "
                     + " / ".join(f"{v:.2f}" for v in g["top_probability_quantiles"].values()) + " |")
    gd = res["calibration"]["abs_gap_diff"]
    lines += ["", f"|gap| of {na} − |gap| of {nb}: {gd['diff']:+.3f} [{gd['ci_low']:+.3f}, {gd['ci_high']:+.3f}] "
              "(95 % CI, the same patient resamples for both)"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, "\n".join(lines) + "\n")
    write_json(args.out.with_suffix(".json"), {"a": str(args.a), "b": str(args.b), "names": [na, nb], **res})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
