"""Uncertainty and strata for classifier evaluations: cluster bootstrap CIs, paired tests, stratified reports.

Everything here works on plain arrays — true class indices ``y`` (n,), predicted
class indices ``pred`` (n,), probabilities ``probs`` (n, M) and optional cluster
ids (patients) — so it serves ``ensemble``'s report and ``patchflannel evaluate``
on any user's predictions alike.

**Bootstrap.** A resample draws *clusters* (patients) with replacement, as many
as there are clusters, and keeps all images of each drawn patient together; with
one image per patient this is the ordinary image bootstrap. A resample is a
vector of integer image weights (how often each image's patient was drawn), so
every metric is computed for all resamples at once from weighted counts (matrix
products; resamples are processed in blocks to bound memory). Intervals are
percentile intervals (2.5 %, 97.5 %) over the resamples where the metric is
defined.

**Metric definitions** (the point estimates agree with scikit-learn):

- per-class F1 = 2·TP / (2·TP + FP + FN); undefined (NaN) when the class is
  neither present nor predicted;
- macro-F1 = mean of the per-class F1 over the classes *present in the evaluated
  set's truth* (scikit-learn ``f1_score(labels=present, average="macro")``), so a
  stratum without COVID images is not penalised for an undefined COVID F1;
- COVID-vs-rest AUC = ROC AUC of ``p_covid`` (ties count ½), ``roc_auc_score``;
- ECE = top-label expected calibration error over 15 equal-width confidence bins
  (as :func:`patchflannel.calibrate.expected_calibration_error`).

**Paired test.** Two prediction sets on the same images are resampled with the
same weights; the CI of the difference A − B is the percentile interval and the
two-sided p-value is ``min(1, 2·min(#{d ≤ 0}+1, #{d ≥ 0}+1)/(B+1))``.

Training/evaluation side: inference code never imports it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

__all__ = [
    "ECE_BINS",
    "EvalData",
    "auc_with_ci",
    "bootstrap_metrics",
    "build_evaluation",
    "cluster_weights",
    "confound_report",
    "evaluate_files",
    "evaluation_report",
    "load_evaluation",
    "metric_names",
    "paired_bootstrap",
    "plot_reliability",
    "plot_strata",
    "point_metrics",
    "reliability_bins",
    "report_markdown",
    "sample_age_group",
    "score_groups",
    "stratified_report",
    "weighted_auc",
    "write_evaluation",
]

ECE_BINS = 15
DEFAULT_RESAMPLES = 2000
_BLOCK_CELLS = 4_000_000  # resamples × images per block (≈ 32 MB of float64 weights)


# --------------------------------------------------------------------------- data


@dataclass
class EvalData:
    """One evaluated set: truth, predictions, probabilities and the clusters to resample.

    Args:
        y: (n,) int true class indices into ``classes``.
        pred: (n,) int predicted class indices (default: argmax of ``probs``).
        probs: (n, M) probabilities (rows need not sum exactly to 1).
        classes: M class names.
        clusters: (n,) cluster ids (patients); default one cluster per image.
        positive: the class scored by the "vs rest" AUC (case-insensitive; default ``covid``
            if present, else the last class).
    """

    y: np.ndarray
    probs: np.ndarray
    classes: tuple[str, ...]
    pred: np.ndarray | None = None
    clusters: np.ndarray | None = None
    positive: str | None = None
    present: tuple[int, ...] = field(init=False)
    pos: int = field(init=False)

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        m = len(self.classes)
        self.probs = np.asarray(self.probs, dtype=np.float64)
        self.y = np.asarray(self.y).astype(np.int64)
        n = self.y.shape[0]
        if self.y.ndim != 1 or n == 0:
            raise ValueError(f"y must be a non-empty 1-D array, got shape {self.y.shape}")
        if self.probs.shape != (n, m):
            raise ValueError(f"probs must be ({n},{m}) for {m} classes, got {self.probs.shape}")
        if not np.isfinite(self.probs).all():
            raise ValueError("probs contain NaN or infinite values")
        if self.y.min() < 0 or self.y.max() >= m:
            raise ValueError(f"y must hold class indices 0..{m - 1}")
        self.pred = self.probs.argmax(axis=1) if self.pred is None else np.asarray(self.pred).astype(np.int64)
        if self.pred.shape != (n,) or self.pred.min() < 0 or self.pred.max() >= m:
            raise ValueError(f"pred must be ({n},) class indices 0..{m - 1}")
        if self.clusters is None:
            self.clusters = np.arange(n)
        self.clusters = np.asarray(self.clusters)
        if self.clusters.shape != (n,):
            raise ValueError(f"clusters must be ({n},), got {self.clusters.shape}")
        lowered = [c.lower() for c in self.classes]
        want = (self.positive or ("covid" if "covid" in lowered else self.classes[-1])).lower()
        if want not in lowered:
            raise ValueError(f"positive class {self.positive!r} is not one of {list(self.classes)}")
        self.pos = lowered.index(want)
        self.positive = self.classes[self.pos]
        self.present = tuple(int(c) for c in np.unique(self.y))

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_clusters(self) -> int:
        return int(np.unique(self.clusters).size)

    def subset(self, mask: np.ndarray) -> EvalData:
        mask = np.asarray(mask, dtype=bool)
        return EvalData(self.y[mask], self.probs[mask], self.classes, self.pred[mask], self.clusters[mask], self.positive)


def sample_age_group(image_id: str = "", patient_id: str = "", source: str = "", age: str | float | None = "") -> str:
    """``pediatric`` / ``adult`` / ``""`` (unknown) for one image: ``kcx-`` ids are pediatric (Kaggle,
    ages 1–5), otherwise :func:`patchflannel.data.age_group` (known adult/pediatric sources, else age < 18)."""
    from .data import age_group

    if str(image_id).lower().startswith("kcx-") or str(patient_id).lower().startswith("kcx-"):
        return "pediatric"
    return age_group(source or "", "" if age is None else str(age))


# --------------------------------------------------------------------------- weighted metrics


def cluster_weights(clusters: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) integer image weights: each resample draws the G clusters G times with
    replacement; an image's weight is how often its cluster was drawn (a patient's images move together)."""
    _, idx = np.unique(np.asarray(clusters), return_inverse=True)
    g = int(idx.max()) + 1
    draws = rng.integers(0, g, size=(n_resamples, g)) + g * np.arange(n_resamples)[:, None]
    counts = np.bincount(draws.ravel(), minlength=n_resamples * g).reshape(n_resamples, g).astype(np.float64)
    return counts[:, idx]


def weighted_auc(w_pos: np.ndarray, w_neg: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC for B weightings at once (Mann–Whitney with ties as ½).

    Args:
        w_pos, w_neg: (B, n) weights of the positive / negative images (zero elsewhere).
        score: (n,) scores.
    Returns (B,) AUC, NaN where a weighting has no positive or no negative weight.
    """
    _, k = np.unique(score, return_inverse=True)
    u = int(k.max()) + 1
    onehot = np.zeros((score.size, u))
    onehot[np.arange(score.size), k] = 1.0
    pw, nw = w_pos @ onehot, w_neg @ onehot  # (B, U) weight per distinct score
    below = np.cumsum(nw, axis=1) - nw
    num = (pw * (below + 0.5 * nw)).sum(axis=1)
    den = pw.sum(axis=1) * nw.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def metric_names(classes: Sequence[str], positive: str = "covid") -> list[str]:
    """Names :func:`point_metrics` returns, in report order."""
    return ["macro_f1", "accuracy", *[f"f1_{c}" for c in classes], f"{positive.lower()}_auc", "ece"]


def _weighted_metrics(d: EvalData, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for weightings ``w`` (B, n) → name → (B,) values (NaN where undefined)."""
    m = len(d.classes)
    cell = np.zeros((d.n, m * m))
    cell[np.arange(d.n), d.y * m + d.pred] = 1.0
    cm = (w @ cell).reshape(-1, m, m)  # (B, true, pred)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    fp = cm.sum(axis=1) - tp
    fn = cm.sum(axis=2) - tp
    total = w.sum(axis=1)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = 2 * tp + fp + fn
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1.0), np.nan)
        present = f1[:, list(d.present)]
        ok = ~np.isnan(present)
        out["macro_f1"] = np.where(ok.any(axis=1), np.nansum(present, axis=1) / np.maximum(ok.sum(axis=1), 1), np.nan)
        out["accuracy"] = np.where(total > 0, tp.sum(axis=1) / np.where(total > 0, total, 1.0), np.nan)
    for i, c in enumerate(d.classes):
        out[f"f1_{c}"] = f1[:, i]
    truth = (d.y == d.pos).astype(np.float64)
    out[f"{d.positive.lower()}_auc"] = weighted_auc(w * truth, w * (1.0 - truth), d.probs[:, d.pos])
    conf = d.probs.max(axis=1)
    correct = (d.probs.argmax(axis=1) == d.y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, ECE_BINS - 1)
    onehot = np.zeros((d.n, ECE_BINS))
    onehot[np.arange(d.n), which] = 1.0
    gap = np.abs(w @ (onehot * correct[:, None]) - w @ (onehot * conf[:, None]))  # |Σ correct − Σ conf| per bin
    with np.errstate(invalid="ignore", divide="ignore"):
        out["ece"] = np.where(total > 0, gap.sum(axis=1) / np.where(total > 0, total, 1.0), np.nan)
    return out


def point_metrics(d: EvalData) -> dict[str, float]:
    """Every metric on the set itself (NaN where undefined)."""
    return {k: float(v[0]) for k, v in _weighted_metrics(d, np.ones((1, d.n))).items()}


def _blocks(d: EvalData, n_resamples: int, rng: np.random.Generator) -> Any:
    block = max(1, _BLOCK_CELLS // max(d.n, 1))
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        yield cluster_weights(d.clusters, b, rng)
        done += b


def _interval(values: np.ndarray, point: float, level: float = 0.95) -> dict[str, Any]:
    ok = values[~np.isnan(values)]
    lo, hi = (np.quantile(ok, [(1 - level) / 2, 1 - (1 - level) / 2]) if ok.size else (math.nan, math.nan))
    return {"value": point, "ci_low": float(lo), "ci_high": float(hi), "n_resamples": int(ok.size)}


def bootstrap_metrics(d: EvalData, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Point estimate and percentile CI of every metric: name → {value, ci_low, ci_high, n_resamples}.

    ``n_resamples`` counts the resamples where the metric was defined (e.g. an AUC needs both
    classes in the resample); with 0 the interval is NaN.
    """
    rng = np.random.default_rng(seed)
    point = point_metrics(d)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in point}
    if n_resamples > 0:
        for w in _blocks(d, n_resamples, rng):
            for k, v in _weighted_metrics(d, w).items():
                parts[k].append(v)
    return {k: _interval(np.concatenate(parts[k]) if parts[k] else np.array([]), point[k], level) for k in point}


def paired_bootstrap(a: EvalData, b: EvalData, metrics: Sequence[str] | None = None,
                     n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Difference A − B of two prediction sets on the same images (same truth, same clusters).

    Both sets are scored on the same resamples; returns name → {a, b, diff, ci_low, ci_high, p,
    n_resamples} with the two-sided bootstrap p-value of "no difference".
    """
    if a.n != b.n or not np.array_equal(a.y, b.y) or a.classes != b.classes:
        raise ValueError("paired_bootstrap needs two prediction sets on the same images (same y and classes)")
    if not np.array_equal(a.clusters, b.clusters):
        raise ValueError("paired_bootstrap: the two sets have different cluster ids")
    pa, pb = point_metrics(a), point_metrics(b)
    names = list(metrics) if metrics is not None else list(pa)
    unknown = [m for m in names if m not in pa]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(pa)}")
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for w in _blocks(a, n_resamples, rng):
        ma, mb = _weighted_metrics(a, w), _weighted_metrics(b, w)
        for k in names:
            diffs[k].append(ma[k] - mb[k])
    out = {}
    for k in names:
        dv = np.concatenate(diffs[k]) if diffs[k] else np.array([])
        dv = dv[~np.isnan(dv)]
        iv = _interval(dv, pa[k] - pb[k], level)
        if dv.size:
            p = min(1.0, 2 * min((dv <= 0).sum() + 1, (dv >= 0).sum() + 1) / (dv.size + 1))
        else:
            p = math.nan
        out[k] = {"a": pa[k], "b": pb[k], "diff": pa[k] - pb[k], "ci_low": iv["ci_low"], "ci_high": iv["ci_high"],
                  "p": float(p), "n_resamples": iv["n_resamples"]}
    return out


# --------------------------------------------------------------------------- strata and confound


def _check_sklearn(d: EvalData, point: Mapping[str, float]) -> None:
    """Cheap guard that the vectorised estimates equal scikit-learn's on the set itself."""
    present = list(d.present)
    assert abs(point["accuracy"] - accuracy_score(d.y, d.pred)) < 1e-9
    assert abs(point["macro_f1"] - f1_score(d.y, d.pred, labels=present, average="macro", zero_division=0)) < 1e-9
    truth = d.y == d.pos
    if truth.any() and not truth.all():
        assert abs(point[f"{d.positive.lower()}_auc"] - roc_auc_score(truth, d.probs[:, d.pos])) < 1e-9


def stratified_report(d: EvalData, groups: Mapping[str, Sequence[str]], n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0, min_n: int = 10) -> dict[str, list[dict[str, Any]]]:
    """Metrics per stratum for each grouping (e.g. ``{"source": [...], "view": [...], "age_group": [...]}``).

    Each stratum row has n, patients, class counts, mean p_<positive>, and every metric with a
    cluster-bootstrap CI when the stratum has at least ``min_n`` images and 2 clusters (else the
    point estimate only, CI NaN). Unknown/empty group values form the stratum ``"(unknown)"``.
    """
    report: dict[str, list[dict[str, Any]]] = {}
    for name, values in groups.items():
        vals = np.array([str(v).strip() or "(unknown)" for v in values], dtype=object)
        if vals.shape != (d.n,):
            raise ValueError(f"group {name!r} has {vals.size} values for {d.n} images")
        rows = []
        for value, count in sorted(Counter(vals.tolist()).items(), key=lambda kv: (-kv[1], kv[0])):
            sub = d.subset(vals == value)
            enough = sub.n >= min_n and sub.n_clusters >= 2
            metrics = bootstrap_metrics(sub, n_resamples if enough else 0, seed)
            rows.append({
                "stratum": value, "n": sub.n, "patients": sub.n_clusters, "ci": enough,
                "classes": {d.classes[c]: int((sub.y == c).sum()) for c in range(len(d.classes))},
                f"mean_p_{d.positive.lower()}": float(sub.probs[:, d.pos].mean()),
                "metrics": metrics,
            })
        report[name] = rows
    return report


def auc_with_ci(truth: np.ndarray, score: np.ndarray, clusters: np.ndarray, n_resamples: int, seed: int,
                level: float = 0.95) -> dict[str, Any]:
    """ROC AUC of ``score`` for ``truth`` (0/1) with a patient-cluster bootstrap interval (``value``, ``ci_low``,
    ``ci_high``, counts); undefined (NaN, with a ``note``) without positives or negatives."""
    truth = np.asarray(truth, dtype=np.float64)
    n_pos, n_neg = int(truth.sum()), int((1 - truth).sum())
    res: dict[str, Any] = {"n": int(truth.size), "n_positive": n_pos, "n_negative": n_neg,
                           "patients": int(np.unique(clusters).size) if truth.size else 0}
    if n_pos == 0 or n_neg == 0:
        res.update(value=math.nan, ci_low=math.nan, ci_high=math.nan, n_resamples=0,
                   note=f"undefined: {'no positive' if n_pos == 0 else 'no negative'} images in this set")
        return res
    point = float(weighted_auc(truth[None], (1 - truth)[None], score)[0])
    rng = np.random.default_rng(seed)
    vals = []
    block = max(1, _BLOCK_CELLS // truth.size)
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        w = cluster_weights(clusters, b, rng)
        vals.append(weighted_auc(w * truth, w * (1 - truth), score))
        done += b
    res.update(_interval(np.concatenate(vals) if vals else np.array([]), point, level))
    return res


def confound_report(d: EvalData, age_groups: Sequence[str], n_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> dict[str, Any]:
    """The source/age confound, measured with p_<positive> (CIs by cluster bootstrap).

    - ``within_adults``: <positive>-vs-rest AUC among adult images only — does the score separate
      the disease when age cannot help?
    - ``adult_vs_pediatric_negatives``: AUC of p_<positive> for telling adult from pediatric
      images *without* the disease — how much the score measures age/source (0.5 = not at all).
    - ``within_pediatric``: the vs-rest AUC among pediatric images, when defined.
    """
    ages = np.array([str(a) for a in age_groups])
    if ages.shape != (d.n,):
        raise ValueError(f"age_groups has {ages.size} values for {d.n} images")
    score = d.probs[:, d.pos]
    is_pos = d.y == d.pos
    adult, ped = ages == "adult", ages == "pediatric"
    neg = ~is_pos & (adult | ped)
    return {
        "positive": d.positive,
        "counts": {g: {"n": int((ages == g).sum()), "positive": int((is_pos & (ages == g)).sum())}
                   for g in ("adult", "pediatric", "")},
        "within_adults": auc_with_ci(is_pos[adult], score[adult], d.clusters[adult], n_resamples, seed),
        "within_pediatric": auc_with_ci(is_pos[ped], score[ped], d.clusters[ped], n_resamples, seed),
        "adult_vs_pediatric_negatives": auc_with_ci(adult[neg], score[neg], d.clusters[neg], n_resamples, seed),
        "mean_score": {f"{g}_{'pos' if p else 'neg'}": (float(score[(ages == g) & (is_pos == p)].mean())
                                                        if ((ages == g) & (is_pos == p)).any() else math.nan)
                       for g in ("adult", "pediatric") for p in (True, False)},
    }


def reliability_bins(d: EvalData, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per confidence bin: mean confidence, accuracy and count (top label) — the reliability diagram."""
    from .calibrate import reliability

    return reliability(d.probs, d.y, bins)


def evaluation_report(d: EvalData, strata: Mapping[str, Sequence[str]] | None = None,
                      age_groups: Sequence[str] | None = None, n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0, min_n: int = 10) -> dict[str, Any]:
    """The whole report as one JSON-able dict: overall metrics with CIs, confusion matrix,
    strata, confound, reliability bins and the bootstrap settings."""
    overall = bootstrap_metrics(d, n_resamples, seed)
    _check_sklearn(d, {k: v["value"] for k, v in overall.items()})
    m = len(d.classes)
    cm = np.zeros((m, m), dtype=np.int64)
    np.add.at(cm, (d.y, d.pred), 1)
    groups = dict(strata or {})
    if age_groups is not None and "age_group" not in groups:
        groups["age_group"] = age_groups
    report: dict[str, Any] = {
        "n": d.n, "patients": d.n_clusters, "classes": list(d.classes), "positive": d.positive,
        "class_counts": {c: int((d.y == i).sum()) for i, c in enumerate(d.classes)},
        "bootstrap": {"resamples": n_resamples, "seed": seed, "level": 0.95, "unit": "patient"
                      if d.n_clusters < d.n else "image", "interval": "percentile", "min_n_for_ci": min_n},
        "metrics": overall,
        "confusion_matrix": {"rows_true_cols_pred": cm.tolist()},
        "reliability": reliability_bins(d),
        "strata": stratified_report(d, groups, n_resamples, seed, min_n) if groups else {},
    }
    if age_groups is not None:
        report["confound"] = confound_report(d, age_groups, n_resamples, seed)
    return report



# --------------------------------------------------------------------------- report files


def _fmt(v: Any, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci(m: Mapping[str, Any], digits: int = 3) -> str:
    """``0.512 [0.455, 0.617]`` (or the value alone when there is no interval)."""
    v = m.get("value")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    lo, hi = m.get("ci_low"), m.get("ci_high")
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return _fmt(v, digits)
    return f"{_fmt(v, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def _auc_reading(auc: Mapping[str, Any], what: str) -> str:
    v, lo, hi = auc.get("value"), auc.get("ci_low"), auc.get("ci_high")
    if v is None or math.isnan(v):
        return f"{what}: cannot be measured on this data ({auc.get('note', 'undefined')})."
    if lo is not None and not math.isnan(lo) and lo > 0.5:
        side = "better than chance (the CI lies above 0.5)"
    elif hi is not None and not math.isnan(hi) and hi < 0.5:
        side = "worse than chance (the CI lies below 0.5)"
    else:
        side = "not distinguishable from chance (the CI contains 0.5)"
    return f"{what}: {_ci(auc)}, {side}."


def report_markdown(report: Mapping[str, Any], title: str = "Evaluation report") -> str:
    """The report as Markdown: headline table, per-class F1, strata tables, confound with a plain reading."""
    pos = report["positive"].lower()
    met = report["metrics"]
    b = report["bootstrap"]
    lines = [f"# {title}", ""]
    src = report.get("source", {})
    if src:
        lines += [f"Predictions: `{src.get('predictions', '')}`; labels: `{src.get('labels', '')}`.", ""]
        skipped = src.get("skipped", {})
        if skipped:
            lines += ["Not evaluated: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ".", ""]
    lines += [
        (f"**{report['n']} images of {report['patients']} patients** "
        f"({', '.join(f'{c} {n}' for c, n in report['class_counts'].items())}). "
        f"95 % CIs: {b['interval']} bootstrap, {b['resamples']} resamples of {b['unit']}s (seed {b['seed']}); "
        "macro-F1 averages the classes present in the truth."), "",
        "| metric | value [95 % CI] |", "|---|---|",
    ]
    for k in ("macro_f1", "accuracy", f"{pos}_auc", "ece"):
        label = {"macro_f1": "macro-F1", "accuracy": "accuracy", f"{pos}_auc": f"{report['positive']}-vs-rest AUC",
                 "ece": f"ECE ({ECE_BINS} bins, top label)"}[k]
        lines.append(f"| {label} | {_ci(met[k])} |")
    lines += ["", "| class | n | F1 [95 % CI] |", "|---|---|---|"]
    for c in report["classes"]:
        lines.append(f"| {c} | {report['class_counts'][c]} | {_ci(met[f'f1_{c}'])} |")
    cm = report["confusion_matrix"]["rows_true_cols_pred"]
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
              "| true \\ pred | " + " | ".join(report["classes"]) + " |",
              "|---|" + "---|" * len(report["classes"])]
    for c, row in zip(report["classes"], cm):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    conf = report.get("confound")
    if conf:
        wa, ap, wp = conf["within_adults"], conf["adult_vs_pediatric_negatives"], conf["within_pediatric"]
        lines += ["", "## Source / age confound", "",
                  "| measure | n (pos / neg) | AUC [95 % CI] |", "|---|---|---|",
                  (f"| {report['positive']} vs rest, adults only | {wa['n']} ({wa['n_positive']} / {wa['n_negative']}) "
                  f"| {_ci(wa)} |"),
                  (f"| {report['positive']} vs rest, pediatric only | {wp['n']} ({wp['n_positive']} / "
                  f"{wp['n_negative']}) | {_ci(wp)} |"),
                  (f"| p_{pos}: adult vs pediatric, non-{report['positive']} images | {ap['n']} ({ap['n_positive']} adult "
                  f"/ {ap['n_negative']} pediatric) | {_ci(ap)} |"), "",
                  "Reading:", "",
                  "- " + _auc_reading(wa, f"Within adults, p_{pos} separates {report['positive']} from the other "
                                          "classes"),
                  "- " + _auc_reading(ap, f"Among images without {report['positive']}, p_{pos} tells adults from "
                                          "children"),
                  ]
        if not math.isnan(ap.get("value", math.nan)) and ap["value"] >= 0.8:
            lines.append(f"- An AUC this high means p_{pos} largely measures age/source: the overall "
                         f"{report['positive']} numbers above are inflated by the confound.")
        if math.isnan(wa.get("value", math.nan)):
            lines.append(f"- Without both {report['positive']} and non-{report['positive']} adults, the overall "
                         f"{report['positive']}-vs-rest AUC cannot be told apart from an adult-vs-child AUC: "
                         "read it as an upper bound on what the model knows about the disease.")
        ms = conf["mean_score"]
        lines += ["", f"Mean p_{pos}: " + ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in ms.items()
                                                    if not math.isnan(v)) + "."]
    for name, rows in report.get("strata", {}).items():
        lines += ["", f"## By {name.replace('_', ' ')}", "",
                  f"| {name} | n | patients | classes | accuracy | macro-F1 | {report['positive']} AUC | mean p_{pos} |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            m = r["metrics"]
            classes = ", ".join(f"{c} {n}" for c, n in r["classes"].items() if n)
            lines.append(f"| {r['stratum']} | {r['n']} | {r['patients']} | {classes} | {_ci(m['accuracy'])} | "
                         f"{_ci(m['macro_f1'])} | {_ci(m[f'{pos}_auc'])} | {_fmt(r[f'mean_p_{pos}'])} |")
        lines.append("")
        lines.append(f"(CIs only for strata with ≥ {b['min_n_for_ci']} images of ≥ 2 patients.)")
    lines += ["", ("Figures: `reliability.png` (reliability diagram), `strata.png` (accuracy per stratum, "
              f"p_{pos} by group)."), ""]
    return "\n".join(lines)


def plot_reliability(report: Mapping[str, Any], path: Any) -> Any:
    """Reliability diagram (accuracy vs confidence per bin, bar width ∝ nothing; counts below)."""
    from .plots import new_figure, save_figure

    rel = report["reliability"]
    edges = np.asarray(rel["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    acc = np.asarray(rel["accuracy"], dtype=float)
    conf = np.asarray(rel["confidence"], dtype=float)
    counts = np.asarray(rel["count"])
    fig = new_figure(5.5, 6.0)
    ax, axc = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    okb = counts > 0
    ax.bar(centres[okb], acc[okb], width=edges[1] - edges[0], edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(conf[okb], acc[okb], "o", color="crimson", markersize=4, label="mean confidence → accuracy")
    ax.set(ylabel="accuracy (top label)", xlim=(0, 1), ylim=(0, 1.02),
           title=f"Reliability, ECE {_ci(report['metrics']['ece'])}")
    ax.legend(fontsize="small", loc="lower right")
    axc.bar(centres, counts, width=edges[1] - edges[0], color="C0", edgecolor="black")
    axc.set(xlabel="confidence (top probability)", ylabel="images")
    return save_figure(fig, path)


def plot_strata(report: Mapping[str, Any], scores: Mapping[str, np.ndarray], path: Any) -> Any:
    """Left: accuracy with 95 % CI per stratum (all groupings); right: p_<positive> by group."""
    from .plots import new_figure, save_figure

    pos = report["positive"].lower()
    labels, vals, los, his = [], [], [], []
    for name, rows in report.get("strata", {}).items():
        for r in rows:
            m = r["metrics"]["accuracy"]
            labels.append(f"{name}: {r['stratum'][:40]} (n={r['n']})")
            vals.append(m["value"])
            los.append(m["ci_low"])
            his.append(m["ci_high"])
    fig = new_figure(12.0, max(3.5, 0.35 * len(labels) + 1.5))
    ax, axs = fig.subplots(1, 2, width_ratios=[1.3, 1])
    if labels:
        yy = np.arange(len(labels))[::-1]
        v = np.asarray(vals, dtype=float)
        lo, hi = np.asarray(los, dtype=float), np.asarray(his, dtype=float)
        err = np.vstack([np.where(np.isnan(lo), 0, v - lo), np.where(np.isnan(hi), 0, hi - v)])
        ax.errorbar(v, yy, xerr=err, fmt="o", capsize=3)
        ax.set_yticks(yy, labels=labels, fontsize="small")
    ax.axvline(report["metrics"]["accuracy"]["value"], color="grey", linestyle="--", linewidth=1, label="overall")
    ax.set(xlim=(0, 1.02), xlabel="accuracy [95 % CI]", title="Accuracy per stratum")
    ax.legend(fontsize="small")
    names = [k for k, s in scores.items() if len(s)]
    data = [np.asarray(scores[k], dtype=float) for k in names]
    if names:
        rng = np.random.default_rng(0)
        for i, s in enumerate(data):
            axs.plot(s, i + 1 + rng.uniform(-0.2, 0.2, s.size), ".", alpha=0.5, markersize=3, color="C1")
            q1, med, q3 = np.quantile(s, [0.25, 0.5, 0.75])
            axs.hlines(i + 1, q1, q3, color="black", linewidth=3)  # interquartile range
            axs.vlines(med, i + 0.7, i + 1.3, color="crimson", linewidth=2)  # median
        axs.set_yticks(range(1, len(names) + 1), labels=[f"{k} (n={len(scores[k])})" for k in names], fontsize="small")
    axs.set(xlim=(-0.02, 1.02), xlabel=f"p_{pos}", title=f"p_{pos} by group")
    return save_figure(fig, path)


def score_groups(d: EvalData, age_groups: Sequence[str]) -> dict[str, np.ndarray]:
    """p_<positive> split by age group × truth (the figure's groups)."""
    ages = np.array([str(a) or "unknown" for a in age_groups])
    is_pos = d.y == d.pos
    s = d.probs[:, d.pos]
    out = {}
    for g in ("pediatric", "adult", "unknown"):
        for p in (False, True):
            sel = (ages == g) & (is_pos == p)
            if sel.any():
                out[f"{g}, {'' if p else 'non-'}{d.positive}"] = s[sel]
    return out


# --------------------------------------------------------------------------- predictions.csv + labels


def _read_rows(path: Any, what: str) -> tuple[list[str], list[dict[str, str]]]:
    import csv
    from pathlib import Path

    from .errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {what} file not found")
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            cols = [c.strip() for c in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{p}: cannot read {what} CSV ({exc})") from None
    rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()} for r in rows]
    return cols, rows


def _stem(name: str) -> str:
    from pathlib import PurePath

    base = PurePath(name.replace("\\", "/")).name
    return base.rsplit(".", 1)[0] if "." in base else base


def load_evaluation(predictions: Any, labels: Any) -> tuple[EvalData, dict[str, list[str]], dict[str, Any]]:
    """Join ``predict``'s predictions.csv to a labels CSV by image file name (stem).

    predictions.csv needs ``file`` (or ``name``), ``status`` and ``p_<class>`` columns (``label``
    is used as the prediction when present, else the argmax). The labels CSV needs ``label`` and
    ``file`` or ``image_id``; ``patient_id`` (clusters), ``source``, ``view``, ``age`` and
    ``age_group`` are used when present. Rows with ``status`` other than ``ok`` and predictions
    without a label are skipped and counted.

    Returns (data, per-image metadata columns, info with counts). Raises DataError.
    """
    from .errors import DataError

    pcols, prows = _read_rows(predictions, "predictions")
    classes = tuple(c[2:] for c in pcols if c.startswith("p_") and len(c) > 2)
    if not classes:
        raise DataError(f"{predictions}: no p_<class> columns (expected predict's predictions.csv: "
                        f"file,name,status,label,confidence,p_<class>...; found {', '.join(pcols) or 'no header'})")
    if "file" not in pcols and "name" not in pcols:
        raise DataError(f"{predictions}: needs a 'file' or 'name' column to join on; found {', '.join(pcols)}")
    lcols, lrows = _read_rows(labels, "labels")
    if "label" not in lcols:
        raise DataError(f"{labels}: no 'label' column; found {', '.join(lcols) or 'no header'}")
    if "file" not in lcols and "image_id" not in lcols:
        raise DataError(f"{labels}: needs a 'file' or 'image_id' column to join on; found {', '.join(lcols)}")
    by_key: dict[str, int] = {}
    for i, r in enumerate(lrows):
        keys = {_stem(r["file"]) if r.get("file") else "", r.get("image_id", "")} - {""}
        for key in keys:
            if key in by_key and by_key[key] != i:
                raise DataError(f"{labels}: the image name {key!r} appears in rows {by_key[key] + 2} and {i + 2}; "
                                "names must be unique to join predictions")
            by_key[key] = i
    lowered = [c.lower() for c in classes]
    skipped: Counter[str] = Counter()
    y, pred, probs, picked = [], [], [], []
    seen: set[int] = set()
    for j, r in enumerate(prows):
        status = r.get("status", "ok") or "ok"
        if status != "ok":
            skipped[f"status {status}"] += 1
            continue
        key = _stem(r["file"]) if r.get("file") else r.get("name", "")
        i = by_key.get(key, by_key.get(r.get("name", ""), -1))
        if i < 0:
            skipped["no label"] += 1
            continue
        if i in seen:
            raise DataError(f"{predictions}, row {j + 2}: image {key!r} is predicted twice")
        seen.add(i)
        lab = lrows[i]["label"].lower()
        if lab not in lowered:
            raise DataError(f"{labels}, row {i + 2}: label {lrows[i]['label']!r} is not one of the predicted classes "
                            f"({', '.join(classes)})")
        try:
            p = [float(r[f"p_{c}"]) for c in classes]
        except (KeyError, ValueError):
            raise DataError(f"{predictions}, row {j + 2}: status ok but p_<class> values are missing or not "
                            "numbers") from None
        if not all(math.isfinite(v) for v in p):
            raise DataError(f"{predictions}, row {j + 2}: non-finite probability")
        plab = (r.get("label") or "").lower()
        y.append(lowered.index(lab))
        pred.append(lowered.index(plab) if plab in lowered else int(np.argmax(p)))
        probs.append(p)
        picked.append(i)
    n_ok = sum(1 for r in prows if (r.get("status", "ok") or "ok") == "ok")
    if not prows:
        raise DataError(f"{predictions}: no prediction rows")
    if not picked:
        if n_ok == 0:
            raise DataError(f"{predictions}: no row has status ok ({dict(skipped)}); nothing to evaluate")
        raise DataError(f"no overlap between {predictions} and {labels}: none of the {n_ok} predicted image names "
                        f"(e.g. {_stem(prows[0].get('file') or prows[0].get('name', ''))!r}) is a file stem or "
                        "image_id in the labels")
    meta_cols = ("image_id", "file", "patient_id", "source", "view", "sex", "age", "age_group", "finding")
    meta = {c: [lrows[i].get(c, "") for i in picked] for c in meta_cols}
    if not any(meta["image_id"]):
        meta["image_id"] = [_stem(f) for f in meta["file"]]
    ages = [lrows[i].get("age_group", "").lower() or sample_age_group(lrows[i].get("image_id", "") or
                                                                        _stem(lrows[i].get("file", "")),
                                                                        lrows[i].get("patient_id", ""),
                                                                        lrows[i].get("source", ""),
                                                                        lrows[i].get("age", ""))
            for i in picked]
    meta["age_group"] = ages
    has_patients = "patient_id" in lcols and all(meta["patient_id"])
    clusters = np.array(meta["patient_id"] if has_patients else meta["image_id"], dtype=object)
    data = EvalData(np.array(y), np.array(probs), classes, np.array(pred), clusters)
    info = {"predictions": str(predictions), "labels": str(labels), "prediction_rows": len(prows),
            "evaluated": len(picked), "skipped": dict(skipped), "labels_not_predicted": len(lrows) - len(picked),
            "clustered_by": "patient_id" if has_patients else "image (no patient_id column)",
            "strata_columns": [c for c in ("source", "view") if c in lcols]}
    return data, meta, info


def build_evaluation(predictions: Any, labels: Any, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     min_n: int = 10) -> tuple[dict[str, Any], EvalData, dict[str, list[str]]]:
    """Join predictions to labels and compute the whole report (nothing written). Raises DataError."""
    data, meta, info = load_evaluation(predictions, labels)
    strata = {c: meta[c] for c in info["strata_columns"]}
    report = evaluation_report(data, strata, meta["age_group"], n_resamples, seed, min_n)
    return {"source": info, **report}, data, meta


def write_evaluation(report: Mapping[str, Any], data: EvalData, meta: Mapping[str, Sequence[str]],
                     path_of: Callable[[str], Any]) -> list[Any]:
    """Write report.json, report.md, reliability.png and strata.png (atomically) at ``path_of(name)``."""
    from ._files import write_json, write_text

    return [write_json(path_of("report.json"), report),
            write_text(path_of("report.md"), report_markdown(report)),
            plot_reliability(report, path_of("reliability.png")),
            plot_strata(report, score_groups(data, meta["age_group"]), path_of("strata.png"))]


def evaluate_files(predictions: Any, labels: Any, out_dir: Any, n_resamples: int = DEFAULT_RESAMPLES,
                   seed: int = 0, min_n: int = 10) -> dict[str, Any]:
    """Library form of ``patchflannel evaluate``: report files in ``out_dir``; returns the report."""
    from pathlib import Path

    report, data, meta = build_evaluation(predictions, labels, n_resamples, seed, min_n)
    write_evaluation(report, data, meta, lambda name: Path(out_dir) / name)
    return report
