"""Compare training recipes on the folds they share: out-of-fold scores of `train-patch` runs.

    python scripts/recipe_screen.py --folds 0 1 2 --out docs/results/recipe_screen \
        baseline-global=runs/p965_global b16=runs/r_global_b16 ...

Each ``NAME=RUN_DIR`` is a `train-patch` run folder (every learner in it is read). Only the images
of each of ``--folds`` are scored (fold by fold), so runs that trained one fold alone (``split.run_folds=[0]``) compare
with full runs on equal terms: same split (checked by its fingerprint), same held-out images,
never the test part. Per run: macro-F1 with a patient-bootstrap 95 % CI, balanced accuracy,
within-adult COVID-vs-rest AUC with its patient-bootstrap 95 % CI, the share of adult non-COVID images called COVID-19, the best
epoch, the training images (``n_train``, train-only sources included) and the training time; and the paired macro-F1 and within-adult AUC differences to the first run.
With ``--pooled`` the listed folds' images are also scored together (fold ``0+1+2``: with every fold listed,
each labelled non-test image once, out of fold; training-only sources such as JSRT never are), for the runs
that have all of them. Pooled scores mix the fold models' outputs (each image scored by the one that did not
see it), whose scales differ somewhat, so a pooled AUC need not match the per-fold ones.

Writes ``OUT/screen.csv``, ``OUT/screen.md`` and ``OUT/curves_foldF.png`` (validation macro-F1 by epoch).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score

from patchflannel._files import write_csv, write_text
from patchflannel.stats import EvalData, auc_with_ci, bootstrap_metrics, paired_bootstrap

RESAMPLES = 2000


def _n_train(config: Path) -> int | str:
    """Training images of a fold's best model (train-only sources such as JSRT included), "?" if unknown."""
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["training"]["n_train"])
    except (OSError, KeyError, TypeError, ValueError):
        return "?"


def _load(run: Path, folds: list[int]) -> list[dict]:
    """Each learner of ``run`` with out-of-fold votes on every one of ``folds`` (their images together)."""
    out = []
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    for ldir in sorted(p for p in run.iterdir() if (p / "oof.npz").is_file()):
        o = np.load(ldir / "oof.npz", allow_pickle=False)
        if not all((o["fold"] == f).any() for f in folds):
            continue
        sel = np.isin(o["fold"], folds)
        hists = [ldir / f"fold{f}" / "history.csv" for f in folds]
        rows = [list(csv.DictReader(h.open(encoding="utf-8"))) if h.is_file() else [] for h in hists]
        vals = [[float(r["val_macro_f1"]) for r in rs if r.get("val_macro_f1")] for rs in rows]
        out.append({"learner": ldir.name, "fingerprint": split.get("fingerprint", ""), "ids": o["ids"][sel],
                    "y": o["y"][sel].astype(int), "soft": o["soft"][sel], "patients": o["groups"][sel].astype(str),
                    "ages": o["age_groups"][sel].astype(str), "classes": [str(c) for c in o["classes"]],
                    "curve": vals[0], "best_epoch": "/".join(str(int(np.argmax(v)) + 1 if v else 0) for v in vals),
                    "epochs_run": "/".join(str(len(v)) for v in vals),
                    "seconds": sum(float(r.get("seconds") or 0) for rs in rows for r in rs),
                    "n_train": "/".join(str(_n_train(ldir / f"fold{f}" / "best" / "config.json")) for f in folds)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR (the first is the reference)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0], help="folds to score, each on its own")
    ap.add_argument("--pooled", action="store_true",
                    help="also score the --folds' images together, for the runs that have all of them (with every fold "
                         "listed: each labelled non-test image once, out of fold)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/recipe_screen"))
    args = ap.parse_args(argv)
    if args.pooled and len(args.folds) < 2:
        ap.error("--pooled needs two or more --folds")
    specs = []
    for spec in args.runs:
        name, _, path = spec.partition("=")
        if not (Path(path) / "split.json").is_file():
            print(f"{path}: not a train-patch run folder (no split.json)", file=sys.stderr)
            return 2
        specs.append((name, Path(path)))
    rows, md = [], []
    args.out.mkdir(parents=True, exist_ok=True)
    pooled = [args.folds] if args.pooled else []
    for folds in [[f] for f in args.folds] + pooled:
        fold = folds[0] if len(folds) == 1 else "+".join(map(str, folds))
        entries, missing = [], []
        for name, run in specs:
            found = _load(run, folds)
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
            md += ["", f"Not scored on {'folds' if len(folds) > 1 else 'fold'} {fold} (no out-of-fold votes for it): {', '.join(missing)}."]
        if len(folds) == 1:
            _curves(entries, args.out / f"curves_fold{fold}.png", fold)
    write_csv(args.out / "screen.csv", rows)
    write_text(args.out / "screen.md", "\n".join(md).strip() + "\n")
    print("\n".join(md))
    return 0


COLS = ["fold", "recipe", "macro_f1", "ci_low", "ci_high", "delta_vs_first", "delta_ci_low", "delta_ci_high",
        "balanced_accuracy", "f1_per_class", "adult_covid_auc", "adult_auc_ci", "adult_auc_delta_vs_first", "adult_non_covid_called_covid", "n_train", "best_epoch", "epochs_run", "train_minutes"]


def _score(entries: list[dict], fold: int | str) -> tuple[list[dict], str]:
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
        auc = auc_with_ci((y[adult] == covid).astype(float), e["soft"][adult, covid], ref["patients"][adult], RESAMPLES, 0)
        rows.append({"fold": fold, "recipe": e["name"], "learner": e["learner"], "n": len(y),
                     "macro_f1": round(ci["value"], 3), "ci_low": round(ci["ci_low"], 3), "ci_high": round(ci["ci_high"], 3),
                     "delta_vs_first": round(delta["diff"], 3),
                     "delta_ci_low": round(delta["ci_low"], 3), "delta_ci_high": round(delta["ci_high"], 3),
                     "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 3),
                     "f1_per_class": " / ".join(f"{v:.3f}" for v in f1_score(y, pred, average=None,
                                                                              labels=range(len(ref["classes"])))),
                     "adult_covid_auc": round(auc["value"], 3),
                     "adult_auc_ci": "[{ci_low:.3f}, {ci_high:.3f}]".format(**auc),
                     "adult_auc_delta_vs_first": "{diff:+.3f} [{ci_low:+.3f}, {ci_high:+.3f}]".format(**paired_bootstrap(
                         d.subset(adult), data(ref).subset(adult), ["covid_auc"], RESAMPLES, seed=0)["covid_auc"]),
                     "adult_non_covid_called_covid": f"{int(np.sum(pred[anc] == covid))}/{int(anc.sum())}",
                     "n_train": e["n_train"], "best_epoch": e["best_epoch"], "epochs_run": e["epochs_run"],
                     "train_minutes": round(e["seconds"] / 60, 1), "run": e["run"]})
    head = (f"{'Folds' if isinstance(fold, str) else 'Fold'} {fold} out of fold ({len(y)} images, {len(np.unique(ref['patients']))} patient groups, "
            f"{int(adult.sum())} adult); 95 % CIs: {RESAMPLES} patient bootstrap resamples "
            f"(`patchflannel.stats`), deltas paired against `{ref['name']}`; f1_per_class in the order "
            f"{' / '.join(ref['classes'])}.")
    return rows, head


def _curves(entries: list[dict], path: Path, fold: int | str) -> None:
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
