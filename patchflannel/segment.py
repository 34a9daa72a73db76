"""Lung segmentation (inference): an smp U-Net with one output per mask convention.

Conventions (one output channel each, named in the weights' config):

* ``scr`` — the lungs as the SCR database outlines them on JSRT: the visible
  lung fields *without* the region behind the heart (and below the dome of
  the diaphragm). The default, and what the patch sampler uses.
* ``full`` — the whole lung field as the V7 annotations of adult COVID-19
  radiographs draw it: the lung behind the heart included, and opacified
  (consolidated) lung included.

Data flow at inference (:class:`LungSegmenter`)::

    (H,W) float32 [0,1] ──preprocess──▶ (S,S) net input ──U-Net──▶ (C,S,S) logits
        ──channel of the convention, upsample──▶ (1024,1024) prob
        ──threshold, anatomy-aware cleaning (postprocess)──▶ (1024,1024) bool
        ──nearest──▶ (H,W) bool

The preprocessing (resize to the net's size S, CLAHE or histogram
equalisation + gamma) is stored in the weights' config and re-applied exactly.
With ONNX Runtime (``backend="onnx"``/``"auto"``) :meth:`LungSegmenter.segment`
runs no PyTorch op: OpenCV upsamples the logits (bilinear, as above) and the
threshold is applied to them as its logit — the same masks up to float rounding.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .errors import WeightsError
from .hub import load_pretrained, load_state_dict, resolve_weights, save_pretrained
from .io import as_images, default_threads, resize

log = logging.getLogger(__name__)

__all__ = ["CONVENTIONS", "LungSegmenter", "MaskQuality", "Preprocess", "build_unet", "overlay", "postprocess",
           "WORK_SIZE"]

WORK_SIZE = 1024  # masks are produced and judged at 1024×1024
CONVENTIONS = ("scr", "full")
DEFAULT_SEGMENTER = "lung_unet_v7c"  # the scr default since v0.6 (docs/results/seg_v4/DECISION.md; weights/README.md)
FULL_SEGMENTER = "lung_unet_v7b"  # the two-convention U-Net (scr + full); lung_unet_v7 trained 12 epochs more
TASK = "lung_segmentation"


# --------------------------------------------------------------------------- preprocessing


@dataclass
class Preprocess:
    """How a radiograph becomes the net's input; saved with the weights."""

    size: int = 256
    method: str = "clahe"  # clahe | equalize | none
    clip_limit: float = 2.0
    tile_grid: int = 8
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in ("clahe", "equalize", "none"):
            raise ValueError(f"unknown preprocessing method {self.method!r}; choose clahe, equalize or none")

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """``(H,W) float32 [0,1]`` → ``(size,size) float32 [0,1]``."""
        return self.enhance(resize(img, self.size, "area"))

    def enhance(self, small: np.ndarray) -> np.ndarray:
        """Contrast step only, on an image already at the net's size (float [0,1] or uint8)."""
        u8 = small if small.dtype == np.uint8 else np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
        if self.method == "clahe":
            u8 = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tile_grid, self.tile_grid)).apply(u8)
        elif self.method == "equalize":
            u8 = cv2.equalizeHist(u8)
        out = u8.astype(np.float32) / 255.0
        if self.gamma != 1.0:
            out = np.power(out, self.gamma, dtype=np.float32)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- model


def build_unet(encoder: str = "resnet18", decoder_channels: Sequence[int] = (128, 64, 32, 16, 16),
               classes: int = 2) -> torch.nn.Module:
    """smp U-Net with one gray input channel and no downloaded encoder weights."""
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=1, classes=classes,
                    decoder_channels=list(decoder_channels))


# --------------------------------------------------------------------------- post-processing and quality


@dataclass
class MaskQuality:
    """Per-mask quality line (``segment`` writes one per image to ``OUT/masks.csv``).

    ``lung_fraction``: share of the image that is lung; ``components``: lung
    components kept; ``removed``: components dropped (implausible ones: neck,
    shoulders, outside the thorax, specks; and any beyond the two largest); ``balance``: area of the smaller
    side (image left / right half of the lungs) over the larger one (1 = equal;
    the heart makes the patient's left lung smaller, ~0.7–0.9 is typical);
    ``suspicious``: whether a person should look at the overlay, ``reason`` why;
    ``convexity``: the lowest, over the mask's outlines, of convex-hull perimeter
    over outline perimeter (0 when there is no lung). Pixel outlines are
    staircases, so even smooth lungs score below 1 (``lung_unet_jsrt``'s
    JSRT masks at 1024²: 0.894–0.945), ragged ones lower. Reported, not flagged: low values went with `scr` masks
    that leave opacified lung out on the V7 test part, but also occur on most
    pediatric masks, for which there is no reference to tell (docs/results.md
    §1b, `scripts/ragged_masks.py`).
    """

    lung_fraction: float
    components: int
    removed: int
    balance: float
    suspicious: bool
    reason: str = ""
    convexity: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Component:
    label: int
    area: int
    cy: float
    cx: float
    plausible: bool
    why: str = ""


#: Components under this share of the image are specks, not lungs.
MIN_LUNG_SHARE = 0.004


def _components(binary: np.ndarray) -> tuple[np.ndarray, list[_Component]]:
    h, w = binary.shape
    n, labels, stats, cents = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    comps = []
    min_area = MIN_LUNG_SHARE * h * w
    for i in range(1, n):
        area = int(stats[i, cv2.CC_STAT_AREA])
        cx, cy = float(cents[i, 0]) / w, float(cents[i, 1]) / h
        bottom = (stats[i, cv2.CC_STAT_TOP] + stats[i, cv2.CC_STAT_HEIGHT]) / h
        why = ""
        if area < min_area:
            why = "speck"
        elif cy < 0.15 or bottom < 0.3:
            why = "neck"  # lungs extend well below the upper fifth of a chest radiograph
        elif cx < 0.06 or cx > 0.94:
            why = "outside the thorax"
        elif cy > 0.92:
            why = "below the thorax"
        comps.append(_Component(i, area, cy, cx, not why, why))
    return labels, comps


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background not connected to the border becomes foreground."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return mask.astype(bool) | (flood[1:-1, 1:-1] == 0)


def convexity(mask: np.ndarray) -> float:
    """Lowest convex-hull perimeter / outline perimeter over the mask's outer outlines that are not specks
    (:data:`MIN_LUNG_SHARE`; the polygon area of an outline undercounts its pixels, hence half of it); 0 if none.
    A single outline around both lungs is measured whole (its notch between the lungs counts)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    min_area = 0.5 * MIN_LUNG_SHARE * mask.size
    ratios = [cv2.arcLength(cv2.convexHull(c), True) / cv2.arcLength(c, True)
              for c in contours if cv2.contourArea(c) >= min_area]  # a lung-sized outline has a length
    return float(min(ratios)) if ratios else 0.0


def postprocess(prob: np.ndarray, threshold: float = 0.5, keep: int = 2) -> tuple[np.ndarray, MaskQuality]:
    """``(H,W)`` probabilities → ``(H,W) bool`` lung mask and its :class:`MaskQuality`.

    Threshold; drop implausible components (specks under 0.4 % of the image,
    blobs in the neck, at the image's left/right edge or below the thorax);
    keep the ``keep`` largest of the rest; fill holes.
    """
    binary = prob >= threshold
    labels, comps = _components(binary)
    plausible = sorted((c for c in comps if c.plausible), key=lambda c: -c.area)
    kept = plausible[:keep]
    removed = [c for c in comps if c not in kept]
    lut = np.zeros(len(comps) + 1, dtype=bool)
    for c in kept:
        lut[c.label] = True
    mask = fill_holes(lut[labels]) if kept else np.zeros_like(binary)
    return mask, quality(mask, kept, removed)


def quality(mask: np.ndarray, kept: Sequence[_Component] | None = None, removed: Sequence[_Component] = ()) -> MaskQuality:
    """Quality line of a final mask (see :class:`MaskQuality`)."""
    h, w = mask.shape
    frac = float(np.count_nonzero(mask)) / mask.size
    if kept is None:
        _, kept = _components(mask)
    cols = np.count_nonzero(mask, axis=0)
    left, right = int(cols[: w // 2].sum()), int(cols[w // 2:].sum())
    balance = min(left, right) / max(left, right) if max(left, right) else 0.0
    reasons = []
    if frac == 0:
        reasons.append("no lung found")
    elif frac < 0.08:
        reasons.append(f"very small lung area ({100 * frac:.1f} % of the image)")
    elif frac > 0.6:
        reasons.append(f"implausibly large lung area ({100 * frac:.0f} % of the image)")
    if frac > 0 and len(kept) < 2:
        reasons.append("only one lung component")
    if frac > 0 and balance < 0.35:
        reasons.append(f"left/right imbalance ({balance:.2f})")
    big_removed = [c for c in removed if c.area > 0.02 * mask.size]
    if big_removed:
        reasons.append("removed a large component (" + ", ".join(c.why for c in big_removed) + ")")
    convex = convexity(mask)
    return MaskQuality(lung_fraction=frac, components=len(kept), removed=len(removed), balance=float(balance),
                       suspicious=bool(reasons), reason="; ".join(reasons), convexity=round(convex, 4))


# --------------------------------------------------------------------------- the segmenter


@dataclass
class Segmentation:
    """One image's result: ``mask`` at the input's size, ``mask_work`` at 1024², its quality."""

    mask: np.ndarray
    mask_work: np.ndarray
    quality: MaskQuality
    convention: str = "scr"


@dataclass
class LungSegmenter:
    """A trained lung U-Net with its preprocessing; produces lung masks.

    >>> seg = LungSegmenter.from_pretrained()            # the shipped weights
    >>> masks = seg.predict("chest.png")                 # [ (H,W) bool ]
    >>> full = seg.predict(images, convention="full")    # the whole lung field
    """

    model: torch.nn.Module
    preprocess: Preprocess
    conventions: tuple[str, ...] = CONVENTIONS
    threshold: float = 0.5
    config: dict[str, Any] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    # torch (default: what training, eval-seg and predict use), onnx (ONNX Runtime on the CPU: U-Net forward
    # 55 vs 89 ms per image in benchmarks/results/seg_backends; logits within 1e-2 of PyTorch's, checked when
    # built, ≈ 2e-5 here) or auto (onnx when installed and on the CPU). The graph is exported from the weights
    # at the first call: after changing the weights in place, make a new segmenter (or call .to()).
    backend: str = "torch"
    _run: Any = field(default=None, init=False, repr=False, compare=False)
    _lock: Any = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from .backend import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        self.device = torch.device(self.device)
        self.model = self.model.to(self.device).eval()

    def __getstate__(self) -> dict[str, Any]:  # an ONNX Runtime session does not pickle; rebuilt on first use
        return {k: v for k, v in self.__dict__.items() if k not in ("_run", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _run=None, _lock=threading.Lock())

    # ---------------------------------------------------------------- persistence

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str] = DEFAULT_SEGMENTER,
                        device: str | torch.device = "cpu", option: str = "--weights",
                        backend: str = "torch") -> LungSegmenter:
        """Load a segmenter saved by :meth:`save_pretrained` (a name is resolved by :func:`patchflannel.hub.resolve_weights`)."""
        path = resolve_weights(name_or_path, option=option)
        state, cfg = load_pretrained(path, task=TASK)
        try:
            conventions = tuple(cfg.get("conventions") or ("scr",))
            model = build_unet(cfg["encoder"], cfg["decoder_channels"], len(conventions))
            pre = Preprocess(**cfg["preprocess"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: incomplete segmenter config ({exc})") from None
        load_state_dict(model, state, path)
        return cls(model, pre, conventions, float(cfg.get("threshold", 0.5)), cfg, torch.device(device), backend)

    def save_pretrained(self, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Write ``DIR/config.json`` + ``DIR/model.safetensors`` (everything :meth:`from_pretrained` needs)."""
        base = {k: v for k, v in self.config.items() if k not in ("code_version",)}
        cfg = {**base, **(extra or {}), **self.describe()}
        return save_pretrained(directory, self.model, cfg)

    def describe(self) -> dict[str, Any]:
        """The architecture and data config of this segmenter (JSON-ready)."""
        # Without a config (a LungSegmenter built around a model), read the architecture off the model,
        # or from_pretrained would rebuild a different U-Net than the one saved.
        name = str(getattr(self.model, "name", ""))
        enc = self.config.get("encoder") or (name[2:] if name.startswith("u-") else "resnet18")
        try:
            dec = [int(b.conv2[0].out_channels) for b in self.model.decoder.blocks]
        except (AttributeError, IndexError, TypeError):
            dec = [128, 64, 32, 16, 16]
        return {
            "task": TASK,
            "architecture": "segmentation_models_pytorch.Unet",
            "encoder": enc,
            "decoder_channels": list(self.config.get("decoder_channels") or dec),
            "in_channels": 1,
            "conventions": list(self.conventions),
            "input_normalisation": "x - 0.5 after preprocessing to [0,1]",
            "preprocess": self.preprocess.to_dict(),
            "threshold": self.threshold,
            "output_size": WORK_SIZE,
            "postprocess": "per convention: sigmoid, bilinear to 1024², threshold, drop implausible components "
                           "(specks, neck, outside/below the thorax), keep the 2 largest, fill holes; nearest to input size",
        }

    def to(self, device: str | torch.device) -> LungSegmenter:
        self.device = torch.device(device)
        self.model.to(self.device)
        self._run = None
        return self

    def backend_used(self) -> str:
        """The backend the forward runs on (``backend`` resolved: ``auto`` falls back to torch without
        onnxruntime, off the CPU, or when the exported graph does not match PyTorch)."""
        if self.backend == "torch":
            return "torch"
        if self._run is not None:  # built: no lock on the per-batch path
            return str(self._run[1])
        with self._lock:  # threads sharing a segmenter build one session, not one each
            if self._run is None:
                from .backend import runner

                run, used = runner([self.model], self.preprocess.size, self.backend, self.device, in_chans=1)
                self._run = (run, used)
        return str(self._run[1])

    # ---------------------------------------------------------------- inference

    def _channel(self, convention: str) -> int:
        if convention not in self.conventions:
            raise ValueError(f"convention {convention!r} is not one these weights produce ({', '.join(self.conventions)})")
        return self.conventions.index(convention)

    @torch.inference_mode()
    def predict_logits(self, net_inputs: np.ndarray) -> torch.Tensor:
        """``(B,S,S) float32`` preprocessed → ``(B,C,S,S)`` logits (one channel per convention)."""
        x = np.ascontiguousarray(net_inputs, dtype=np.float32)[:, None]
        if self.backend_used() == "onnx":  # numpy only: no PyTorch op wakes its threads (see _OnnxRunner.run_array)
            return torch.from_numpy(self._run[0].run_array(x - np.float32(0.5))[0])
        return self.model(torch.from_numpy(x).to(self.device) - 0.5)

    @torch.inference_mode()
    def predict_prob(self, images: Any, convention: str = "scr", work_size: int = WORK_SIZE) -> np.ndarray:
        """Images → lung probability ``(B, work_size, work_size) float32`` for ``convention``."""
        c = self._channel(convention)
        batch = np.stack([self.preprocess(im) for im in as_images(images)])
        logits = self.predict_logits(batch)[:, c:c + 1]
        prob = torch.sigmoid(F.interpolate(logits, size=(work_size, work_size), mode="bilinear", align_corners=False))
        return prob[:, 0].float().cpu().numpy()

    def segment(self, images: Any, convention: str = "scr", batch_size: int = 8) -> list[Segmentation]:
        """Images (paths, arrays, lists; see :func:`patchflannel.io.as_images`) → one :class:`Segmentation` each.

        The per-image steps (the clean-up; with ONNX Runtime also the preprocessing and the upsampling)
        run on :func:`patchflannel.io.default_threads` threads; a result does not depend on them.
        """
        imgs = as_images(images)
        c = self._channel(convention)
        onnx = self.backend_used() == "onnx"
        out: list[Segmentation] = []
        with ThreadPoolExecutor(default_threads()) as pool:
            for i in range(0, len(imgs), batch_size):
                chunk = imgs[i:i + batch_size]
                if onnx:  # no PyTorch op on this path: upsample the logits, threshold at the matching logit
                    logits = self.predict_logits(np.stack(list(pool.map(self.preprocess, chunk)))).numpy()[:, c]
                    maps, cut, up = list(logits), _logit(self.threshold), True
                else:  # what training, eval-seg and the classifier's mask cache use, unchanged
                    maps, cut, up = list(self.predict_prob(chunk, convention)), self.threshold, False
                out += pool.map(lambda im, m: _finish(im, m, cut, up, convention), chunk, maps)
        return out

    def predict(self, images: Any, convention: str = "scr", batch_size: int = 8) -> list[np.ndarray]:
        """Images → lung masks ``(H,W) bool`` at each image's own size."""
        return [s.mask for s in self.segment(images, convention, batch_size)]

    def __call__(self, images: Any, convention: str = "scr") -> list[np.ndarray]:
        return self.predict(images, convention)


def _logit(p: float) -> float:
    """The logit cut equivalent to ``sigmoid(x) >= p``."""
    return -math.inf if p <= 0 else math.inf if p >= 1 else math.log(p / (1 - p))


def _finish(image: np.ndarray, prob_or_logit: np.ndarray, cut: float, upsample: bool, convention: str) -> Segmentation:
    """One image: (bilinear to 1024², as F.interpolate(align_corners=False) does), threshold, clean, back to its size."""
    m = cv2.resize(prob_or_logit, (WORK_SIZE, WORK_SIZE), interpolation=cv2.INTER_LINEAR) if upsample else prob_or_logit
    work, q = postprocess(m, cut)
    mask = resize(work, image.shape, "nearest") if work.shape != image.shape else work
    return Segmentation(mask, work, q, convention)


def overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 0, 255),
            second: np.ndarray | None = None) -> np.ndarray:
    """Radiograph ``(H,W)`` float + mask ``(H,W)`` bool → BGR uint8 with the lung outline (red; ``second`` in yellow)."""
    gray = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(max(mask.shape) / 400))
    for m, col in ((second, (0, 220, 255)), (mask, colour)):
        if m is None:
            continue
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(bgr, contours, -1, col, thickness)
    return bgr
