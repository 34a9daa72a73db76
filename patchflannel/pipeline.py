"""The whole pipeline on new radiographs, with shipped weights:

read → resize to 1024² → lung mask → K in-lung crops (drawn once, shared by all
learners) → every learner's fold models vote → the learner's distribution P_i
(mean over its fold models, as for the test part in ``train-patch``) → FLANNEL
weights w → ŷ = softmax(Σ w_i P_i).

Shipped layout (``weights/``)::

    lung_unet.safetensors/.json                  the segmenter
    ensemble/flannel.safetensors/.json           FLANNEL weight module (lists its learners)
    ensemble/learners/<learner>_fold<f>.safetensors/.json   each learner's fold models
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cxr import CLASSES
from .io import resize, to_uint8
from .patch_train import downscale, patch_scale
from .segment import DEFAULT_WEIGHTS, WORK_SIZE, LungSegmenter, postprocess
from .weights import WEIGHTS_DIR, WeightsNotFoundError, load_state, load_weights, save_weights, write_json

log = logging.getLogger(__name__)

DEFAULT_ENSEMBLE = WEIGHTS_DIR / "ensemble"


@dataclass
class Prediction:
    probs: np.ndarray  # (M,) FLANNEL class distribution
    learner_probs: np.ndarray  # (N,M) each learner's distribution
    learner_weights: np.ndarray  # (N,) FLANNEL weights w
    mask: np.ndarray  # (1024,1024) bool
    centres: np.ndarray  # (K,2) int64 at 1024²

    @property
    def label(self) -> str:
        return CLASSES[int(np.argmax(self.probs))]


class Pipeline:
    """Segmenter + learners' fold models + FLANNEL, ready for :meth:`predict`."""

    def __init__(self, segmenter: LungSegmenter, learners: dict[str, list[torch.nn.Module]], learner_cfg: dict[str, dict[str, Any]],
                 flannel: torch.nn.Module, flannel_cfg: dict[str, Any], device: torch.device) -> None:
        self.segmenter, self.learners, self.learner_cfg = segmenter, learners, learner_cfg
        self.flannel, self.flannel_cfg, self.device = flannel.to(device).eval(), flannel_cfg, device
        self.names = list(flannel_cfg["learners"])
        first = learner_cfg[self.names[0]]
        self.patch_size = int(first["patch_size"])
        self.learner_input = int(first.get("learner_input") or self.patch_size)
        self.mask_outside = bool(first.get("mask_outside", True))
        for n in self.names:
            c = learner_cfg[n]
            if (int(c["patch_size"]), int(c.get("learner_input") or c["patch_size"]), bool(c.get("mask_outside", True))) != \
                    (self.patch_size, self.learner_input, self.mask_outside):
                raise ValueError(f"learner {n} expects other patches than {self.names[0]}; one crop set must serve all")

    @classmethod
    def from_weights(cls, ensemble_dir: str | os.PathLike = DEFAULT_ENSEMBLE, seg_weights: str | os.PathLike = DEFAULT_WEIGHTS,
                     device: str | torch.device = "cpu") -> "Pipeline":
        from .ensemble_run import load_flannel
        from .learners import create_learner

        device = torch.device(device)
        ensemble_dir = Path(ensemble_dir)
        seg = LungSegmenter.from_pretrained(seg_weights, device=device)
        flannel, fcfg = load_flannel(ensemble_dir / "flannel")
        learners: dict[str, list[torch.nn.Module]] = {}
        lcfg: dict[str, dict[str, Any]] = {}
        for name in fcfg["learners"]:
            if name.startswith("global-"):
                raise ValueError(f"{ensemble_dir}: predict uses patch learners; this FLANNEL is over global learner {name}")
            files = sorted((ensemble_dir / "learners").glob(f"{name}_fold*.safetensors"))
            if not files:
                raise WeightsNotFoundError(f"no fold models for learner {name} in {ensemble_dir / 'learners'} "
                                           f"(expected {name}_fold0.safetensors + .json …)")
            models = []
            for f in files:
                state, cfg = load_weights(f, device=device)
                m = create_learner(cfg["learner"], num_classes=len(cfg["classes"]), in_chans=1, pretrained=False)
                load_state(m, {k: v.float() for k, v in state.items()})
                models.append(m.to(device).eval())
                lcfg[name] = cfg
            learners[name] = models
        return cls(seg, learners, lcfg, flannel, fcfg, device)

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray], k: int = 100, seed: int = 0, chunk: int = 256) -> list[Prediction]:
        """Radiographs ``(H,W) float32 [0,1]`` → one :class:`Prediction` each."""
        from .sampler import sample_patches
        from .vote import predict_distribution, vote

        work = [resize(im, WORK_SIZE, "area") for im in images]
        probs = self.segmenter.predict_prob(work)
        masks = [postprocess(p, self.segmenter.threshold) for p in probs]
        # uint8 as in the training cache, so inputs match what the learners saw.
        imgs = torch.from_numpy(np.stack([to_uint8(w) for w in work])).unsqueeze(1).to(self.device)
        msk = torch.from_numpy(np.stack(masks)).unsqueeze(1).to(self.device)
        factor = patch_scale(self.patch_size, self.learner_input)
        imgs, msk = downscale(imgs, msk, factor)  # as in training (patch_train.InputMaker)
        gen = torch.Generator().manual_seed(seed)
        crops, centres = sample_patches(imgs, msk, k, size=self.learner_input, generator=gen, mask_outside=self.mask_outside)
        centres = centres * factor  # report centres at 1024²
        x = crops.float().div_(255.0)
        dist_key = self.flannel_cfg.get("distribution", "soft")
        per_learner = []
        for name in self.names:
            fold_dists = []
            for model in self.learners[name]:
                hard, soft = vote(predict_distribution(model, x, chunk_size=chunk))
                fold_dists.append(soft if dist_key == "soft" else hard)
            per_learner.append(torch.stack(fold_dists).mean(0))
        P = torch.stack(per_learner, dim=1).float()  # (B,N,M)
        z, w = self.flannel(P)
        y = torch.softmax(z, dim=1)
        return [Prediction(y[i].cpu().numpy(), P[i].cpu().numpy(), w[i].cpu().numpy(), masks[i], centres[i].cpu().numpy())
                for i in range(len(images))]


def export_ensemble(ensemble_out: str | os.PathLike, dest: str | os.PathLike = DEFAULT_ENSEMBLE, half: bool = True) -> Path:
    """Copy a FLANNEL model and the fold models of its learners into ``dest``.

    ``ensemble_out`` is an ``ensemble`` output folder; its ``flannel.json``
    names the train-patch runs and learners. Learner weights are stored in
    float16 when ``half`` (halves the repository size; predictions are made
    in float32).
    """
    import json

    src = Path(ensemble_out)
    dest = Path(dest)
    state, fcfg = load_weights(src / "flannel")
    (dest / "learners").mkdir(parents=True, exist_ok=True)
    save_weights(state, dest / "flannel", fcfg)
    for name in fcfg["learners"]:
        found = False
        for run in fcfg.get("source_runs", []):
            ldir = Path(run) / name
            for fold in sorted(ldir.glob("fold*/best.safetensors")):
                st, cfg = load_weights(fold)
                if half:
                    st = {k: (v.half() if v.is_floating_point() else v) for k, v in st.items()}
                    cfg["stored_dtype"] = "float16"
                save_weights(st, dest / "learners" / f"{name}_{fold.parent.name}", cfg)
                found = True
            if found:
                metrics = ldir / "metrics.json"
                if metrics.exists():
                    m = json.loads(metrics.read_text())
                    write_json(dest / "learners" / f"{name}_metrics.json", {"test_summary": m.get("test_summary")})
                break
        if not found:
            raise WeightsNotFoundError(f"fold models of learner {name} not found in the source runs {fcfg.get('source_runs')}")
    for extra in ("table.md", "claims.md"):
        if (src / extra).exists():
            shutil.copyfile(src / extra, dest / extra)
    return dest
