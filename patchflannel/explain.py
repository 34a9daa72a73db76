"""Explanations: probabilistic Grad-CAM over the K lung patches, combined the way FLANNEL combined the learners.

For one image and a class c (default: the predicted class), per learner *i* and member model *m*:

1. Grad-CAM (Selvaraju et al. 2017) at the learner's last convolutional block
   (:func:`find_target_layer`) for every crop *k*:
   ``cam_k = ReLU(Σ_ch α_ch A_ch)``, ``α_ch = mean_xy ∂logit_c/∂A_ch``, divided by
   its maximum so each crop's map lies in [0, 1] (a crop with no positive
   evidence stays 0: there is no min-max stretch that would turn noise into a map).
2. *Probabilistic* weighting (Oh, Park & Ye, IEEE TMI 2020): the crop's map is
   multiplied by that crop's softmax probability ``p_k,c``, upsampled (bilinear)
   to the crop's field of view (``InputSpec.patch_size`` px of the 1024² work
   image) and added at the crop's place; the sum is divided per pixel by the
   number of crops that covered it (pixels no crop covered stay 0).
3. The members' maps are averaged: the learner's map ``L_i`` (values in [0, 1]).
   For learners that see the lungs only (``InputSpec.mask_outside``, the shipped
   ones) ``L_i`` is then set to 0 outside the lungs (:func:`seen_region`): those
   pixels were black in every crop, and Grad-CAM's coarse cells (56 px of the
   work image for a 4×4 grid over a 224-px field of view) would otherwise smear
   evidence onto pixels the learner never saw. On the shipped samples 30–45 % of
   the unrestricted map's mass lay outside the lung mask.
   ``L_i`` is a spatial split of the learner's vote: its mean over the crops'
   fields of view is (up to the Grad-CAM shape) ``P_i,c = mean_k p_k,c``.
4. The ensemble's map is ``S = Σ_i w_i L_i`` with the FLANNEL weights ``w_i`` this
   image got — the same sum that made its score ``z_c = Σ_i w_i P_i,c``. FLANNEL's
   weights lie in (-1, 1): a learner with a **negative** weight is voted against,
   so its evidence *subtracts* from the map. ``Explanation.signed`` keeps ``S`` as
   is; ``Explanation.map`` is ``max(S, 0)`` divided by its maximum (0 = no net
   evidence, 1 = the image's strongest), which is what the heat-map PNGs and
   overlays show. Combiners without per-image weights (voting, stacking) get
   equal weights ``1/N``.

Whole-image learners (``InputSpec.mode == "global"``) use the same code with one
"crop": the whole image, covering every pixel once.

The crops are exactly :meth:`Classifier.predict`'s (same :func:`make_inputs`, same
per-image seeds from :func:`~patchflannel.pipeline.image_seed`), and the
prediction returned with each explanation is computed from the same forward pass.

**Cost.** Each member runs one batched forward over all the crops of a batch of
images (at most ``chunk_size`` crops at a time); the gradient is needed only
from the logits back to the target layer, so the network up to that layer runs
without autograd and only the head (pooling + classifier) is differentiated,
once per class, over all crops at once. That is why ``explain`` costs little
more than ``predict``, and why every class's map is available from one pass.

**Why torch hooks, not pytorch-grad-cam.** ``grad-cam`` is not installed here;
adding a dependency for ~40 lines is not worth it, and it would not do the part
that matters: it neither knows our crops, their probabilities and coverage nor
lets us cut the graph at the target layer (it backpropagates through the whole
network, one target per call).
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import as_images, resize
from .learners import InputSpec, Learner, make_inputs, shrink
from .pipeline import Classifier, Prediction, image_seed, prepare
from .vote import vote

log = logging.getLogger(__name__)

__all__ = ["Explanation", "explain", "find_target_layer", "gradcam", "learner_maps", "paste", "plot_explanation"]

# Modules that pool, drop or reshape: never a Grad-CAM target.
_NOT_TARGETS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Dropout, nn.Flatten,
                nn.Identity)
_GLOBAL_POOL = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)
_TARGETS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- the target layer


def find_target_layer(model: nn.Module, input_size: int | None = None) -> tuple[str, nn.Module]:
    """The last convolutional block of a (torchvision) backbone: ``(dotted name, module)``.

    Found generically with one probe forward: the last *top-level child* of the
    backbone whose output is 4-D (N,C,h,w), that is not a pooling/dropout layer,
    and that finishes before global pooling — the first pooling layer with a 1×1
    output, or the first 2-D output (backbones such as MNASNet and ShuffleNet
    pool with a functional ``mean``); pooling inside a block (squeeze-and-excitation)
    does not count. That is ``features`` (MobileNet,
    EfficientNet, DenseNet, VGG, SqueezeNet), ``layers`` (MNASNet), ``conv5``
    (ShuffleNet), ``layer4`` (ResNet/ResNeXt), ``trunk_output`` (RegNet),
    ``Mixed_7c`` (Inception). The name is relative to ``model.backbone`` for a
    :class:`Learner`, and cached per model.
    """
    backbone = model.backbone if isinstance(model, Learner) else model
    if backbone in _TARGETS:
        name = _TARGETS[backbone]
        return name, backbone.get_submodule(name)
    if input_size is None:
        input_size = model.input_spec.side if isinstance(model, Learner) else 224
    in_chans = model.in_chans if isinstance(model, Learner) else 3
    top = {m: n for n, m in backbone.named_children()}
    events: list[tuple[str, nn.Module, tuple[int, ...], bool]] = []  # (name, module, shape, top-level)

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            events.append((top.get(mod, ""), mod, tuple(out.shape), mod in top))

    handles = [m.register_forward_hook(hook) for m in backbone.modules() if m is not backbone]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(iter(model.parameters()), None)
            x = torch.zeros(1, in_chans, input_size, input_size, device=p.device if p is not None else "cpu")
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    def pools(mod: nn.Module) -> bool:  # a pooling layer, or a top-level block ending in one (SqueezeNet's head)
        last = list(mod.children())[-1] if isinstance(mod, nn.Sequential) and len(mod) else mod
        return isinstance(last, _GLOBAL_POOL)

    stop = len(events)
    for i, (_, mod, shape, is_top) in enumerate(events):
        if len(shape) == 2 or (is_top and len(shape) == 4 and shape[2:] == (1, 1) and pools(mod)):
            stop = i
            break
    cands = [(n, m) for n, m, shape, is_top in events[:stop]
             if is_top and len(shape) == 4 and not isinstance(m, _NOT_TARGETS)]
    if not cands:
        raise ValueError(f"{type(backbone).__name__}: no convolutional block with a 4-D output before global pooling; "
                         "pass the target layer explicitly")
    name, mod = cands[-1]
    _TARGETS[backbone] = name
    return name, mod


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters temporarily not requiring grad: autograd then records only what follows the target layer."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


# --------------------------------------------------------------------------- Grad-CAM, batched


def gradcam(model: nn.Module, x: Tensor, layer: nn.Module | None = None, chunk_size: int = 256
            ) -> tuple[Tensor, Tensor]:
    """Grad-CAM of every class for every input, batched.

    Args:
        model: (N,C,H,W) → (N,M) logits, e.g. a :class:`Learner`; run in eval mode.
        x: (N,C,H,W) float inputs (crops).
        layer: the target module (default :func:`find_target_layer`).
        chunk_size: inputs per forward (bounds memory).

    Returns:
        ``(cams, logits)``: cams (N,M,h,w) float32, per input and class
        ``ReLU(Σ_ch α_ch A_ch)`` divided by its maximum (all 0 when it has no
        positive value); logits (N,M) float32.

    One forward per chunk with a hook that detaches the target layer's output
    and makes it a leaf: the layers before it run without autograd, and each
    class needs only a backward through the head. An input's map does not
    depend on the other inputs of the chunk (eval mode).
    """
    if layer is None:
        layer = find_target_layer(model)[1]
    store: dict[str, Tensor] = {}

    def hook(_mod: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        leaf = out.detach().requires_grad_(True)
        store["a"] = leaf
        return leaf.clone()  # downstream in-place ops (DenseNet's relu_) must not touch the activations we keep

    cams, logits = [], []
    was_training = model.training
    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad(), _frozen(model):
            for s in range(0, x.shape[0], chunk_size):
                chunk = x[s:s + chunk_size]
                if chunk.is_inference():
                    chunk = chunk.clone()
                out = model(chunk)
                a = store.pop("a")
                if out.ndim != 2:
                    raise ValueError(f"model must return (N,M) logits, got {tuple(out.shape)}")
                per_class = []
                for c in range(out.shape[1]):
                    (g,) = torch.autograd.grad(out[:, c].sum(), a, retain_graph=c < out.shape[1] - 1, allow_unused=True)
                    if g is None:  # the logit does not depend on the layer at all
                        per_class.append(torch.zeros(a.shape[0], *a.shape[2:], device=a.device))
                        continue
                    alpha = g.float().mean(dim=(2, 3), keepdim=True)
                    per_class.append(torch.relu((alpha * a.detach().float()).sum(dim=1)))
                cam = torch.stack(per_class, dim=1)  # (n,M,h,w)
                peak = cam.amax(dim=(2, 3), keepdim=True)
                cams.append(torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), 0.0))
                logits.append(out.detach().float())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(cams), torch.cat(logits)


def paste(cams: Tensor, weights: Tensor, centres: Tensor | None, spec: InputSpec) -> tuple[Tensor, Tensor]:
    """Per-crop maps → their weighted sum and coverage count on the work image.

    Args:
        cams: (B,K,h,w) one map per crop.
        weights: (B,K) each crop's weight (its probability for the class).
        centres: (B,K,2) crop centres at work-image coordinates (from :func:`make_inputs`); None for a
            global learner (K = 1, the crop is the whole image).
        spec: the learner's input spec (field of view ``patch_size``, ``work_size``).

    Returns:
        ``(total, count)``, both (B,W,W) float32: the sum of ``weight · cam`` upsampled (bilinear) to the
        crop's field of view and placed where the crop was cut (parts beyond the image dropped), and
        how many crops covered each pixel.
    """
    B, K, h, w = cams.shape
    W = spec.work_size
    dev = cams.device
    if centres is None:
        up = F.interpolate(cams.reshape(B * K, 1, h, w).float(), size=(W, W), mode="bilinear", align_corners=False)
        total = (up.view(B, K, W, W) * weights.float().view(B, K, 1, 1)).sum(1)
        return total, torch.full((B, W, W), float(K), device=dev)
    fov = spec.learner_input * spec.factor
    half = (spec.learner_input // 2) * spec.factor  # extract_patches: crop rows r - P//2 … r - P//2 + P - 1 (small scale)
    up = F.interpolate(cams.reshape(B * K, 1, h, w).float(), size=(fov, fov), mode="bilinear", align_corners=False)
    up = up.view(B, K, fov, fov) * weights.float().view(B, K, 1, 1)
    total = torch.zeros(B, W + 2 * fov, W + 2 * fov, device=dev)
    count = torch.zeros_like(total)
    tops = (centres.to(dev) - half + fov).tolist()
    for b in range(B):
        for kk in range(K):
            r, c = tops[b][kk]
            total[b, r:r + fov, c:c + fov] += up[b, kk]
            count[b, r:r + fov, c:c + fov] += 1
    return total[:, fov:fov + W, fov:fov + W].contiguous(), count[:, fov:fov + W, fov:fov + W].contiguous()


# --------------------------------------------------------------------------- one learner


@dataclass
class LearnerMaps:
    """One learner's explanation for a batch of prepared images."""

    maps: Tensor  # (B,W,W) float32 in [0,1], at work size
    logits: Tensor  # (n_members,B,K,M) per-crop logits
    cams: Tensor  # (n_members,B,K,M,h,w) normalised per-crop Grad-CAMs, every class
    centres: Tensor | None  # (B,K,2) at work size, None for global learners
    layer: str


def _crop_logits_and_cams(members: Sequence[Learner], x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, str]:
    B, K = x.shape[:2]
    flat = x.reshape(B * K, *x.shape[2:])
    logits, cams, name = [], [], ""
    for m in members:
        name, layer = find_target_layer(m)
        c, lg = gradcam(m, flat, layer, chunk_size)
        cams.append(c.view(B, K, *c.shape[1:]))
        logits.append(lg.view(B, K, -1))
    return torch.stack(logits), torch.stack(cams), name


def seen_region(masks: Tensor, spec: InputSpec) -> Tensor:
    """(B,1,W,W) bool lung masks → (B,W,W) bool: the work-image pixels whose content the learner saw.

    With ``mask_outside`` every pixel outside the lungs was set to 0 before the learner saw it (at
    the crops' scale: a shrunk pixel is lung when half its block is); with ``blank_lungs`` (global
    learners) every lung pixel was; otherwise it saw every pixel.
    """
    if spec.blank_lungs:
        return ~masks[:, 0]
    if not spec.mask_outside:
        return torch.ones(masks.shape[0], *masks.shape[2:], dtype=torch.bool, device=masks.device)
    f = spec.factor if spec.mode == "patch" else 1
    _, small = shrink(torch.zeros_like(masks, dtype=torch.uint8), masks, f)
    return small[:, 0].repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)


def _weighted_maps(logits: Tensor, cams: Tensor, centres: Tensor | None, spec: InputSpec, targets: Tensor,
                   seen: Tensor | None = None) -> Tensor:
    """Members' probability-weighted crop maps for each image's target class, pasted, coverage-normalised,
    averaged, and (``seen``) set to 0 where the learner saw no image content."""
    probs = torch.softmax(logits, dim=-1)  # (n,B,K,M)
    n, B, K, _ = probs.shape
    idx = targets.to(probs.device).view(1, B, 1, 1).expand(n, B, K, 1)
    p = probs.gather(3, idx).squeeze(3)  # (n,B,K)
    c = cams.gather(3, idx.view(n, B, K, 1, 1, 1).expand(n, B, K, 1, *cams.shape[4:])).squeeze(3)  # (n,B,K,h,w)
    weighted = (p[..., None, None] * c).mean(0)  # mean over members (same crops): (B,K,h,w)
    total, count = paste(weighted, torch.ones(B, K, device=weighted.device), centres, spec)
    keep = count > 0
    if seen is not None:
        keep &= seen.to(keep.device)
    return torch.where(keep, total / count.clamp_min(1), 0.0)


def learner_maps(members: Sequence[Learner], work: Tensor, masks: Tensor, k: int, seeds: Sequence[int],
                 targets: Tensor | Sequence[int], chunk_size: int = 256) -> LearnerMaps:
    """Probabilistic Grad-CAM of one learner (its member models averaged) for prepared images.

    ``work`` (B,1,W,W) uint8 work images, ``masks`` (B,1,W,W) bool, ``seeds`` one per image (as
    :func:`image_seed` gives), ``targets`` the class index to explain per image.
    """
    spec = members[0].input_spec
    x, centres, _ = make_inputs(work, masks, spec, k if spec.mode == "patch" else 1, seeds=seeds)
    logits, cams, name = _crop_logits_and_cams(members, x, chunk_size)
    t = torch.as_tensor(targets, dtype=torch.int64)
    maps = _weighted_maps(logits, cams, centres, spec, t, seen_region(masks, spec))
    return LearnerMaps(maps, logits, cams, centres, name)


# --------------------------------------------------------------------------- the ensemble


@dataclass
class Explanation:
    """One image's explanation, at the input image's size.

    ``map``: (H,W) float32 in [0,1] — the ensemble's net evidence for ``target``
    (``max(Σ w_i L_i, 0)``), divided by its maximum (all 0 when there is none).
    ``signed``: (H,W) float32 ``Σ w_i L_i`` before clipping and scaling
    (negative where learners with negative FLANNEL weights outweigh the others).
    ``learner_maps``: learner → (H,W) float32 ``L_i`` in [0,1] (not rescaled).
    """

    map: np.ndarray
    signed: np.ndarray
    learner_maps: dict[str, np.ndarray]
    weights: dict[str, float]  # w_i used (FLANNEL's for this image, else 1/N)
    target: str  # the class explained
    prediction: Prediction
    layers: dict[str, str] = field(default_factory=dict)  # learner → Grad-CAM target layer
    centres: dict[str, np.ndarray] = field(default_factory=dict)  # patch learner → (K,2) crop centres at 1024²

    @property
    def scale(self) -> float:
        """The maximum of ``max(signed, 0)`` (what 1.0 in ``map`` stands for)."""
        return float(np.max(self.signed, initial=0.0))

    def mass_inside(self, region: np.ndarray) -> float:
        """Fraction of ``map``'s mass inside a bool ``region`` of the input's size (NaN for an all-zero map)."""
        total = float(self.map.sum(dtype=np.float64))
        return float(self.map[region].sum(dtype=np.float64)) / total if total > 0 else float("nan")


def _to_input(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.ascontiguousarray(resize(m.astype(np.float32), shape, "area"), dtype=np.float32)


def explain(classifier: Classifier, images: Any, k: int | None = None, seed: int = 0, target: str | int | None = None,
            batch_size: int = 4, chunk_size: int = 256) -> list[Explanation]:
    """Probabilistic Grad-CAM of the whole classifier for each image (see the module docstring).

    Args:
        classifier: a :class:`Classifier`.
        images: anything :func:`patchflannel.io.as_images` accepts.
        k: crops per image (default: the classifier's); the crops are :meth:`Classifier.predict`'s.
        seed: as in :meth:`Classifier.predict`.
        target: the class to explain (name or index); default: each image's predicted class.
        batch_size: images per batch; chunk_size: crops per forward.

    Returns one :class:`Explanation` per image, with its :class:`Prediction` (per-crop probabilities
    included, as ``predict(keep_crops=True)``).
    """
    clf = classifier
    imgs = as_images(images)
    k = clf.default_k if k is None else int(k)
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    fixed: int | None = None
    if target is not None:
        if isinstance(target, str):
            if target not in clf.classes:
                raise ValueError(f"unknown class {target!r}; the classifier's classes: {', '.join(clf.classes)}")
            fixed = clf.classes.index(target)
        else:
            fixed = int(target)
            if not 0 <= fixed < len(clf.classes):
                raise ValueError(f"class index {fixed} out of range 0..{len(clf.classes) - 1}")
    out: list[Explanation] = []
    for s in range(0, len(imgs), batch_size):
        out += _explain_batch(clf, imgs[s:s + batch_size], k, seed, fixed, chunk_size)
    return out


def _explain_batch(clf: Classifier, imgs: Sequence[np.ndarray], k: int, seed: int, fixed: int | None,
                   chunk_size: int) -> list[Explanation]:
    prep = prepare(imgs, clf.segmenter)
    seeds = [image_seed(w, seed) for w in prep.work[:, 0].numpy()]
    work, masks = prep.work.to(clf.device), prep.masks.to(clf.device)
    per: dict[str, tuple[Tensor, Tensor, Tensor | None, InputSpec, str]] = {}
    centres_out: Tensor | None = None
    for names in clf._groups().values():  # learners with the same input spec share their crops, as in predict
        spec: InputSpec = clf.learners[names[0]][0].input_spec
        x, centres, _ = make_inputs(work, masks, spec, k if spec.mode == "patch" else 1, seeds=seeds)
        if centres is not None and centres_out is None:
            centres_out = centres
        for n in names:
            logits, cams, layer = _crop_logits_and_cams(clf.learners[n], x, chunk_size)
            per[n] = (logits, cams, centres, spec, layer)
    # The prediction, from the same logits (what learner_distributions + combine compute).
    dists = []
    for n in clf.names:
        logits = per[n][0]
        votes = [vote(lg) for lg in logits]
        dists.append(torch.stack([soft if clf.distribution == "soft" else hard for hard, soft in votes]).mean(0))
    P = torch.stack(dists, dim=1).float()
    probs, raw, w = clf.combine(P)
    B = len(imgs)
    targets = torch.tensor([fixed if fixed is not None else int(np.argmax(probs[i])) for i in range(B)])
    weights = w if w is not None else np.full((B, len(clf.names)), 1.0 / len(clf.names))
    maps = {n: _weighted_maps(per[n][0], per[n][1], per[n][2], per[n][3], targets, seen_region(masks, per[n][3])
                              ).cpu().numpy() for n in clf.names}
    out = []
    for i, im in enumerate(imgs):
        q = prep.quality[i]
        ok = q.lung_fraction > 0
        nan = np.full(len(clf.classes), np.nan)
        pred = Prediction(
            classes=clf.classes, probs=probs[i] if ok else nan, raw_probs=raw[i] if ok else nan,
            learner_names=clf.names, learner_probs=P[i].cpu().numpy(),
            learner_weights=None if w is None else w[i], mask=prep.masks[i, 0].numpy(), quality=q,
            centres=None if centres_out is None else centres_out[i].cpu().numpy(), k=k, seed=seed,
            status="ok" if ok else "no_lung",
            message="" if ok else "no lung found in the image: no prediction made (is it a chest radiograph?)",
            crop_probs={n: torch.softmax(per[n][0][:, i], dim=-1).mean(0).cpu().numpy() for n in clf.names},
            k_max=k)
        shape = im.shape[:2]
        signed_work = sum(float(weights[i][j]) * maps[n][i] for j, n in enumerate(clf.names))
        if not ok:
            signed_work = np.zeros_like(signed_work)
        signed = _to_input(signed_work, shape)
        pos = np.clip(signed, 0, None)
        peak = float(pos.max(initial=0.0))
        out.append(Explanation(
            map=(pos / peak if peak > 0 else pos).astype(np.float32), signed=signed,
            learner_maps={n: _to_input(maps[n][i], shape) for n in clf.names},
            weights={n: float(weights[i][j]) for j, n in enumerate(clf.names)},
            target=clf.classes[int(targets[i])], prediction=pred, layers={n: per[n][4] for n in clf.names},
            centres={n: per[n][2][i].cpu().numpy() for n in clf.names if per[n][2] is not None}))
    return out


# --------------------------------------------------------------------------- figures


def heatmap_uint8(e: Explanation) -> np.ndarray:
    """The map as 8-bit gray at the input's size: 0 = no evidence, 255 = the image's maximum."""
    return np.clip(np.rint(e.map * 255.0), 0, 255).astype(np.uint8)


def draw_explanation(ax: Any, image: np.ndarray, e: Explanation, heat: np.ndarray | None = None,
                     dots: bool = True, cmap: str = "inferno") -> Any:
    """Radiograph + heat-map (0 transparent) + lung outline + crop centres on a matplotlib Axes; returns the image artist."""
    H, W = image.shape[:2]
    heat = e.map if heat is None else heat
    if max(H, W) > 1024:  # a figure is < 1000 px wide: draw a smaller copy, in the input's coordinates
        s = 1024 / max(H, W)
        small = (max(1, round(H * s)), max(1, round(W * s)))
        image, heat = resize(image, small, "area"), resize(heat.astype(np.float32), small, "area")
    ext = (0, W, H, 0)
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="antialiased", extent=ext)
    art = ax.imshow(np.ma.masked_less_equal(heat, 0), cmap=cmap, vmin=0, vmax=1, alpha=0.6, interpolation="antialiased",
                    extent=ext)
    mask = e.prediction.mask
    ys = (np.arange(mask.shape[0]) + 0.5) * H / mask.shape[0]
    xs = (np.arange(mask.shape[1]) + 0.5) * W / mask.shape[1]
    if mask.any():
        ax.contour(xs, ys, mask.astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.8)
    if dots and e.prediction.centres is not None:
        c = e.prediction.centres
        ax.scatter((c[:, 1] + 0.5) * W / mask.shape[1], (c[:, 0] + 0.5) * H / mask.shape[0], s=4, c="white",
                   edgecolors="black", linewidths=0.3)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_axis_off()
    return art


def plot_explanation(image: np.ndarray, e: Explanation, path: str | os.PathLike[str], cmap: str = "inferno") -> Path:
    """The overlay PNG: radiograph, heat-map with a colorbar, lung outline, crop centres, prediction in the title."""
    from .plots import new_figure, save_figure

    H, W = image.shape[:2]
    fig = new_figure(6.0, 6.0 * H / W + 0.6)
    ax = fig.add_subplot()
    art = draw_explanation(ax, image, e, cmap=cmap)
    p = e.prediction
    title = (f"predicted {p.label} ({p.confidence:.2f})" if p.status == "ok" else "no lung found: no prediction")
    ax.set_title(f"{title}; map: evidence for {e.target}", fontsize=9)
    cb = fig.colorbar(art, ax=ax, shrink=0.8)
    cb.set_label(f"evidence for {e.target} (1 = this image's maximum)", fontsize=8)
    return save_figure(fig, path)
