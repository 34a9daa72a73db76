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

import dataclasses
import hashlib
import itertools
import logging
import math
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._files import check_name, file_sha256, write_json
from .calibrate import Calibrator
from .ensemble import load_combiner, save_combiner
from .errors import WeightsError, WeightsNotFoundError
from .hub import CONFIG_NAME, WEIGHTS_NAME, replace_dir, resolve_weights
from .io import as_images, resize, to_uint8
from .backend import bind_session
from .backend import runner as fast_runner
from .learners import InputSpec, Learner, crop_source, draw_crops, make_inputs
from .sampler import image_generators
from .segment import WORK_SIZE, LungSegmenter, MaskQuality, postprocess

log = logging.getLogger(__name__)

__all__ = ["Classifier", "Prediction", "Prepared", "StopRule", "image_seed", "prepare"]

DEFAULT_CLASSIFIER = "ensemble"
TASK = "cxr_classifier"


_threads_lock = threading.Lock()
_threads_state = {"active": 0, "saved": 0}


def _divide_threads(workers: int) -> None:
    """PyTorch's intra-op threads shared among ``workers`` (counted: overlapping streams restore once)."""
    with _threads_lock:
        if _threads_state["active"] == 0:
            _threads_state["saved"] = torch.get_num_threads()
            torch.set_num_threads(max(1, _threads_state["saved"] // workers))
        _threads_state["active"] += 1


def _restore_threads() -> None:
    with _threads_lock:
        _threads_state["active"] -= 1
        if _threads_state["active"] == 0:
            torch.set_num_threads(_threads_state["saved"])


def image_seed(work: np.ndarray, seed: int) -> int:
    """The crops' seed for one image: its content (1024² uint8) hashed together with ``seed``."""
    h = hashlib.blake2b(np.ascontiguousarray(work).tobytes(), digest_size=8, key=int(seed).to_bytes(8, "little", signed=False))
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class StopRule:
    """Sequential voting: draw each image's crops in chunks and stop once the rest would not change the answer.

    The exact answer uses all K crops of the image's stream. After ``n`` crops
    (``min_k`` first, then ``chunk`` more at a time) the K − n crops still to come
    are simulated ``draws`` times by resampling the n per-crop learner votes seen
    so far (a bootstrap), each simulated K-crop vote goes through the combiner and
    the calibration, and the image stops when at most ``flip`` of the simulations
    change its label and their mean |Δp| to the current probabilities (calibrated,
    averaged over classes) is at most ``tol``. The answer given is the one from
    the n crops seen; the crops are the first n of the exact path's K, so it only
    ever differs from the exact answer by the votes not yet cast. The resampling
    generator is keyed by the image's crop seed: the result stays a function of
    the image, the seed and the weights.
    """

    chunk: int = 8
    min_k: int = 32
    flip: float = 0.01
    tol: float = 0.007
    draws: int = 256

    def next_chunk(self, done: int, k: int) -> int:
        """How many crops to draw after ``done`` of at most ``k``."""
        return min(k - done, max(self.min_k - done, self.chunk))

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.min_k < 1 or self.draws < 1:
            raise ValueError(f"chunk, min_k and draws must be ≥ 1, got {self}")
        if not (0 <= self.flip < 1 and self.tol >= 0):
            raise ValueError(f"flip must be in [0,1) and tol ≥ 0, got {self}")


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
    The U-Net runs in PyTorch on both paths (an ONNX Runtime U-Net was tried:
    no measurable gain end to end, and 3 of 49 masks differed in a few pixels).
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
    centres: np.ndarray | None  # (k,2) int64 crop centres at 1024² (first patch learner's), or None
    k: int  # crops the answer used (= k_max on the exact path; fewer when sequential voting stopped early)
    seed: int
    status: str = "ok"  # ok | no_lung
    message: str = ""
    crop_probs: dict[str, np.ndarray] = field(default_factory=dict)  # learner → (k,M) per-crop probabilities
    k_max: int = 0  # crops of the exact path (the K asked for)
    backend: str = "torch"  # what ran the learners: torch | onnx
    path: str = "exact"  # exact (PyTorch, all k_max crops) | fast (fast backend, sequential vote)

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
                 calibrator: Calibrator, config: dict[str, Any], device: str | torch.device = "cpu",
                 backend: str = "auto") -> None:
        self.device = torch.device(device)
        self.backend = backend
        self._runners: dict[tuple[str, ...], tuple[Any, str]] = {}
        if segmenter.backend != "torch":  # the masks must be the training cache's, bit for bit (see prepare)
            segmenter = dataclasses.replace(segmenter, backend="torch")
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
                        segmenter: LungSegmenter | str | os.PathLike[str] | None = None,
                        backend: str = "auto") -> Classifier:
        """Load a classifier saved by :meth:`save_pretrained` (names resolved by :func:`patchflannel.hub.resolve_weights`).

        ``segmenter``: a :class:`LungSegmenter` or weights name/path; default: the one named in the config.
        ``backend``: what runs the learners on the fast path (see :mod:`patchflannel.backend`).
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
        return cls(segmenter, learners, combiner, Calibrator.from_dict(cfg.get("calibration")), cfg, device, backend)

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

    def _group_logits(self, names: Sequence[str], x: torch.Tensor, exact: bool, chunk: int = 256) -> torch.Tensor:
        """Every member of the learners ``names`` (one input spec) on crops ``x (N,1,P,P)`` →
        logits ``(members, N, M)`` float32 on the CPU, members in learner order."""
        models = [m for n in names for m in self.learners[n]]
        run = None if exact else self._runner(names)
        out = []
        for s in range(0, x.shape[0], chunk):
            xs = x[s:s + chunk]
            out.append((torch.stack([m(xs) for m in models]) if run is None else run(xs)).float().cpu())
        return torch.cat(out, dim=1)

    def _runner(self, names: Sequence[str]) -> Any:
        """The fast-backend forward of every member of the learners ``names`` (built on first use)."""
        key = tuple(names)
        if key not in self._runners:
            models = [m for n in names for m in self.learners[n]]
            self._runners[key] = fast_runner(models, models[0].input_spec.side, self.backend, self.device,
                                             models[0].in_chans)
        return self._runners[key][0]

    def backend_used(self, exact: bool = False) -> str:
        """``torch`` or ``onnx``: what ran (or will run) the learners."""
        if exact or self.backend == "torch":
            return "torch"
        kinds = {b for _, b in self._runners.values()}
        return (kinds.pop() if len(kinds) == 1 else "mixed") if kinds else self.backend

    def _member_votes(self, names: Sequence[str], x: torch.Tensor, exact: bool
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Crops ``x (B,c,1,P,P)`` → per learner: (per-crop vote (B,c,M) averaged over its members,
        per-crop softmax averaged over its members)."""
        b, c = x.shape[:2]
        logits = self._group_logits(names, x.reshape(b * c, *x.shape[2:]), exact)
        soft = torch.softmax(logits, dim=2)
        votes = soft if self.distribution == "soft" else F.one_hot(logits.argmax(2), soft.shape[2]).float()
        out, start = {}, 0
        for n in names:
            m = len(self.learners[n])
            out[n] = (votes[start:start + m].mean(0).view(b, c, -1), soft[start:start + m].mean(0).view(b, c, -1))
            start += m
        return out

    @torch.inference_mode()
    def votes(self, prep: Prepared, k: int, seed: int, stop: StopRule | None = None, exact: bool = False,
              keep_crops: bool = False) -> list[dict[str, Any]]:
        """Each image's learner distributions from its crops.

        The crops of image b are the first ones of its stream (generator keyed by its
        content and ``seed``); with ``stop`` = None all ``k`` are used, otherwise the
        :class:`StopRule` decides per image how many. ``exact`` runs the PyTorch
        models (the reference); otherwise the fast backend.

        Returns per image: ``P`` (N,M) tensor, ``k`` crops used, ``centres`` (k,2) of
        the first patch group (or None), ``crops`` {learner: (k,M) per-crop softmax}
        when ``keep_crops``.
        """
        n_img = prep.work.shape[0]
        seeds = [image_seed(w, seed) for w in prep.work[:, 0].numpy()]
        work, masks = prep.work.to(self.device), prep.masks.to(self.device)
        groups = list(self._groups().values())
        col = {n: i for i, n in enumerate(self.names)}
        n_cls = len(self.classes)
        const = torch.zeros(n_img, len(self.names), n_cls)  # learners that see the whole image: one vote each
        patch: list[tuple[list[str], InputSpec, tuple[torch.Tensor, torch.Tensor], list[torch.Generator]]] = []
        out: list[dict[str, Any]] = [{"k": 0, "chunks": [], "centres": [], "crops": {}} for _ in range(n_img)]
        for names in groups:
            spec: InputSpec = self.learners[names[0]][0].input_spec
            if spec.mode == "global":
                x, _, _ = make_inputs(work, masks, spec, 1)
                for n, (v, sm) in self._member_votes(names, x, exact).items():
                    const[:, col[n]] = v[:, 0]
                    if keep_crops:
                        for b in range(n_img):
                            out[b]["crops"][n] = [sm[b]]
            else:
                patch.append((names, spec, crop_source(work, masks, spec), image_generators(seeds)))
        active = list(range(n_img)) if patch else []
        while active:
            done = out[active[0]]["k"]  # every active image has drawn as many crops
            c = k - done if stop is None else stop.next_chunk(done, k)
            q = const[active].unsqueeze(1).repeat(1, c, 1, 1)  # (A,c,N,M)
            first = None
            for names, spec, (small, small_masks), gens in patch:
                x, centres = draw_crops(small[active], small_masks[active], spec, c, [gens[b] for b in active])
                first = centres.cpu() if first is None else first
                for n, (v, sm) in self._member_votes(names, x, exact).items():
                    q[:, :, col[n]] = v
                    if keep_crops:
                        for i, b in enumerate(active):
                            out[b]["crops"].setdefault(n, []).append(sm[i])
            for i, b in enumerate(active):
                out[b]["chunks"].append(q[i])
                out[b]["centres"].append(first[i])
                out[b]["k"] += c
            if out[active[0]]["k"] >= k or stop is None:
                break
            active = [b for b in active if not self.settled(torch.cat(out[b]["chunks"]), k, seeds[b], stop)]
        result = []
        for b in range(n_img):
            o = out[b]
            P = torch.cat(o["chunks"]).mean(0) if o["chunks"] else const[b]
            result.append({"P": P.float(), "k": o["k"] if o["chunks"] else 1,
                           "centres": torch.cat(o["centres"]).numpy() if o["centres"] else None,
                           "crops": {n: torch.cat(v).numpy() for n, v in o["crops"].items()}})
        return result

    def settled(self, q: torch.Tensor, k: int, seed: int, stop: StopRule) -> bool:
        """Would the remaining ``k − n`` crops leave the answer of the ``n`` seen (``q (n,N,M)``) as it is?"""
        n = q.shape[0]
        if n >= k:
            return True
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (stop.draws, k - n), generator=g)
        sims = (q.sum(0) + q[idx].sum(1)) / k  # (S,N,M): simulated K-crop votes
        now, _, _ = self.combine(q.mean(0, keepdim=True))
        probs, _, _ = self.combine(sims)
        flip = float(np.mean(probs.argmax(1) != now.argmax(1)))
        dev = float(np.abs(probs - now).mean())
        return flip <= stop.flip and dev <= stop.tol

    def learner_distributions(self, prep: Prepared, k: int, seed: int, keep_crops: bool = False
                              ) -> tuple[torch.Tensor, np.ndarray | None, dict[str, np.ndarray]]:
        """The exact path's distributions, stacked: ``P (B,N,M)``, centres of the first patch group
        ``(B,K,2)`` (or None) and (``keep_crops``) each learner's per-crop probabilities ``(B,K,M)``."""
        res = self.votes(prep, k, seed, stop=None, exact=True, keep_crops=keep_crops)
        P = torch.stack([r["P"] for r in res])
        centres = None if res[0]["centres"] is None else np.stack([r["centres"] for r in res])
        crops = {n: np.stack([r["crops"][n] for r in res]) for n in res[0]["crops"]} if keep_crops else {}
        return P, centres, crops

    @torch.inference_mode()
    def combine(self, P: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``P (B,N,M)`` → (calibrated probabilities, raw probabilities, FLANNEL weights or None)."""
        out = self.combiner(P.to(self.device))
        z, w = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        z = z.double().cpu()
        return (torch.softmax(self.calibrator(z), dim=1).numpy(), torch.softmax(z, dim=1).numpy(),
                None if w is None else w.double().cpu().numpy())

    def predict(self, images: Any, k: int | None = None, seed: int = 0, batch_size: int = 1,
                keep_crops: bool = False, exact: bool = False, stop: StopRule | None = None,
                sequential: bool = True, workers: int | None = 1) -> list[Prediction]:
        """Images (paths, arrays, lists: see :func:`patchflannel.io.as_images`) → one :class:`Prediction` each.

        Default (fast) path: the learners run on the fast backend (``self.backend``)
        and each image's crops are voted sequentially (``stop``, default
        :class:`StopRule`), up to ``k``; ``sequential=False`` uses all ``k``.
        ``exact=True``: the reference path: PyTorch models, all ``k`` crops.
        ``workers``: batches predicted side by side (see :meth:`predict_stream`; None = one per
        CPU thread, as ``patchflannel predict`` does).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        k, rule, n = self._stream_options(k, exact, stop, sequential, workers)
        imgs = as_images(images)  # converted once here; the workers take the arrays as they are
        batches = ((None, imgs[s:s + batch_size]) for s in range(0, len(imgs), batch_size))
        return [p for _, preds in self._stream(batches, k, seed, keep_crops, rule, exact, n, converted=True)
                for p in preds]

    def resolve_workers(self, workers: int | None) -> int:
        """How many batches run side by side: ``None`` = one per CPU thread, at most 4 (exact and
        fast path alike) on the CPU; always 1 on GPUs."""
        if workers is None:
            return max(1, min(torch.get_num_threads(), 4)) if self.device.type == "cpu" else 1
        if int(workers) < 1:
            raise ValueError(f"workers must be ≥ 1, got {workers}")
        return int(workers) if self.device.type == "cpu" else 1

    def predict_stream(self, batches: Iterable[tuple[Any, Sequence[Any]]], k: int | None = None, seed: int = 0,
                       keep_crops: bool = False, exact: bool = False, stop: StopRule | None = None,
                       sequential: bool = True, workers: int | None = 1, *, converted: bool = False
                       ) -> Iterator[tuple[Any, list[Prediction]]]:
        """``(tag, images)`` batches (consumed lazily; images as :func:`~patchflannel.io.as_images`
        takes them, converted in the worker; ``converted=True``: they already are ``(H,W)`` float32
        [0,1] arrays from :func:`~patchflannel.io.read_image` or ``as_images``, used as they are)
        → ``(tag, predictions)``, in input order.

        With ``workers`` > 1 (None: one per CPU thread, :meth:`resolve_workers`;
        ``patchflannel predict``'s default), that many batches are predicted side
        by side, each in its own thread with its own ONNX Runtime session, and
        PyTorch's intra-op threads divided among them (1 each on 2 cores; set
        while any stream runs, restored after the last one ends): the serial
        parts of one image (mask post-processing, sampling, the stop rule)
        overlap the network work of another, and the small convolutions of the
        learners run better on one thread each than on two threads together
        (docs/results.md §6). At most ``workers + 1`` batches are in flight. A
        single batch runs as it would alone, on every thread.

        An image's crops depend only on the image and ``seed``, never on the
        workers. Kernels on one thread and on two differ by float rounding
        (|Δp| ~ 1e-8 measured); the same mask, hence the same crops and the same
        stopping point, is what was measured on the 965 development images
        (labels and crop counts identical with and without workers), not a
        guarantee for every image: a lung-probability pixel within ~1e-7 of the
        threshold could flip.
        """
        k, rule, n = self._stream_options(k, exact, stop, sequential, workers)
        return self._stream(batches, k, seed, keep_crops, rule, exact, n, converted)

    def _stream_options(self, k: int | None, exact: bool, stop: StopRule | None, sequential: bool,
                        workers: int | None) -> tuple[int, StopRule | None, int]:
        """Checked (crops asked for, stop rule or None, workers)."""
        k = self.default_k if k is None else int(k)
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        return k, None if exact or not sequential else (stop or StopRule()), self.resolve_workers(workers)

    def _stream(self, it: Iterable[tuple[Any, Sequence[Any]]], k: int, seed: int, keep_crops: bool,
                rule: StopRule | None, exact: bool, n: int, converted: bool = False
                ) -> Iterator[tuple[Any, list[Prediction]]]:
        it = iter(it)

        def job(imgs: Sequence[Any]) -> list[Prediction]:
            if not len(imgs):
                return []
            return self._predict_batch(list(imgs) if converted else as_images(list(imgs)), k, seed, keep_crops, rule,
                                       exact)

        head = list(itertools.islice(it, 2)) if n > 1 else []
        if n == 1 or len(head) < 2:  # one batch runs as it would alone, on every thread
            for tag, imgs in itertools.chain(head, it):
                yield tag, job(imgs)
            return
        if not exact:  # built once, before the threads (each runner sizes its sessions by the thread count)
            for names in self._groups().values():
                self._runner(names)
        slots = itertools.count()
        pool = ThreadPoolExecutor(n, thread_name_prefix="patchflannel-predict",
                                  initializer=lambda: bind_session(next(slots)))
        pending: deque[tuple[Any, Future[list[Prediction]]]] = deque()
        clean = False
        _divide_threads(n)
        try:
            for tag, imgs in itertools.chain(head, it):
                pending.append((tag, pool.submit(job, imgs)))
                if len(pending) > n:
                    tag0, fut = pending.popleft()
                    yield tag0, fut.result()
            while pending:
                tag0, fut = pending.popleft()
                yield tag0, fut.result()
            clean = True
        finally:
            # On an error or an early close (Ctrl-C, the caller stopped), do not wait for the batches still running.
            pool.shutdown(wait=clean, cancel_futures=True)
            _restore_threads()

    def _predict_batch(self, imgs: Sequence[np.ndarray], k: int, seed: int, keep_crops: bool,
                       stop: StopRule | None, exact: bool) -> list[Prediction]:
        prep = prepare(imgs, self.segmenter)
        res = self.votes(prep, k, seed, stop=stop, exact=exact, keep_crops=keep_crops)
        P = torch.stack([r["P"] for r in res])
        probs, raw, w = self.combine(P)
        backend = self.backend_used(exact)
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
                centres=res[i]["centres"], k=res[i]["k"], seed=seed, status=status, message=msg,
                crop_probs=res[i]["crops"], k_max=k, backend=backend, path="exact" if exact else "fast"))
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
