"""Draw a learning curve from a recipe screen: macro-F1 and within-adult COVID AUC against the share of
training patients, every draw (subset seed) its own point.

    python scripts/recipe_screen.py --folds 0 1 2 --pooled --out docs/results/learning_curve \
        all=runs/r_global_b16_e24 third=runs/screen/global_b16_frac33 ...
    python scripts/learning_curve.py docs/results/learning_curve/screen.csv \
        1=all 0.3333=third 0.3333=third-s1 0.6667=two-thirds ...

Each ``SHARE=RECIPE`` names a recipe of the screen (its ``recipe`` column) and the share of each fold's
training patients it trained on. Reads the screen's rows as they are (nothing is rescored); writes
``learning_curve.png`` (per fold thin, all folds pooled thick with its 95 % patient-bootstrap CI) and
``learning_curve.md`` (one row per share: each draw's pooled scores and their spread) beside the CSV.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from patchflannel._files import write_text


def _ci(text: str) -> tuple[float, float]:
    low, high = text.strip("[] ").split(",")
    return float(low), float(high)


NEEDED = ("fold", "recipe", "macro_f1", "ci_low", "ci_high", "adult_covid_auc", "adult_auc_ci",
          "adult_non_covid_called_covid", "n_train")


def read_points(screen: Path, shares: dict[str, float]) -> list[dict]:
    """The screen rows of the named recipes, with their share, the AUC's CI bounds parsed."""
    with screen.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing_cols = [c for c in NEEDED if c not in (reader.fieldnames or [])]
        if missing_cols:
            raise ValueError(f"{screen}: no column {', '.join(missing_cols)} (written by scripts/recipe_screen.py "
                             "since session 7: rerun it)")
        rows = list(reader)
    found = {r["recipe"] for r in rows}
    missing = sorted(set(shares) - found)
    if missing:
        raise ValueError(f"{screen}: no rows for {', '.join(missing)} (recipes there: {', '.join(sorted(found))})")
    out = []
    for r in rows:
        if r["recipe"] in shares:
            lo, hi = _ci(r["adult_auc_ci"])
            out.append({"fold": r["fold"], "recipe": r["recipe"], "share": shares[r["recipe"]],
                        "macro_f1": float(r["macro_f1"]), "f1_low": float(r["ci_low"]), "f1_high": float(r["ci_high"]),
                        "auc": float(r["adult_covid_auc"]), "auc_low": lo, "auc_high": hi,
                        "called": r["adult_non_covid_called_covid"], "n_train": r["n_train"]})
    return out


def summary(points: list[dict]) -> list[str]:
    """Markdown: per share, each draw's pooled (all folds) scores, then the mean and range over draws."""
    pooled = [p for p in points if "+" in p["fold"]]
    lines = ["| share of patients | draw | training images per fold | macro-F1 [95 % CI] | within-adult AUC [95 % CI] | adult non-COVID called COVID |",
             "|---:|---|---|---|---|---|"]
    for share in sorted({p["share"] for p in pooled}):
        at = [p for p in pooled if p["share"] == share]
        for p in at:
            lines.append(f"| {share:.2f} | {p['recipe']} | {p['n_train']} | {p['macro_f1']:.3f} [{p['f1_low']:.3f}, "
                         f"{p['f1_high']:.3f}] | {p['auc']:.3f} [{p['auc_low']:.3f}, {p['auc_high']:.3f}] | {p['called']} |")
        if len(at) > 1:
            f1, auc = np.array([p["macro_f1"] for p in at]), np.array([p["auc"] for p in at])
            lines.append(f"| {share:.2f} | mean of {len(at)} draws (range) | | {f1.mean():.3f} ({f1.min():.3f}–{f1.max():.3f}) "
                         f"| {auc.mean():.3f} ({auc.min():.3f}–{auc.max():.3f}) | |")
    shares = np.log2([p["share"] for p in pooled])
    if len(set(shares)) > 1:
        f1 = np.polyfit(shares, [p["macro_f1"] for p in pooled], 1)[0]
        auc = np.polyfit(shares, [p["auc"] for p in pooled], 1)[0]
        lines += ["", f"Least-squares slope over the {len(pooled)} pooled draws, per doubling of the share of patients: "
                      f"macro-F1 {f1:+.3f}, within-adult AUC {auc:+.3f} (a description of these points, without an "
                      f"interval; not a prediction beyond them)."]
    return lines


def plot(points: list[dict], path: Path) -> None:
    from patchflannel.plots import new_figure, save_figure

    fig = new_figure(9, 3.8)
    axes = fig.subplots(1, 2)
    folds = sorted({p["fold"] for p in points}, key=lambda f: ("+" in f, f))
    for ax, (key, lo, hi, label) in zip(axes, (("macro_f1", "f1_low", "f1_high", "macro-F1 (4 classes)"),
                                                ("auc", "auc_low", "auc_high", "within-adult COVID-vs-rest AUC"))):
        for fold in folds:
            at = sorted((p for p in points if p["fold"] == fold), key=lambda p: p["share"])
            xs = np.array([p["share"] for p in at])
            ys = np.array([p[key] for p in at])
            if "+" in fold:
                err = np.clip(np.array([[p[key] - p[lo] for p in at], [p[hi] - p[key] for p in at]]), 0, None)
                ax.errorbar(xs, ys, yerr=err, fmt="o", color="black", capsize=3, label=f"folds {fold} pooled (95 % CI)")
                shares = sorted(set(xs))
                ax.plot(shares, [ys[xs == s].mean() for s in shares], color="black", lw=1.5)
            else:
                shares = sorted(set(xs))
                line, = ax.plot(shares, [ys[xs == s].mean() for s in shares], lw=0.8, alpha=0.6, label=f"fold {fold}")
                ax.plot(xs, ys, ".", color=line.get_color(), alpha=0.8)
        if key == "auc":
            ax.axhline(0.5, color="grey", ls=":", lw=1)
            ax.axhline(0.75, color="tab:red", ls="--", lw=1, label="issue 11's target")
        ax.set_xlabel("share of each fold's training patients")
        ax.set_ylabel(label)
        ax.set_xlim(min(0.25, min(p["share"] for p in points) - 0.05), 1.05)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Whole-image learner, out of fold: every draw a point; the line joins the pooled means", fontsize=9)
    save_figure(fig, path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("screen", type=Path, help="screen.csv written by scripts/recipe_screen.py")
    ap.add_argument("points", nargs="+", help="SHARE=RECIPE, e.g. 0.3333=global-b16-train-1/3")
    args = ap.parse_args(argv)
    shares: dict[str, float] = {}
    for spec in args.points:
        share, eq, recipe = spec.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = float("nan")
        if not eq or not recipe or not 0 < value <= 1:
            ap.error(f"{spec}: expected SHARE=RECIPE with SHARE a number in (0, 1]")
        if recipe in shares:
            ap.error(f"{recipe}: listed twice")
        shares[recipe] = round(value, 4)
    try:
        points = read_points(args.screen, shares)
    except (OSError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    if not any("+" in p["fold"] for p in points):
        print(f"{args.screen}: no pooled rows (fold 0+1+…): run scripts/recipe_screen.py with --pooled", file=sys.stderr)
        return 2
    out = args.screen.parent
    lines = summary(points)
    write_text(out / "learning_curve.md", "\n".join(lines) + "\n")
    plot(points, out / "learning_curve.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
