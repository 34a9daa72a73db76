"""Ensemble stage: combine N learners' class distributions into one prediction.

Every combiner takes ``P: (B,N,M) float`` — for each of B images, the class
distribution ``P_i ∈ R^M`` of each of N base learners — and returns scores
``(B,M)``. The FLANNEL weight module learns one weight per learner *per image*
from the learners' joint output; the baselines (soft/hard voting, stacking
MLP) are here too so that all of them are trained and evaluated the same way
by :func:`fit_combiner`.

This module is a leaf: it imports torch and numpy only.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import WeightedRandomSampler

logger = logging.getLogger(__name__)

__all__ = [
    "FitResult",
    "FlannelWeights",
    "StackingMLP",
    "class_balanced_alpha",
    "combiner_logits",
    "fit_combiner",
    "focal_loss",
    "hard_vote",
    "macro_f1",
    "minority_class_weights",
    "soft_vote",
]

LossName = Literal["focal", "ce", "weighted_ce"]


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


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def macro_f1(y_true: Tensor, y_pred: Tensor, n_classes: int) -> float:
    """Macro-F1 over all ``n_classes`` (absent classes count as F1 = 0).

    Same value as sklearn's ``f1_score(labels=range(M), average="macro",
    zero_division=0)``; kept here so this module stays a torch-only leaf.
    y_true, y_pred: (n,) int.
    """
    y_true = y_true.long().flatten().cpu()
    y_pred = y_pred.long().flatten().cpu()
    cm = torch.bincount(y_true * n_classes + y_pred, minlength=n_classes**2).reshape(n_classes, n_classes)
    tp = cm.diag().double()
    denom = 2 * tp + (cm.sum(0) - cm.diag()) + (cm.sum(1) - cm.diag())  # 2TP + FP + FN
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return float(f1.mean())


@dataclass
class FitResult:
    """Outcome of :func:`fit_combiner`; ``model`` holds the best-validation state.

    ``history`` has one entry per epoch in each of ``epoch`` (1-based),
    ``train_loss``, ``val_loss`` and ``val_macro_f1``.
    """

    model: nn.Module
    best_epoch: int
    best_val_macro_f1: float
    best_val_loss: float
    stopped_early: bool
    class_weights: Tensor | None = None
    history: dict[str, list[float]] = field(default_factory=dict)


def _as_inputs(P: Tensor | np.ndarray, y: Tensor | np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    P_t = torch.as_tensor(P, dtype=torch.float32).to(device)
    y_t = torch.as_tensor(y).long().to(device)
    _check_P(P_t)
    if y_t.shape != (P_t.shape[0],):
        raise ValueError(f"labels must be ({P_t.shape[0]},) to match P, got {tuple(y_t.shape)}")
    if y_t.numel() == 0:
        raise ValueError("cannot fit or validate on zero samples")
    if int(y_t.min()) < 0 or int(y_t.max()) >= P_t.shape[2]:
        raise ValueError(f"labels must lie in [0, {P_t.shape[2]}), got [{int(y_t.min())}, {int(y_t.max())}]")
    if not torch.isfinite(P_t).all():
        raise ValueError("P contains NaN or inf; check the learners' outputs")
    return P_t, y_t


@torch.no_grad()
def _evaluate(
    model: nn.Module, P: Tensor, y: Tensor, criterion_weights: Tensor | None, gamma: float, batch_size: int
) -> tuple[float, float]:
    model.eval()
    z = torch.cat([combiner_logits(model, P[i : i + batch_size]) for i in range(0, P.shape[0], batch_size)])
    loss = float(focal_loss(z, y, criterion_weights, gamma))
    return loss, macro_f1(y, z.argmax(dim=1), P.shape[2])


def fit_combiner(
    model: nn.Module,
    P_train: Tensor | np.ndarray,
    y_train: Tensor | np.ndarray,
    P_val: Tensor | np.ndarray,
    y_val: Tensor | np.ndarray,
    *,
    loss: LossName = "focal",
    gamma: float = 2.0,
    alpha: Tensor | Literal["balanced"] | None = "balanced",
    beta: float = 2.0,
    resample: bool = False,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 64,
    patience: int = 10,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FitResult:
    """Train a combiner with Adam and early stopping on validation macro-F1.

    Args:
        model: returns logits ``(B,M)`` or ``(z, w)`` from ``P: (B,N,M)``.
            Construct it under a fixed ``torch.manual_seed`` for a reproducible
            initialisation; ``seed`` here fixes batch order, resampling and
            dropout (without touching the global RNG state).
        P_train, P_val: (n,N,M) float learner distributions (out-of-fold!).
        y_train, y_val: (n,) int class indices.
        loss: ``"focal"`` (uses ``gamma`` and ``alpha``), ``"ce"`` (plain
            cross-entropy) or ``"weighted_ce"`` (cross-entropy with
            :func:`minority_class_weights` of ``y_train`` and ``beta``).
            All reduce by the mean over the batch.
        alpha: focal only — ``"balanced"`` for :func:`class_balanced_alpha` of
            ``y_train``, an (M,) tensor used as given, or ``None`` (ones).
        resample: draw each epoch's n training samples with replacement with
            probability ∝ 1/count(class) (``WeightedRandomSampler``).
        patience: stop after this many epochs without a better validation
            macro-F1 (ties broken by lower validation loss).
        device: everything runs there; inputs may live anywhere.

    Returns:
        :class:`FitResult` whose ``model`` has the best epoch's state loaded
        and is in eval mode.
    """
    if loss not in ("focal", "ce", "weighted_ce"):
        raise ValueError(f"loss must be one of 'focal', 'ce', 'weighted_ce', got {loss!r}")
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError(f"epochs, batch_size and patience must be >= 1, got {epochs}, {batch_size}, {patience}")
    device = torch.device(device)
    P_tr, y_tr = _as_inputs(P_train, y_train, device)
    P_va, y_va = _as_inputs(P_val, y_val, device)
    n_classes = P_tr.shape[2]
    if P_va.shape[1:] != P_tr.shape[1:]:
        raise ValueError(f"train P is (n,{P_tr.shape[1]},{P_tr.shape[2]}) but val P is {tuple(P_va.shape)}")

    # One loss function for all three options: CE is the focal loss with γ = 0
    # and α = 1, weighted CE the same with per-class weights — so all reduce
    # by the plain batch mean, as the focal loss does.
    weights: Tensor | None
    if loss == "focal":
        if isinstance(alpha, str):
            if alpha != "balanced":
                raise ValueError(f"alpha must be 'balanced', a tensor or None, got {alpha!r}")
            weights = class_balanced_alpha(y_tr, n_classes)
        else:
            weights = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        g = float(gamma)
    elif loss == "weighted_ce":
        weights, g = minority_class_weights(y_tr, n_classes, beta), 0.0
    else:
        weights, g = None, 0.0
    if loss != "focal" and isinstance(alpha, Tensor):
        logger.warning("alpha is only used by loss='focal'; ignoring it for loss=%r", loss)
    if weights is not None:
        weights = weights.to(device)

    gen = torch.Generator().manual_seed(seed)
    n = P_tr.shape[0]
    sampler: WeightedRandomSampler | None = None
    if resample:
        counts = torch.bincount(y_tr.cpu(), minlength=n_classes).double()
        sample_w = (1.0 / counts.clamp_min(1))[y_tr.cpu()]
        sampler = WeightedRandomSampler(sample_w, num_samples=n, replacement=True, generator=gen)

    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "val_loss": [], "val_macro_f1": []}
    best = (-math.inf, math.inf)  # (macro-F1, val loss); compare F1 first
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, since_best, stopped_early = 0, 0, False

    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.tensor(list(sampler)) if sampler is not None else torch.randperm(n, generator=gen)
            order = order.to(device)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                batch_loss = focal_loss(combiner_logits(model, P_tr[idx]), y_tr[idx], weights, g)
                if not torch.isfinite(batch_loss):
                    raise FloatingPointError(
                        f"non-finite training loss at epoch {epoch}; lower lr (now {lr}) or check P for NaN"
                    )
                opt.zero_grad(set_to_none=True)
                batch_loss.backward()
                opt.step()
                total += float(batch_loss.detach()) * idx.numel()
            val_loss, val_f1 = _evaluate(model, P_va, y_va, weights, g, max(batch_size, 1024))
            for key, value in zip(history, (epoch, total / n, val_loss, val_f1)):
                history[key].append(float(value))
            logger.debug("epoch %d train %.4f val %.4f macro-F1 %.4f", epoch, total / n, val_loss, val_f1)

            if val_f1 > best[0] or (val_f1 == best[0] and val_loss < best[1]):
                best, best_epoch, since_best = (val_f1, val_loss), epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
                if since_best >= patience:
                    stopped_early = True
                    break

    model.load_state_dict(best_state)
    model.eval()
    logger.info("best epoch %d of %d: val macro-F1 %.4f, val loss %.4f", best_epoch, epoch, best[0], best[1])
    return FitResult(
        model=model,
        best_epoch=best_epoch,
        best_val_macro_f1=best[0],
        best_val_loss=best[1],
        stopped_early=stopped_early,
        class_weights=None if weights is None else weights.cpu(),
        history=history,
    )
