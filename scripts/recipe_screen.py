"""Compare training recipes on the folds they share: out-of-fold scores of `train-patch` runs.

    python scripts/recipe_screen.py --folds 0 1 2 --out docs/results/recipe_screen \
        baseline-global=runs/p965_global b16=runs/r_global_b16 ...

Each ``NAME=RUN_DIR`` is a `train-patch` run folder (every learner in it is read). Only the images
of each of ``--folds`` are scored (fold by fold), so runs that trained one fold alone (``split.run_folds=[0]``) compare
with full runs on equal terms: same split (checked by its fingerprint), same held-out images,
never the test part. Per run: macro-F1 with a patient-bootstrap 95 % CI, balanced accuracy,
within-adult COVID-vs-rest AUC with its patient-bootstrap 95 % CI, the share of adult non-COVID images called COVID-19, the best
epoch and the training time; and the paired macro-F1 and within-adult AUC differences to the first run.

Writes ``OUT/screen.csv``, ``OUT/screen.md`` and ``OUT/curves_foldF.png`` (validation macro-F1 by epoch).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from patchflannel._files import write_csv, write_text
from patchflannel.stats import EvalData, auc_with_ci, bootstrap_metrics, cluster_weights, paired_bootstrap, weighted_auc

RESAMPLES = 2000


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    if not len(pos) or not len(neg):
        return float("nan")
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def _paired_auc_delta(truth: np.ndarray, a: np.ndarray, b: np.ndarray, clusters: np.ndarray) -> str:
    """AUC(a) − AUC(b) on the same images, 95 % interval from the same patient resamples for both."""
    w = cluster_weights(clusters, RESAMPLES, np.random.default_rng(0))
    pos, neg = w * truth, w * (1 - truth)
    d = weighted_auc(pos, neg, a) - weighted_auc(pos, neg, b)
    point = float(weighted_auc(truth[None], (1 - truth)[None], a)[0] - weighted_auc(truth[None], (1 - truth)[None], b)[0])
    lo, hi = np.nanpercentile(d, [2.5, 97.5])
    return f"{point:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _load(run: Path, fold: int) -> list[dict]:
    out = []
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    for ldir in sorted(p for p in run.iterdir() if (p / "oof.npz").is_file()):
        o = np.load(ldir / "oof.npz", allow_pickle=False)
        sel = o["fold"] == fold
        if not sel.any():
            continue
        hist = ldir / f"fold{fold}" / "history.csv"
        rows = list(csv.DictReader(hist.open(encoding="utf-8"))) if hist.is_file() else []
        val = [float(r["val_macro_f1"]) for r in rows if r.get("val_macro_f1")]
        out.append({"learner": ldir.name, "fingerprint": split.get("fingerprint", ""), "ids": o["ids"][sel],
                    "y": o["y"][sel].astype(int), "soft": o["soft"][sel], "patients": o["groups"][sel].astype(str),
                    "ages": o["age_groups"][sel].astype(str), "classes": [str(c) for c in o["classes"]],
                    "curve": val, "best_epoch": int(np.argmax(val)) + 1 if val else 0, "epochs_run": len(val),
                    "seconds": sum(float(r.get("seconds") or 0) for r in rows)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR (the first is the reference)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0], help="folds to score, each on its own")
    ap.add_argument("--out", type=Path, default=Path("docs/results/recipe_screen"))
    args = ap.parse_args(argv)
    specs = []
    for spec in args.runs:
        name, _, path = spec.partition("=")
        if not (Path(path) / "split.json").is_file():
            print(f"{path}: not a train-patch run folder (no split.json)", file=sys.stderr)
            return 2
        specs.append((name, Path(path)))
    rows, md = [], []
    args.out.mkdir(parents=True, exist_ok=True)
    for fold in args.folds:
        entries, missing = [], []
        for name, run in specs:
            found = _load(run, fold)
            if not found:
                missing.append(f"`{name}`")
            entries += [{"name": name if len(found) == 1 else f"{name}:{e['learner']}", "run": str(run), **e}
                        for e in found]
        if not entries:
            continue
        ref = entries[0]
        for e in entries[1:]:
            if e["fingerprint"] != ref["fingerprint"] or list(e["ids"]) != list(ref["ids"]):
                print(f"{e['name']}: a different split or fold than {ref['name']}", file=sys.stderr)
                return 2
        fold_rows, head = _score(entries, fold)
        rows += fold_rows
        md += ["", head, "", "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
        md += ["| " + " | ".join(str(r[c]) for c in COLS) + " |" for r in fold_rows]
        if missing:
            md += ["", f"Not scored on fold {fold} (no out-of-fold votes for it): {', '.join(missing)}."]
        _curves(entries, args.out / f"curves_fold{fold}.png", fold)
    write_csv(args.out / "screen.csv", rows)
    write_text(args.out / "screen.md", "\n".join(md).strip() + "\n")
    print("\n".join(md))
    return 0


COLS = ["fold", "recipe", "macro_f1", "ci_low", "ci_high", "delta_vs_first", "delta_ci_low", "delta_ci_high",
        "balanced_accuracy", "adult_covid_auc", "adult_auc_ci", "adult_auc_delta_vs_first", "adult_non_covid_called_covid", "best_epoch", "epochs_run", "train_minutes"]


def _score(entries: list[dict], fold: int) -> tuple[list[dict], str]:
    ref = entries[0]
    covid = ref["classes"].index("covid")
    y = ref["y"]
    adult = ref["ages"] == "adult"
    anc = adult & (y != covid)

    def data(e: dict) -> EvalData:
        return EvalData(y=y, probs=e["soft"], classes=tuple(e["classes"]), clusters=ref["patients"])

    rows = []
    for e in entries:
        d, pred = data(e), e["soft"].argmax(1)
        ci = bootstrap_metrics(d, RESAMPLES, seed=0)["macro_f1"]
        delta = paired_bootstrap(d, data(ref), ["macro_f1"], RESAMPLES, seed=0)["macro_f1"]
        rows.append({"fold": fold, "recipe": e["name"], "learner": e["learner"], "n": len(y),
                     "macro_f1": round(ci["value"], 3), "ci_low": round(ci["ci_low"], 3), "ci_high": round(ci["ci_high"], 3),
                     "delta_vs_first": round(delta["diff"], 3),
                     "delta_ci_low": round(delta["ci_low"], 3), "delta_ci_high": round(delta["ci_high"], 3),
                     "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 3),
                     "adult_covid_auc": round(_auc(e["soft"][adult & (y == covid), covid], e["soft"][anc, covid]), 3),
                     "adult_auc_ci": "[{ci_low:.3f}, {ci_high:.3f}]".format(**auc_with_ci(
                         (y[adult] == covid).astype(float), e["soft"][adult, covid], ref["patients"][adult], RESAMPLES, 0)),
                     "adult_auc_delta_vs_first": _paired_auc_delta((y[adult] == covid).astype(float), e["soft"][adult, covid],
                                                                   ref["soft"][adult, covid], ref["patients"][adult]),
                     "adult_non_covid_called_covid": f"{int(np.sum(pred[anc] == covid))}/{int(anc.sum())}",
                     "best_epoch": e["best_epoch"], "epochs_run": e["epochs_run"],
                     "train_minutes": round(e["seconds"] / 60, 1), "run": e["run"]})
    head = (f"Fold {fold} out of fold ({len(y)} images, {len(np.unique(ref['patients']))} patient groups, "
            f"{int(adult.sum())} adult); 95 % CIs: {RESAMPLES} patient bootstrap resamples "
            f"(`patchflannel.stats`), deltas paired against `{ref['name']}`.")
    return rows, head


def _curves(entries: list[dict], path: Path, fold: int) -> None:
    from patchflannel.plots import new_figure, save_figure

    fig = new_figure(7, 4)
    ax = fig.subplots()
    for e in entries:
        if e["curve"]:
            ax.plot(range(1, len(e["curve"]) + 1), e["curve"], marker=".", label=e["name"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("inner-validation macro-F1")
    ax.set_title(f"Fold {fold}: validation macro-F1 per epoch (early stopping's signal)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
