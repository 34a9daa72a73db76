"""The whole classifier on new radiographs: :class:`Classifier`.

    radiograph ──read──▶ work image 1024² uint8 ──lung U-Net (scr)──▶ lung mask
        ──per learner input spec──▶ K in-lung crops (or the whole image), drawn with a
          generator keyed by the seed and the image's content, shared by learners with
          the same input spec
        ──each learner's member models vote──▶ P_i (mean over members of the mean patch softmax)
        ──combiner (FLANNEL: w = tanh(Dense(vec(f fᵀ))), z = Σ w_i P_i)──▶ scores z
        ──calibration (temperature fitted out of fold)──▶ probabilities

An image's result depends only on the image, the seed and the weights: never
on the other images of the batch or their order (the crops of each image are
drawn from its own generator, keyed by its content).

Saved layout (:meth:`Classifier.save_pretrained`)::

    DIR/config.json                      classes, learner order, members, distribution,
                                         combiner, calibration, segmenter, defaults
    DIR/combiner/                        config.json + model.safetensors
    DIR/learners/<learner>/<member>/     config.json + model.safetensors (float16 allowed)
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._files import check_name, file_sha256, write_json
from .calibrate import Calibrator
from .ensemble import load_combiner, save_combiner
from .errors import WeightsError, WeightsNotFoundError
from .hub import CONFIG_NAME, WEIGHTS_NAME, replace_dir, resolve_weights
from .io import as_images, resize, to_uint8
from .learners import InputSpec, Learner, make_inputs
from .segment import WORK_SIZE, LungSegmenter, MaskQuality, postprocess
from .vote import predict_distribution, vote

log = logging.getLogger(__name__)

__all__ = ["Classifier", "Prediction", "Prepared", "image_seed", "prepare"]

DEFAULT_CLASSIFIER = "ensemble"
TASK = "cxr_classifier"


def image_seed(work: np.ndarray, seed: int) -> int:
    """The crops' seed for one image: its content (1024² uint8) hashed together with ``seed``."""
    h = hashlib.blake2b(np.ascontiguousarray(work).tobytes(), digest_size=8, key=int(seed).to_bytes(8, "little", signed=False))
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFFFFFFFFFF


@dataclass
class Prepared:
    """Images ready for the learners: work images, lung masks, mask quality, per-image crop seeds."""

    work: torch.Tensor  # (B,1,1024,1024) uint8
    masks: torch.Tensor  # (B,1,1024,1024) bool
    quality: list[MaskQuality]
    shapes: list[tuple[int, int]]


def prepare(images: Sequence[np.ndarray], segmenter: LungSegmenter, convention: str = "scr",
            work_size: int = WORK_SIZE) -> Prepared:
    """Radiographs ``(H,W)`` float [0,1] → work images (area-resized to 1024², uint8) and their lung masks.

    The mask is computed from the *work image* (not the original), so the
    training cache and ``predict`` give bit-identical inputs for the same file.
    """
    work = [to_uint8(resize(im, work_size, "area")) for im in images]
    probs = segmenter.predict_prob([w.astype(np.float32) / np.float32(255.0) for w in work], convention, work_size)
    masks, quality = [], []
    for p in probs:
        m, q = postprocess(p, segmenter.threshold)
        masks.append(m)
        quality.append(q)
    return Prepared(torch.from_numpy(np.stack(work)).unsqueeze(1), torch.from_numpy(np.stack(masks)).unsqueeze(1),
                    quality, [im.shape for im in images])


@dataclass
class Prediction:
    """One image's result. ``probs`` are calibrated; ``raw_probs`` = softmax of the combiner's scores."""

    classes: tuple[str, ...]
    probs: np.ndarray  # (M,) calibrated class probabilities (NaN when no prediction was made)
    raw_probs: np.ndarray  # (M,)
    learner_names: tuple[str, ...]
    learner_probs: np.ndarray  # (N,M) each learner's distribution P_i
    learner_weights: np.ndarray | None  # (N,) FLANNEL weights w_i (None for other combiners)
    mask: np.ndarray  # (1024,1024) bool lung mask the crops were drawn from
    quality: MaskQuality
    centres: np.ndarray | None  # (K,2) int64 crop centres at 1024² (first patch learner's), or None
    k: int
    seed: int
    status: str = "ok"  # ok | no_lung
    message: str = ""
    crop_probs: dict[str, np.ndarray] = field(default_factory=dict)  # learner → (K,M) per-crop probabilities

    @property
    def label(self) -> str:
        return self.classes[int(np.argmax(self.probs))] if self.status == "ok" else ""

    @property
    def confidence(self) -> float:
        return float(np.max(self.probs)) if self.status == "ok" else math.nan


class Classifier:
    """Segmenter + learners (each with one or more member models) + combiner + calibration.

    >>> clf = Classifier.from_pretrained()               # the shipped ensemble
    >>> [p.label for p in clf.predict(["a.png", "b.dcm"])]
    """

    def __init__(self, segmenter: LungSegmenter, learners: dict[str, list[Learner]], combiner: nn.Module,
                 calibrator: Calibrator, config: dict[str, Any], device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.segmenter = segmenter.to(self.device)
        self.learners = {n: [m.to(self.device).eval() for m in ms] for n, ms in learners.items()}
        self.combiner = combiner.to(self.device).eval()
        self.calibrator = calibrator
        self.config = dict(config)
        self.names = tuple(self.config.get("learners") or learners)
        self.classes = tuple(self.config["classes"])
        for n in self.names:
            if n not in self.learners or not self.learners[n]:
                raise WeightsError(f"learner {n} has no member models")
            for m in self.learners[n]:
                if tuple(m.classes) != self.classes:
                    raise WeightsError(f"learner {n} predicts {m.classes}, the ensemble {self.classes}")
        if int(getattr(combiner, "n_learners", len(self.names))) != len(self.names):
            raise WeightsError(f"the combiner expects {combiner.n_learners} learners, the ensemble lists {len(self.names)}")
        self.distribution = str(self.config.get("distribution", "soft"))

    # ---------------------------------------------------------------- persistence

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str] = DEFAULT_CLASSIFIER, device: str | torch.device = "cpu",
                        segmenter: LungSegmenter | str | os.PathLike[str] | None = None) -> Classifier:
        """Load a classifier saved by :meth:`save_pretrained` (names resolved by :func:`patchflannel.hub.resolve_weights`).

        ``segmenter``: a :class:`LungSegmenter` or weights name/path; default: the one named in the config.
        """
        import json

        root = resolve_weights(name_or_path, option="--weights")
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise WeightsNotFoundError(f"{root}: no {CONFIG_NAME}; not a classifier folder (pass --weights a folder "
                                       "written by export-ensemble)")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightsError(f"{cfg_path}: not valid JSON ({exc})") from None
        if cfg.get("task") != TASK:
            raise WeightsError(f"{root}: these are {cfg.get('task')!r} weights, not a classifier ({TASK!r})")
        try:
            names = [check_name(n, "learner name") for n in cfg["learners"]]
            members = {n: [check_name(m, "member name") for m in cfg["members"][n]] for n in names}
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{cfg_path}: bad learner list ({exc})") from None
        learners = {}
        for n in names:
            learners[n] = []
            for m in members[n]:
                d = root / "learners" / n / m
                if not (d / WEIGHTS_NAME).is_file():
                    raise WeightsNotFoundError(f"{d}: member {m} of learner {n} is listed in {cfg_path} but missing")
                learners[n].append(Learner.from_pretrained(d, device))
        combiner, _ = load_combiner(root / "combiner", device)
        if not isinstance(segmenter, LungSegmenter):
            seg_ref = segmenter or (cfg.get("segmenter") or {}).get("name", "lung_unet_jsrt")
            seg_path = resolve_weights(seg_ref, option="--seg-weights")
            segmenter = LungSegmenter.from_pretrained(seg_path, device, option="--seg-weights")
            want = (cfg.get("segmenter") or {}).get("sha256")
            have_file = seg_path / WEIGHTS_NAME if seg_path.is_dir() else seg_path.with_suffix(".safetensors")
            if want and have_file.is_file() and file_sha256(have_file) != want:
                log.warning("%s: the classifier was trained on masks from another lung segmenter (%s); its crops, "
                            "and so its answers, may differ from the validated ones", root, seg_ref)
        return cls(segmenter, learners, combiner, Calibrator.from_dict(cfg.get("calibration")), cfg, device)

    def save_pretrained(self, directory: str | os.PathLike[str], half: bool = False,
                        extra: dict[str, Any] | None = None) -> Path:
        """Write the classifier to ``directory`` (replaced whole: no file of an earlier save remains).

        ``half`` stores the learners' tensors as float16 (predictions are made in float32).
        """
        dest = Path(directory)
        dest.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            members: dict[str, list[str]] = {}
            for n in self.names:
                check_name(n, "learner name")
                members[n] = []
                for i, m in enumerate(self.learners[n]):
                    member = check_name(str(m.info.get("member") or f"m{i}"), "member name")
                    if member in members[n]:
                        member = f"{member}-{i}"
                    members[n].append(member)
                    if half:
                        m = _half_copy(m)
                    m.save_pretrained(build / "learners" / n / member, {"stored_dtype": "float16" if half else "float32"})
            opts = dict(self.config.get("combiner_options") or {})
            save_combiner(self.combiner, build / "combiner", str(self.config.get("combiner", "flannel")), opts)
            cfg = {**{k: v for k, v in self.config.items() if k != "code_version"}, **(extra or {}), "task": TASK,
                   "classes": list(self.classes), "learners": list(self.names), "members": members,
                   "distribution": self.distribution, "calibration": self.calibrator.to_dict()}
            write_json(build / CONFIG_NAME, cfg)
            os.chmod(build, 0o755)
            return replace_dir(build, dest)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise

    # ---------------------------------------------------------------- inference

    @property
    def default_k(self) -> int:
        return int((self.config.get("defaults") or {}).get("k", 100))

    def _groups(self) -> dict[tuple[Any, ...], list[str]]:
        groups: dict[tuple[Any, ...], list[str]] = {}
        for n in self.names:
            groups.setdefault(self.learners[n][0].input_spec.crops_key(), []).append(n)
        return groups

    @torch.inference_mode()
    def learner_distributions(self, prep: Prepared, k: int, seed: int, chunk: int = 256,
                              keep_crops: bool = False) -> tuple[torch.Tensor, np.ndarray | None, dict[str, np.ndarray]]:
        """Each learner's distribution for prepared images: ``P (B,N,M)``, centres of the first patch group
        ``(B,K,2)`` and (``keep_crops``) each learner's per-crop probabilities ``(B,K,M)``."""
        seeds = [image_seed(w, seed) for w in prep.work[:, 0].numpy()]
        per_learner: dict[str, torch.Tensor] = {}
        crop_probs: dict[str, np.ndarray] = {}
        centres_out = None
        work, masks = prep.work.to(self.device), prep.masks.to(self.device)
        for names in self._groups().values():
            spec: InputSpec = self.learners[names[0]][0].input_spec
            kk = k if spec.mode == "patch" else 1
            x, centres, _ = make_inputs(work, masks, spec, kk, seeds=seeds)
            if centres is not None and centres_out is None:
                centres_out = centres.cpu().numpy()
            for n in names:
                dists, crops = [], []
                for model in self.learners[n]:
                    logits = predict_distribution(model, x, chunk_size=chunk)
                    hard, soft = vote(logits)
                    dists.append(soft if self.distribution == "soft" else hard)
                    if keep_crops:
                        crops.append(torch.softmax(logits, dim=2))
                per_learner[n] = torch.stack(dists).mean(0)
                if keep_crops:
                    crop_probs[n] = torch.stack(crops).mean(0).cpu().numpy()
        P = torch.stack([per_learner[n] for n in self.names], dim=1).float()
        return P, centres_out, crop_probs

    @torch.inference_mode()
    def combine(self, P: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``P (B,N,M)`` → (calibrated probabilities, raw probabilities, FLANNEL weights or None)."""
        out = self.combiner(P.to(self.device))
        z, w = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        z = z.double().cpu()
        return (torch.softmax(self.calibrator(z), dim=1).numpy(), torch.softmax(z, dim=1).numpy(),
                None if w is None else w.double().cpu().numpy())

    def predict(self, images: Any, k: int | None = None, seed: int = 0, batch_size: int = 4,
                keep_crops: bool = False) -> list[Prediction]:
        """Images (paths, arrays, lists: see :func:`patchflannel.io.as_images`) → one :class:`Prediction` each."""
        imgs = as_images(images)
        k = self.default_k if k is None else int(k)
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        preds: list[Prediction] = []
        for s in range(0, len(imgs), batch_size):
            preds += self._predict_batch(imgs[s:s + batch_size], k, seed, keep_crops)
        return preds

    def _predict_batch(self, imgs: Sequence[np.ndarray], k: int, seed: int, keep_crops: bool) -> list[Prediction]:
        prep = prepare(imgs, self.segmenter)
        P, centres, crops = self.learner_distributions(prep, k, seed, keep_crops=keep_crops)
        probs, raw, w = self.combine(P)
        out = []
        for i in range(len(imgs)):
            q = prep.quality[i]
            status, msg = "ok", ""
            if q.lung_fraction == 0:
                status, msg = "no_lung", "no lung found in the image: no prediction made (is it a chest radiograph?)"
            nan = np.full(len(self.classes), np.nan)
            out.append(Prediction(
                classes=self.classes, probs=probs[i] if status == "ok" else nan, raw_probs=raw[i] if status == "ok" else nan,
                learner_names=self.names, learner_probs=P[i].cpu().numpy(),
                learner_weights=None if w is None else w[i], mask=prep.masks[i, 0].numpy(), quality=q,
                centres=None if centres is None else centres[i], k=k, seed=seed, status=status, message=msg,
                crop_probs={n: c[i] for n, c in crops.items()}))
        return out

    def __call__(self, images: Any, **kwargs: Any) -> list[Prediction]:
        return self.predict(images, **kwargs)


def _half_copy(m: Learner) -> Learner:
    import copy

    h = copy.deepcopy(m)
    for p in h.parameters():
        p.data = p.data.half()
    for name, b in h.backbone.named_buffers():
        if b.is_floating_point():
            b.data = b.data.half()
    return h
