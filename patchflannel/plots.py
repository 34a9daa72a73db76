"""Evaluation figures: confusion matrix, ROC/PR curves, learner weights, training history.

Figures are built with matplotlib's object API on an Agg canvas — no pyplot,
so no global figure registry, no interactive backend and nothing to close —
and each PNG is written atomically (temp file in the same folder, then
``os.replace``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from ._files import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["new_figure", "save_figure", "plot_confusion", "plot_roc_pr", "plot_training_history", "plot_weight_distribution"]

_DPI = 120


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A matplotlib Figure on its own Agg canvas (no pyplot state)."""
    fig = Figure(figsize=(width, height), dpi=_DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = _DPI) -> Path:
    """Write ``fig`` as PNG, atomically."""
    with atomic_path(path) as tmp:
        # The temp name ends in .tmp, so the format must be explicit.
        fig.savefig(tmp, format="png", dpi=dpi)
    logger.debug("wrote %s", path)
    return Path(path)


def plot_confusion(
    cm: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "Confusion matrix",
) -> Path:
    """Confusion matrix (M,M) int counts, rows true / columns predicted → PNG.

    Cells are coloured by the row-normalised rate (recall per true class) so
    that rare classes are as visible as common ones, and labelled with counts.
    """
    counts = np.asarray(cm, dtype=np.int64)
    m = len(class_names)
    if counts.shape != (m, m):
        raise ValueError(f"cm must be ({m},{m}) for {m} class names, got {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)

    size = 2.0 + 0.9 * m
    fig = new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    for i in range(m):
        for j in range(m):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(m), labels=list(class_names), rotation=30, ha="right")
    ax.set_yticks(range(m), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_roc_pr(
    y_true: np.ndarray | Sequence[int],
    proba: np.ndarray | Mapping[str, np.ndarray],
    class_names: Sequence[str],
    positive: str,
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """ROC and precision-recall curves of ``positive`` vs rest → PNG.

    Args:
        y_true: (n,) int class indices.
        proba: (n,M) float scores of one model, or model name → (n,M) to
            overlay several models on the same axes.
        positive: class name (case-insensitive).

    If ``y_true`` has no positive or no negative sample the curves are
    undefined; the figure then says so instead of raising.
    """
    y = np.asarray(y_true)
    lowered = [c.lower() for c in class_names]
    if positive.lower() not in lowered:
        raise ValueError(f"positive class {positive!r} is not one of {list(class_names)}")
    k = lowered.index(positive.lower())
    models = dict(proba) if isinstance(proba, Mapping) else {"model": proba}
    truth = y == k

    fig = new_figure(10.0, 4.5)
    ax_roc, ax_pr = fig.subplots(1, 2)
    name = class_names[k]
    limits = {"xlim": (0, 1), "ylim": (0, 1.02)}
    ax_roc.set(xlabel="1 − specificity", ylabel="sensitivity", title=f"ROC: {name} vs rest", **limits)
    ax_pr.set(xlabel="recall", ylabel="precision", title=f"PR: {name} vs rest", **limits)
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    if truth.all() or not truth.any():
        msg = f"ROC/PR undefined: y_true has {'only' if truth.all() else 'no'} {name!r} samples"
        logger.warning("%s", msg)
        for ax in (ax_roc, ax_pr):
            ax.text(0.5, 0.5, msg, ha="center", va="center", wrap=True, transform=ax.transAxes)
    else:
        ax_pr.axhline(truth.mean(), color="grey", linestyle=":", linewidth=1, label=f"prevalence {truth.mean():.3f}")
        for label, p in models.items():
            p = np.asarray(p, dtype=np.float64)
            if p.shape != (y.size, len(class_names)):
                raise ValueError(f"proba of {label!r} must be ({y.size},{len(class_names)}), got {p.shape}")
            score = p[:, k]
            fpr, tpr, _ = roc_curve(truth, score)
            prec, rec, _ = precision_recall_curve(truth, score)
            auc, ap = roc_auc_score(truth, score), average_precision_score(truth, score)
            ax_roc.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
            ax_pr.plot(rec, prec, drawstyle="steps-post", label=f"{label} (AP {ap:.3f})")
        ax_roc.legend(loc="lower right", fontsize="small")
        ax_pr.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_weight_distribution(
    w: np.ndarray,
    learner_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "FLANNEL learner weights",
) -> Path:
    """Box plot of per-image learner weights w: (n,N) float → PNG, with the zero line.

    A box plot rather than a violin: it needs no density estimate, so a
    learner whose weight is constant (e.g. at initialisation) still plots.
    """
    weights = np.asarray(w, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(learner_names) or weights.shape[0] == 0:
        raise ValueError(f"w must be (n,{len(learner_names)}) with n >= 1, got {weights.shape}")
    fig = new_figure(1.5 + 1.1 * len(learner_names), 4.0)
    ax = fig.add_subplot()
    ax.axhline(0.0, color="crimson", linewidth=1, linestyle="--", zorder=0)
    ax.boxplot(weights, showmeans=True, flierprops={"markersize": 2})
    # Labels set on the axis: boxplot's own keyword was renamed in matplotlib 3.9.
    ax.set_xticks(range(1, len(learner_names) + 1), labels=list(learner_names))
    ax.set_ylabel("weight $w_i$ (tanh output)")
    ax.set_ylim(-1.05, 1.05)
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_title(f"{title} (n = {weights.shape[0]})")
    return save_figure(fig, path)


def plot_training_history(
    history: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    best_epoch: int | None = None,
    title: str = "Training history",
) -> Path:
    """Loss curves and validation macro-F1 per epoch → PNG.

    Args:
        history: keys ``train_loss``, ``val_loss``, ``val_macro_f1`` (any
            present are drawn) and optionally ``epoch``; e.g.
            ``FitResult.history`` from :mod:`patchflannel.ensemble`.
        best_epoch: marked with a vertical line when given.
    """
    keys = ("train_loss", "val_loss", "val_macro_f1")
    curves = {k: np.asarray(history[k], dtype=np.float64) for k in keys if k in history}
    if not curves:
        raise ValueError(f"history has none of train_loss, val_loss, val_macro_f1; keys: {sorted(history)}")
    n = max(len(v) for v in curves.values())
    epochs = np.asarray(history.get("epoch", range(1, n + 1)), dtype=np.float64)

    fig = new_figure(10.0, 4.0)
    ax_loss, ax_f1 = fig.subplots(1, 2)
    for key in ("train_loss", "val_loss"):
        if key in curves:
            ax_loss.plot(epochs[: len(curves[key])], curves[key], marker=".", label=key.replace("_", " "))
    if "val_macro_f1" in curves:
        ax_f1.plot(epochs[: len(curves["val_macro_f1"])], curves["val_macro_f1"], marker=".", color="C2")
    for ax in (ax_loss, ax_f1):
        ax.set_xlabel("epoch")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
    ax_loss.set(ylabel="loss", title="loss")
    ax_f1.set(ylabel="macro-F1", title="validation macro-F1")
    if "train_loss" in curves or "val_loss" in curves or best_epoch is not None:
        ax_loss.legend(fontsize="small")  # an empty legend() only warns "no artists with labels"
    if best_epoch is not None:
        ax_f1.legend(fontsize="small")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_reliability_before_after(raw: np.ndarray, calibrated: np.ndarray, y: np.ndarray,
                                  path: str | os.PathLike[str], title: str = "", bins: int = 15) -> Path:
    """Reliability curves (accuracy vs mean confidence per bin, top label) before and after
    calibration on the same images, with the confidence histograms below."""
    from .calibrate import expected_calibration_error, reliability

    fig = new_figure(5.5, 6.0)
    ax, axc = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for probs, name, colour in ((raw, "raw", "C1"), (calibrated, "calibrated", "C0")):
        rel = reliability(probs, y, bins)
        ok = np.asarray(rel["count"]) > 0
        conf, acc = np.asarray(rel["confidence"])[ok], np.asarray(rel["accuracy"])[ok]
        ax.plot(conf, acc, "o-", color=colour, markersize=4,
                label=f"{name} (ECE {expected_calibration_error(probs, y, bins):.3f})")
        axc.hist(probs.max(1), bins=edges, color=colour, alpha=0.5, label=name)
    ax.set(ylabel="accuracy (top label)", xlim=(0, 1), ylim=(0, 1.02), title=title or "Reliability before and after")
    ax.legend(fontsize="small", loc="upper left")
    axc.set(xlabel="confidence (top probability)", ylabel="images")
    return save_figure(fig, path)
