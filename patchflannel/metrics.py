"""Evaluate stage: metrics from predicted class distributions, summaries, tables.

Predictions are always the argmax over float scores (never parsed strings).
Reports are plain JSON-able dicts; :func:`flatten_report` turns one into
``{"per_class.covid.f1": 0.8, ...}`` so that :func:`summarise` can take the
mean and std of every scalar over folds or seeds, and :func:`format_table`
prints them like the FLANNEL paper's Table 3.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

logger = logging.getLogger(__name__)

__all__ = [
    "classification_report_dict",
    "flatten_report",
    "format_table",
    "summarise",
]


# --------------------------------------------------------------------------- #
# Per-run report
# --------------------------------------------------------------------------- #
def _check_inputs(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> None:
    if proba.ndim != 2 or y_true.ndim != 1 or proba.shape[0] != y_true.shape[0]:
        raise ValueError(f"expected y_true (n,) and proba (n,M), got {y_true.shape} and {proba.shape}")
    if proba.shape[0] == 0:
        raise ValueError("cannot evaluate zero samples")
    if proba.shape[1] != len(class_names):
        raise ValueError(f"proba has {proba.shape[1]} columns but {len(class_names)} class names were given")
    if not np.all(np.isfinite(proba)):
        raise ValueError("proba contains NaN or inf; check the model outputs before evaluating")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= len(class_names):
        raise ValueError(f"y_true must lie in [0, {len(class_names)}), got [{y_true.min()}, {y_true.max()}]")


def _find_class(name: str, class_names: Sequence[str]) -> int:
    lowered = [c.lower() for c in class_names]
    if name.lower() not in lowered:
        raise ValueError(f"positive class {name!r} is not one of {list(class_names)}")
    return lowered.index(name.lower())


def _ranking_scores(truth: np.ndarray, score: np.ndarray) -> tuple[float, float, str | None]:
    """ROC-AUC and average precision of one binary problem; NaN + note if undefined."""
    n_pos = int(truth.sum())
    if n_pos == 0:
        return math.nan, math.nan, "absent from y_true: ROC-AUC and AP undefined"
    if n_pos == truth.size:
        return math.nan, math.nan, "the only class in y_true: ROC-AUC and AP undefined"
    return float(roc_auc_score(truth, score)), float(average_precision_score(truth, score)), None


def classification_report_dict(
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    positive: str | None = "covid",
) -> dict[str, Any]:
    """All metrics of one model on one test set.

    Args:
        y_true: (n,) int class indices in [0, M).
        proba: (n,M) float scores (probabilities or logits); prediction = argmax.
        class_names: M names, in column order.
        positive: class (case-insensitive) for the binary positive-vs-rest
            metrics; ``None`` skips them.

    Returns:
        ``{"n_samples", "class_names", "accuracy", "macro_f1", "macro_precision",
        "macro_recall", "per_class": {name: {"precision", "recall", "f1",
        "support", "roc_auc", "average_precision"}}, "confusion_matrix":
        [[int]] (rows true, columns predicted), "positive": {"name",
        "sensitivity", "specificity", "balanced_accuracy", "ppcr", "roc_auc",
        "average_precision"}, "notes": [str]}``. Macro averages run over all M
        classes (an absent class counts as 0, sklearn's ``zero_division=0``);
        undefined ranking metrics are NaN and explained in ``notes``.
    """
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    _check_inputs(y, p, class_names)
    m = len(class_names)
    labels = list(range(m))
    pred = p.argmax(axis=1)
    notes: list[str] = []

    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y, pred, labels=labels)
    per_class: dict[str, dict[str, float | int]] = {}
    for k, name in enumerate(class_names):
        auc, ap, note = _ranking_scores(y == k, p[:, k])
        if note:
            notes.append(f"class {name!r} {note}")
        per_class[name] = {
            "precision": float(prec[k]),
            "recall": float(rec[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
            "roc_auc": auc,
            "average_precision": ap,
        }
    absent = [class_names[k] for k in labels if support[k] == 0]
    if absent:
        notes.append(f"classes {absent} have no test samples; they count as F1 = 0 in the macro averages")

    report: dict[str, Any] = {
        "n_samples": int(y.size),
        "class_names": list(class_names),
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": float(np.mean(f1)),
        "macro_precision": float(np.mean(prec)),
        "macro_recall": float(np.mean(rec)),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
    }
    if positive is not None:
        k = _find_class(positive, class_names)
        tp = int(cm[k, k])
        fn = int(cm[k].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = int(cm.sum()) - tp - fn - fp
        sens = tp / (tp + fn) if tp + fn else math.nan
        spec = tn / (tn + fp) if tn + fp else math.nan
        if math.isnan(sens) or math.isnan(spec):
            notes.append(f"positive class {class_names[k]!r}: sensitivity or specificity undefined (no such cases)")
        report["positive"] = {
            "name": class_names[k],
            "sensitivity": sens,
            "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2,
            "ppcr": (tp + fp) / int(cm.sum()),
            "roc_auc": per_class[class_names[k]]["roc_auc"],
            "average_precision": per_class[class_names[k]]["average_precision"],
        }
    report["notes"] = notes
    for note in notes:
        logger.warning("%s", note)
    return report


# --------------------------------------------------------------------------- #
# Summaries over folds / seeds
# --------------------------------------------------------------------------- #
def flatten_report(report: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a (nested) report as ``{"a.b.c": float}``.

    Lists of numbers (the confusion matrix) become ``"confusion_matrix.i.j"``
    keys with ``i`` the true and ``j`` the predicted class name when the
    report carries ``class_names``, else indices. Strings and bools are skipped.
    """
    names = report.get("class_names") if not prefix else None
    out: dict[str, float] = {}

    def visit(key: str, value: Any) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, (int, float, np.integer, np.floating)):
            out[key] = float(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(f"{key}.{k}" if key else str(k), v)
        elif isinstance(value, (list, tuple, np.ndarray)):
            for i, v in enumerate(value):
                label = names[i] if key.startswith("confusion_matrix") and names and i < len(names) else str(i)
                visit(f"{key}.{label}", v)

    for k, v in report.items():
        if k != "class_names":
            visit(f"{prefix}{k}", v)
    return out


def summarise(reports: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and std of every scalar over several reports (folds, seeds).

    Returns ``{key: {"mean", "std", "n"}}`` with flattened keys (see
    :func:`flatten_report`). NaN values (e.g. ROC-AUC of a class absent from a
    fold) are left out and ``n`` counts the values used; a key with no finite
    value has mean and std NaN. ``std`` is the sample standard deviation
    (ddof=1) when n > 1 — folds are a sample of possible splits — and 0.0 when
    n == 1.
    """
    if not reports:
        raise ValueError("summarise needs at least one report")
    flat = [flatten_report(r) for r in reports]
    keys: dict[str, None] = {}
    for f in flat:
        keys.update(dict.fromkeys(f))
    summary: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.array([f[key] for f in flat if key in f], dtype=np.float64)
        values = values[np.isfinite(values)]
        n = values.size
        if n == 0:
            summary[key] = {"mean": math.nan, "std": math.nan, "n": 0}
        else:
            summary[key] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1 if n > 1 else 0)),
                "n": n,
            }
    return summary


def format_table(
    rows: Mapping[str, Mapping[str, Mapping[str, float]]],
    class_names: Sequence[str],
    *,
    positive: str | None = None,
    digits: int = 3,
    bold_best: bool = True,
) -> str:
    """Markdown table like FLANNEL's Table 3 from :func:`summarise` outputs.

    Args:
        rows: model name → summary. Columns: F1 of each class, macro-F1,
            accuracy, and — when any summary has them — the positive class's
            sensitivity and specificity (header names ``positive``).
        digits: decimals in each "mean (std)" cell.
        bold_best: bold the highest mean per column (all columns are
            higher-is-better); ties are all bolded.
    """
    pos_label = positive or "pos."
    columns: list[tuple[str, str]] = [(f"{c} F1", f"per_class.{c}.f1") for c in class_names]
    columns += [("Macro-F1", "macro_f1"), ("Accuracy", "accuracy")]
    if any("positive.sensitivity" in s for s in rows.values()):
        columns += [(f"{pos_label} sens.", "positive.sensitivity"), (f"{pos_label} spec.", "positive.specificity")]

    best: dict[str, float] = {}
    for _, key in columns:
        means = [s[key]["mean"] for s in rows.values() if key in s and math.isfinite(s[key]["mean"])]
        if means:
            best[key] = round(max(means), digits)

    def cell(summary: Mapping[str, Mapping[str, float]], key: str) -> str:
        if key not in summary or not math.isfinite(summary[key]["mean"]):
            return "–"
        mean, std = summary[key]["mean"], summary[key]["std"]
        text = f"{mean:.{digits}f} ({std:.{digits}f})" if math.isfinite(std) else f"{mean:.{digits}f}"
        return f"**{text}**" if bold_best and len(rows) > 1 and round(mean, digits) == best.get(key) else text

    lines = [
        "| Model | " + " | ".join(h for h, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, summary in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(summary, k) for _, k in columns) + " |")
    return "\n".join(lines) + "\n"
