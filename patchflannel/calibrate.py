"""Calibration: make the ensemble's probabilities mean what they say.

A :class:`Calibrator` maps a combiner's scores ``z (B,M)`` to calibrated
logits; the prediction is ``softmax`` of them:

* ``temperature``: ``z / T`` (one scalar; keeps the argmax, so labels do not change);
* ``vector``: ``a ⊙ z + b`` (per-class scale and bias; may change labels);
* ``none``: ``z`` unchanged.

Both are fitted by minimising the negative log-likelihood on *out-of-fold*
outputs (images whose learners never saw their patient) with L-BFGS, and are
shipped with the ensemble. The metrics used to judge them — top-label
expected calibration error (15 equal-width bins), its floor on a finite
test set (:func:`ece_noise_floor`), Brier score and the reliability curve —
are here too.

Leaf module: imports torch and numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Calibrator", "brier_score", "ece_noise_floor", "expected_calibration_error", "fit_calibrator", "reliability"]


@dataclass
class Calibrator:
    """``kind`` ∈ {none, temperature, vector}; ``temperature`` or per-class ``scale``/``bias``."""

    kind: str = "none"
    temperature: float = 1.0
    scale: list[float] = field(default_factory=list)
    bias: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ("none", "temperature", "vector"):
            raise ValueError(f"calibration kind must be none, temperature or vector, got {self.kind!r}")
        if self.kind == "temperature" and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")

    def __call__(self, z: Tensor) -> Tensor:
        """Scores (B,M) → calibrated logits (B,M)."""
        if self.kind == "temperature":
            return z / self.temperature
        if self.kind == "vector":
            a = torch.tensor(self.scale, dtype=z.dtype, device=z.device)
            b = torch.tensor(self.bias, dtype=z.dtype, device=z.device)
            return z * a + b
        return z

    def probabilities(self, z: Tensor | np.ndarray) -> np.ndarray:
        """Scores → calibrated probabilities (float64 numpy)."""
        zt = torch.as_tensor(np.asarray(z), dtype=torch.float64)
        return torch.softmax(self(zt), dim=-1).numpy()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "temperature": self.temperature, "scale": self.scale, "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Calibrator:
        d = d or {}
        return cls(str(d.get("kind", "none")), float(d.get("temperature", 1.0)), list(d.get("scale") or []),
                   list(d.get("bias") or []))


def fit_calibrator(z: Tensor | np.ndarray, y: Tensor | np.ndarray, kind: str = "temperature",
                   max_iter: int = 200) -> Calibrator:
    """Fit ``kind`` on scores ``z (n,M)`` and labels ``y (n,)`` by minimising NLL (L-BFGS, float64)."""
    if kind == "none":
        return Calibrator("none")
    zt = torch.as_tensor(np.asarray(z), dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if zt.ndim != 2 or yt.shape != (zt.shape[0],) or zt.shape[0] == 0:
        raise ValueError(f"expected z (n,M) and y (n,), got {tuple(zt.shape)} and {tuple(yt.shape)}")
    if not torch.isfinite(zt).all():
        raise ValueError("scores contain NaN or inf")
    m = zt.shape[1]
    if kind == "temperature":
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        params = [log_t]

        def logits() -> Tensor:
            return zt / log_t.exp()
    elif kind == "vector":
        log_a = torch.zeros(m, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(m, dtype=torch.float64, requires_grad=True)
        params = [log_a, b]

        def logits() -> Tensor:
            return zt * log_a.exp() + b
    else:
        raise ValueError(f"calibration kind must be none, temperature or vector, got {kind!r}")
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits(), yt)
        loss.backward()
        return loss

    opt.step(closure)
    if kind == "temperature":
        return Calibrator("temperature", temperature=float(log_t.detach().exp()))
    return Calibrator("vector", scale=log_a.detach().exp().tolist(), bias=b.detach().tolist())


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: Σ_bins (n_b / n) |accuracy_b − confidence_b| over ``bins`` equal-width confidence bins."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def ece_noise_floor(probs: np.ndarray, bins: int = 15, n_sim: int = 2000, seed: int = 0,
                    observed: float | None = None) -> dict[str, float]:
    """ECE a *perfectly calibrated* model would show on these images: labels drawn from ``probs`` itself.

    Top-label ECE is biased upwards on small sets (each bin's accuracy is a noisy mean), so an
    observed ECE is only read against this floor: median and 95 % range over ``n_sim`` draws, the
    share of draws at or below 0.05, and with ``observed`` the share at or above it (a p-value for
    "perfectly calibrated"; ECE has little power on small sets, the mean confidence − accuracy gap more).
    """
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    sims = np.empty(n_sim)
    for i in range(n_sim):
        y = np.minimum((rng.random((len(probs), 1)) > cum).sum(axis=1), probs.shape[1] - 1)
        sims[i] = expected_calibration_error(probs, y, bins)
    out = {"median": float(np.median(sims)), "low": float(np.quantile(sims, 0.025)),
           "high": float(np.quantile(sims, 0.975)), "share_at_most_0.05": float(np.mean(sims <= 0.05)),
           "n_images": int(len(probs)), "n_sim": int(n_sim)}
    if observed is not None:
        out["observed"] = float(observed)
        out["p_observed_or_more"] = float(np.mean(sims >= observed))
    return out


def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of Σ_m (p_m − 1[y = m])² (0 is perfect, 2 the worst)."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(y)]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Per confidence bin: mean confidence, accuracy and count (top label), for a reliability diagram."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out: dict[str, list[float]] = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        sel = which == b
        out["confidence"].append(float(conf[sel].mean()) if sel.any() else math.nan)
        out["accuracy"].append(float(correct[sel].mean()) if sel.any() else math.nan)
        out["count"].append(int(sel.sum()))
    return out
