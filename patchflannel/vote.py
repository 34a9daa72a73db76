"""Patch voting: K per-patch predictions of one learner → its distribution P_i.

``predict_distribution`` runs a learner over all B×K crops in large chunks;
``vote`` turns the resulting (B,K,M) logits into per-image hard-vote fractions
and mean softmax.

Leaf module: imports only torch and the standard library.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["vote", "predict_distribution"]

logger = logging.getLogger(__name__)


def vote(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image vote over its K patches.

    Args:
        logits: (B,K,M) float, K ≥ 1 patch predictions per image, finite.

    Returns:
        (hard, soft), both (B,M) float32 on the logits' device:
        hard[b,m] = fraction of image b's K patches whose argmax is class m
        (ties go to the lowest class index, as ``torch.argmax``);
        soft[b,m] = mean over the K patches of softmax(logits)[m].
        Rows of both sum to 1.
    """
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (B,K,M), got {shape}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    if logits.shape[1] < 1 or logits.shape[2] < 1:
        raise ValueError(f"need K >= 1 patches and M >= 1 classes, got shape {tuple(logits.shape)}")
    # A NaN would make argmax arbitrary and poison the softmax silently.
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or inf; check the learner's output")
    n_classes = logits.shape[2]
    # float32 so half-precision logits (mixed precision) give exact fractions
    # and a well-normalised softmax.
    logits = logits.float()
    hard = F.one_hot(logits.argmax(dim=2), n_classes).float().mean(dim=1)
    soft = logits.softmax(dim=2).mean(dim=1)
    return hard, soft


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


def predict_distribution(
    model: nn.Module,
    crops: Tensor,
    chunk_size: int = 256,
    amp: bool = False,
) -> Tensor:
    """Run `model` over every crop, at most `chunk_size` crops per forward.

    Args:
        model: maps (N,C,P,P) float in [0,1] to (N,M) logits (e.g. a learner
            from ``patchflannel.learners.create_learner``). Put in eval mode for
            the call (BatchNorm running stats, no dropout, so results do not
            depend on chunking) and restored to its previous mode afterwards.
        crops: (B,K,C,P,P) float in [0,1], or uint8 in [0,255] (converted per
            chunk, so a uint8 batch never exists in float all at once).
        chunk_size: crops per forward; bounds activation memory.
        amp: run under ``torch.autocast`` on the model's device (mixed precision
            on CUDA); logits are returned in float32 regardless.

    Returns:
        logits: (B,K,M) float32 on the model's device.
    """
    if not isinstance(crops, Tensor) or crops.ndim != 5:
        shape = tuple(crops.shape) if isinstance(crops, Tensor) else type(crops).__name__
        raise ValueError(f"crops must have shape (B,K,C,P,P), got {shape}")
    if not (crops.dtype.is_floating_point or crops.dtype == torch.uint8):
        raise ValueError(f"crops must be float in [0,1] or uint8, got {crops.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    batch, n_patches = crops.shape[:2]
    flat = crops.reshape(batch * n_patches, *crops.shape[2:])
    device = _model_device(model, crops.device)
    autocast = torch.autocast(device_type=device.type) if amp else nullcontext()

    was_training = model.training
    model.eval()
    outputs: list[Tensor] = []
    try:
        with torch.inference_mode(), autocast:
            for start in range(0, flat.shape[0], chunk_size):
                chunk = flat[start : start + chunk_size].to(device, non_blocking=True)
                if chunk.dtype == torch.uint8:
                    chunk = chunk.float().div_(255.0)
                out = model(chunk)
                if out.ndim != 2 or out.shape[0] != chunk.shape[0]:
                    raise ValueError(f"model must return (N,M) logits, got {tuple(out.shape)} for N={chunk.shape[0]}")
                outputs.append(out.float())
    finally:
        model.train(was_training)
    if not outputs:
        # B·K = 0: the class count is unknowable without a forward pass.
        raise ValueError("crops is empty (B·K = 0); nothing to predict")
    logger.debug("predicted %d crops in %d chunks of <= %d", flat.shape[0], len(outputs), chunk_size)
    return torch.cat(outputs).view(batch, n_patches, -1)
