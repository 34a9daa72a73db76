"""Ensemble stage: combine N learners' class distributions into one prediction.

Every combiner takes ``P: (B,N,M) float`` — for each of B images, the class
distribution ``P_i ∈ R^M`` of each of N base learners — and returns scores
``z: (B,M)`` whose softmax is the prediction (:func:`combiner_logits`; FLANNEL
also returns its per-image learner weights). The FLANNEL weight module learns
one weight per learner *per image* from the learners' joint output; the
baselines (soft/hard voting, stacking MLP) live here too, in one registry
(:data:`COMBINERS`, :func:`build_combiner`), so that all of them are trained,
evaluated, saved and loaded the same way.

Imports torch and numpy, and the weights format (:mod:`patchflannel.hub`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import WeightsError
from .hub import load_pretrained, load_state_dict, save_pretrained

logger = logging.getLogger(__name__)

__all__ = [
    "COMBINERS",
    "FlannelWeights",
    "HardVoting",
    "SoftVoting",
    "StackingMLP",
    "build_combiner",
    "class_balanced_alpha",
    "combiner_logits",
    "focal_loss",
    "hard_vote",
    "load_combiner",
    "macro_f1",
    "minority_class_weights",
    "save_combiner",
    "soft_vote",
]


def _check_P(P: Tensor, n_learners: int | None = None, n_classes: int | None = None) -> None:
    if P.ndim != 3:
        raise ValueError(f"P must be (B,N,M) learner distributions, got shape {tuple(P.shape)}")
    if n_learners is not None and P.shape[1] != n_learners:
        raise ValueError(f"P has {P.shape[1]} learners on dim 1 but the model was built for {n_learners}")
    if n_classes is not None and P.shape[2] != n_classes:
        raise ValueError(f"P has {P.shape[2]} classes on dim 2 but the model was built for {n_classes}")


# --------------------------------------------------------------------------- #
# FLANNEL weight module
# --------------------------------------------------------------------------- #
class FlannelWeights(nn.Module):
    """FLANNEL neural weight module.

    ``f = concat(P_1..P_N) ∈ R^{NM}``, ``w = tanh(Dense(vec(f fᵀ))) ∈ (-1,1)^N``
    and ``z = Σ_i w_i P_i``. The prediction is ``ŷ = softmax(z)``; ``forward``
    returns the scores ``z`` (use them as logits, e.g. in :func:`focal_loss`)
    and the weights ``w``. Weights may be negative: a learner that is reliably
    wrong on some inputs can be voted against.

    Args:
        n_learners: N.
        n_classes: M.
        hidden: ``None`` for the paper's single Dense layer; an int inserts one
            hidden ReLU layer of that width before the output layer.
        init_weight: every learner's weight at initialisation (see below).
    """

    def __init__(
        self,
        n_learners: int,
        n_classes: int,
        hidden: int | None = None,
        *,
        init_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if n_learners < 1 or n_classes < 2:
            raise ValueError(f"need n_learners >= 1 and n_classes >= 2, got {n_learners}, {n_classes}")
        if not -1.0 < init_weight < 1.0:
            raise ValueError(f"init_weight must lie in (-1, 1) (it is a tanh output), got {init_weight}")
        if hidden is not None and hidden < 1:
            raise ValueError(f"hidden must be None or >= 1, got {hidden}")
        self.n_learners = n_learners
        self.n_classes = n_classes
        d = (n_learners * n_classes) ** 2
        layers: list[nn.Module] = []
        if hidden is not None:
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        out = nn.Linear(d, n_learners)
        # Why not the default init: with w = tanh(0) = 0 every image would start
        # at z = 0, the uniform prediction — a poor starting point that throws
        # away the learners. Instead the output bias is atanh(init_weight), so
        # training starts at soft voting (every w_i = 0.5 gives argmax ŷ =
        # argmax Σ P_i) in the non-saturated part of tanh (tanh' = 0.75), and
        # the input-dependent part starts small (std 0.01; the features are
        # products of probabilities, Σ f_j² f_k² ≤ N², so it adds ≤ 0.01·N)
        # but non-zero, so every parameter, including a hidden layer's, gets
        # a gradient from the first step.
        nn.init.normal_(out.weight, std=0.01)
        nn.init.constant_(out.bias, math.atanh(init_weight))
        layers.append(out)
        self.dense = nn.Sequential(*layers)

    def forward(self, P: Tensor) -> tuple[Tensor, Tensor]:
        """P: (B,N,M) float → (z: (B,M) scores with ŷ = softmax(z), w: (B,N) in (-1,1))."""
        _check_P(P, self.n_learners, self.n_classes)
        f = P.flatten(1)  # (B, NM)
        outer = (f.unsqueeze(2) * f.unsqueeze(1)).flatten(1)  # (B, (NM)^2)
        w = torch.tanh(self.dense(outer))
        z = torch.einsum("bn,bnm->bm", w, P)
        return z, w


# --------------------------------------------------------------------------- #
# Losses and class weights
# --------------------------------------------------------------------------- #
def focal_loss(z: Tensor, y: Tensor, alpha: Tensor | None = None, gamma: float = 2.0) -> Tensor:
    """Multi-class focal loss ``mean_b [ -α_{y_b} (1 - ŷ_{b,y_b})^γ log ŷ_{b,y_b} ]``.

    Args:
        z: (B,M) float logits/scores; ``ŷ = softmax(z)`` is computed internally
            with ``log_softmax`` for stability.
        y: (B,) int64 class indices.
        alpha: (M,) per-class weights, used as given (not re-normalised, so
            ``alpha = ones`` and ``gamma = 0`` is exactly cross-entropy);
            ``None`` means all ones. Moved to z's device and dtype.
        gamma: focusing parameter ≥ 0; larger down-weights easy examples more.

    Returns:
        0-d tensor: the mean over the batch (not an α-weighted mean).
    """
    if z.ndim != 2 or y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"expected z (B,M) and y (B,), got {tuple(z.shape)} and {tuple(y.shape)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    # Half precision loses too much in log(1 - p); compute in float32 under AMP.
    zc = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    y = y.to(device=zc.device, dtype=torch.long)
    logp = F.log_softmax(zc, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)  # (B,)
    loss = -logp
    if gamma != 0:
        # 1 - exp(logp) via expm1 keeps precision for confident predictions; the
        # floor avoids an infinite gradient of x^γ at x = 0 when γ < 1.
        one_minus_p = (-torch.expm1(logp)).clamp_min(torch.finfo(zc.dtype).tiny)
        loss = loss * one_minus_p.pow(gamma)
    if alpha is not None:
        alpha = torch.as_tensor(alpha).to(device=zc.device, dtype=zc.dtype)
        if alpha.shape != (zc.shape[1],):
            raise ValueError(f"alpha must have shape ({zc.shape[1]},), got {tuple(alpha.shape)}")
        loss = loss * alpha[y]
    return loss.mean()


def _class_counts(y: Tensor | np.ndarray, n_classes: int) -> Tensor:
    y = torch.as_tensor(y).long().flatten()
    if y.numel() == 0:
        raise ValueError("cannot compute class weights from an empty label vector")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return torch.bincount(y, minlength=n_classes)


def class_balanced_alpha(y: Tensor | np.ndarray, n_classes: int) -> Tensor:
    """Focal-loss α: inverse class frequency of ``y``, normalised to sum to 1.

    A class absent from ``y`` gets α = 0 (logged as a warning): its α never
    multiplies a training term anyway, and giving it mass would only shrink
    the weights of the classes that are present.

    Args:
        y: (n,) int class indices in [0, n_classes).
    Returns:
        (M,) float32 on y's device (CPU for numpy input).
    """
    counts = _class_counts(y, n_classes).float()
    inv = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    absent = (counts == 0).nonzero().flatten().tolist()
    if absent:
        logger.warning("classes %s are absent from the labels; their focal-loss alpha is 0", absent)
    return inv / inv.sum()


def minority_class_weights(y: Tensor | np.ndarray, n_classes: int, beta: float) -> Tensor:
    """Class weights for the "weighted cross-entropy" baseline.

    The minority class — the smallest non-zero count in ``y`` (every class tied
    for smallest) — gets weight ``beta``, every other class 1.

    Returns:
        (M,) float32 on y's device (CPU for numpy input).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    counts = _class_counts(y, n_classes)
    present = counts > 0
    smallest = counts[present].min()
    weights = torch.ones(n_classes, dtype=torch.float32, device=counts.device)
    weights[present & (counts == smallest)] = float(beta)
    return weights


# --------------------------------------------------------------------------- #
# Baselines
# --------------------------------------------------------------------------- #
def soft_vote(P: Tensor) -> Tensor:
    """Mean of the learners' distributions. P: (B,N,M) → (B,M)."""
    _check_P(P)
    return P.mean(dim=1)


def hard_vote(P: Tensor) -> Tensor:
    """Majority vote over the learners' argmax classes. P: (B,N,M) → (B,M).

    The result is a distribution whose argmax is the majority class; ties in
    the vote count are broken by the larger summed probability (then by the
    lower class index, as ``argmax`` does). It is built as
    ``votes/N + soft/(N+1)`` renormalised: vote fractions differ in steps of
    1/N and the soft-vote term differs by less than 1/(N+1), so the vote
    always dominates while the soft term only orders ties — and the scores
    stay graded enough for ROC curves.
    """
    _check_P(P)
    n, m = P.shape[1], P.shape[2]
    votes = F.one_hot(P.argmax(dim=2), m).to(P.dtype).sum(dim=1) / n  # (B,M)
    scores = votes + P.mean(dim=1) / (n + 1)
    return scores / scores.sum(dim=1, keepdim=True)


class StackingMLP(nn.Module):
    """Stacking baseline: an MLP on the flattened learner outputs.

    ``(B,N,M) → flatten (B,NM) → [Linear → ReLU] × hidden_layers → Linear → (B,M) logits``.
    """

    def __init__(
        self, n_learners: int, n_classes: int, hidden_layers: int = 1, width: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if hidden_layers < 1:
            raise ValueError(f"hidden_layers must be >= 1 (the paper uses 1 and 2), got {hidden_layers}")
        self.n_learners = n_learners
        self.n_classes = n_classes
        layers: list[nn.Module] = []
        d = n_learners * n_classes
        for _ in range(hidden_layers):
            layers += [nn.Linear(d, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = width
        layers.append(nn.Linear(d, n_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, P: Tensor) -> Tensor:
        """P: (B,N,M) float → (B,M) logits."""
        _check_P(P, self.n_learners, self.n_classes)
        return self.mlp(P.flatten(1))


def combiner_logits(model: nn.Module, P: Tensor) -> Tensor:
    """Scores (B,M) of any combiner: the first element if it returns ``(z, w)``."""
    out = model(P)
    return out[0] if isinstance(out, (tuple, list)) else out


class SoftVoting(nn.Module):
    """Mean of the learners' distributions; scores ``log(mean P)``."""

    def __init__(self, n_learners: int, n_classes: int) -> None:
        super().__init__()
        self.n_learners, self.n_classes = n_learners, n_classes

    def forward(self, P: Tensor) -> Tensor:
        _check_P(P, self.n_learners, self.n_classes)
        return soft_vote(P).clamp_min(1e-8).log()


class HardVoting(SoftVoting):
    """Majority vote (ties by summed probability, see :func:`hard_vote`); scores ``log`` of that distribution."""

    def forward(self, P: Tensor) -> Tensor:
        _check_P(P, self.n_learners, self.n_classes)
        return hard_vote(P).clamp_min(1e-8).log()


def macro_f1(y_true: Tensor, y_pred: Tensor, n_classes: int) -> float:
    """Macro-F1 over all ``n_classes`` (absent classes count as F1 = 0).

    Same value as sklearn's ``f1_score(labels=range(M), average="macro",
    zero_division=0)``; kept here so that training loops need no sklearn.
    y_true, y_pred: (n,) int.
    """
    y_true = y_true.long().flatten().cpu()
    y_pred = y_pred.long().flatten().cpu()
    cm = torch.bincount(y_true * n_classes + y_pred, minlength=n_classes**2).reshape(n_classes, n_classes)
    tp = cm.diag().double()
    denom = 2 * tp + (cm.sum(0) - cm.diag()) + (cm.sum(1) - cm.diag())  # 2TP + FP + FN
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return float(f1.mean())


#: Registry of combiners: name → class built as ``cls(n_learners, n_classes, **options)``.
COMBINERS: dict[str, type[nn.Module]] = {
    "flannel": FlannelWeights,
    "stacking": StackingMLP,
    "soft_voting": SoftVoting,
    "hard_voting": HardVoting,
}


def build_combiner(name: str, n_learners: int, n_classes: int, **options: Any) -> nn.Module:
    """A combiner from :data:`COMBINERS`; options left at None are dropped."""
    try:
        cls = COMBINERS[name]
    except KeyError:
        raise ValueError(f"unknown combiner {name!r}; valid names: {', '.join(COMBINERS)}") from None
    return cls(n_learners, n_classes, **{k: v for k, v in options.items() if v is not None})


def save_combiner(model: nn.Module, directory: str | os.PathLike[str], name: str, options: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> Path:
    """Save a combiner (``config.json`` names it in :data:`COMBINERS` with its options)."""
    cfg = {"task": "combiner", "combiner": name, "n_learners": int(model.n_learners),
           "n_classes": int(model.n_classes), "options": options, **(extra or {})}
    return save_pretrained(directory, model, cfg)


def load_combiner(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a combiner saved by :func:`save_combiner` (eval mode) and its config."""
    state, cfg = load_pretrained(path, task="combiner")
    try:
        model = build_combiner(cfg["combiner"], int(cfg["n_learners"]), int(cfg["n_classes"]), **(cfg.get("options") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: not a usable combiner config ({exc})") from None
    load_state_dict(model, state, path)
    return model.to(device).eval(), cfg
