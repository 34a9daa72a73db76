"""Training base learners on in-lung patches (or whole images) over patient-grouped folds,
and their out-of-fold and held-out votes.

Run folder written by :func:`train_patch_run`::

    RUN/config.yaml                 resolved config
    RUN/split.json                  held-out test ids, fold ids (grouped by patient, near-duplicates merged),
                                    and the fingerprint of the data they were made from
    RUN/<learner>/fold<f>/          checkpoint.pt (every epoch), history.csv, best/ (a Learner folder), votes.npz (its votes: done)
    RUN/<learner>/refit/            the learner retrained on every non-test image (what ships), same files
    RUN/<learner>/oof.npz           out-of-fold distributions of every non-test image (the ensemble's training data)
    RUN/<learner>/test.npz          held-out distributions: each fold model's, and the refit model's
    RUN/<learner>/metrics.json      test metrics of each fold model, their mean, the refit model; OOF metrics

Vote files (``numpy.savez``; class names in ``classes``): ``oof.npz`` has ``ids, y, fold, soft (n,M),
hard (n,M), groups, patients, sources, age_groups, views, findings, classes, k``; ``test.npz`` the same
keys with ``soft``/``hard`` of shape ``(t,F,M)`` (one slice per fold model) plus ``soft_refit``/``hard_refit``
``(t,M)`` when a refit model exists. ``soft`` is the mean patch softmax, ``hard`` the fraction of the K
patches voting for each class; crops are drawn exactly as ``predict`` draws them (same seed rule).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from ._files import file_sha256, write_json, write_npz
from .config import Section, config_to_yaml
from .data import CLASSES, CxrData, check_grouped, inner_validation, make_splits, subsample_groups
from .errors import ConfigChangedError, DataError, ResumeError
from .learners import InputSpec, Learner, create_learner, list_learners, make_inputs
from .pipeline import image_seed
from .runtime import Dist
from .training import LoopSettings, Trainer, Track, epoch_batches, item_seed, no_track
from .vote import predict_distribution, vote

log = logging.getLogger(__name__)

GLOBAL_PREFIX = "global-"


# --------------------------------------------------------------------------- config


class PatchDataConfig(Section):
    sources: list[str] = ["../shared/data/cxr"]  # metadata.csv folders, Kaggle folders, ieee8023 CSVs; jsrt:PATH adds JSRT normals
    cache: str = "runs/cache/cxr_1024.h5"  # work images + lung masks, built once with `segmenter`
    segmenter: str = "lung_unet_jsrt"
    exclude_findings: list[str] = []  # e.g. [pneumocystis, aspergillosis]: leave those images out
    dedup: bool = True  # merge near-identical images of different patients into one group before splitting
    train_only: list[str] = []  # sources added to every training part, never validated or tested on (e.g. jsrt:PATH)
    train_only_holdout: float = Field(default=0.3, ge=0, lt=1)  # share of them held out as an external check set


class PatchSplitConfig(Section):
    test_frac: float = Field(default=0.2, gt=0, lt=0.5)
    folds: int = Field(default=3, ge=2, le=20)
    val_frac: float = Field(default=0.15, gt=0, lt=0.5)
    run_folds: list[int] | None = None  # screening: train only these folds (no refit, no complete OOF votes)
    train_fraction: float = Field(default=1.0, gt=0, le=1)  # learning curves: keep this share of each fold's training patients
    subset_seed: int | None = Field(default=None, ge=0, lt=2**31)  # learning curves: which patients are kept (default: seed); another value, another draw


class PatchInputConfig(Section):
    patch_size: int = Field(default=224, ge=16, le=1024)  # crop field of view at 1024²
    learner_input: int = Field(default=112, ge=16, le=1024)  # crop side fed to the learner
    global_size: int = Field(default=224, ge=32, le=1024)  # whole-image side for global-NAME learners
    mask_outside: bool = True  # patches: zero the image outside the lungs
    mask_global: bool = False  # global learners: lungs only
    blank_lungs_global: bool = False  # global learners: everything but the lungs (an ablation: what the rest tells)
    normalise: Literal["none", "lung_zscore"] = "none"

    @model_validator(mode="after")
    def _multiple(self) -> PatchInputConfig:
        if self.patch_size % self.learner_input:
            raise ValueError(f"patch_size {self.patch_size} must be a multiple of learner_input {self.learner_input}")
        if self.mask_global and self.blank_lungs_global:
            raise ValueError("mask_global (lungs only) and blank_lungs_global (all but the lungs) exclude each other")
        return self


class PatchTrainSection(Section):
    epochs: int = Field(default=40, ge=1)
    patience: int = Field(default=12, ge=1)
    batch_size: int = Field(default=64, ge=1)  # crops per global step (patch) / images per step (global)
    patches_per_image: int = Field(default=8, ge=1)  # fresh random in-lung crops per image per step
    lr: float = Field(default=1e-3, gt=0)
    lr_patience: int = Field(default=4, ge=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    bn_momentum: float | None = Field(default=0.1, gt=0, le=1)  # null = the backbone's own
    # balanced sampling: by class, by class × age group, or by class × source (every source equal within a class)
    sampling: Literal["none", "class", "class_age", "class_source"] = "class"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augment: float = Field(default=1.0, ge=0, le=2)  # strength of the intensity jitter (and global affine)
    refit: bool = True  # after the folds, retrain on every non-test image for median(best epochs) epochs: what ships


class PatchTrainConfig(Section):
    """``configs/patch_cpu.yaml`` and friends; see the comments there."""

    seed: int = Field(default=0, ge=0, lt=2**31)
    data: PatchDataConfig = PatchDataConfig()
    split: PatchSplitConfig = PatchSplitConfig()
    input: PatchInputConfig = PatchInputConfig()
    learners: list[str] = ["shufflenet_v2_x1_0"]  # NAME = patch learner, global-NAME = whole-image learner
    pretrained: bool | str | None = None  # null/false = random init; true = torchvision ImageNet weights from $TORCH_HOME; or a path
    k: int = Field(default=100, ge=1, le=2000)  # crops per image when voting (out-of-fold and test)
    k_val: int = Field(default=16, ge=1, le=2000)  # crops per image for early stopping
    train: PatchTrainSection = PatchTrainSection()

    @field_validator("learners")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        known = set(list_learners())
        bad = [n for n in v if n.removeprefix(GLOBAL_PREFIX) not in known]
        if bad:
            raise ValueError(f"unknown learner(s) {bad}; choose from {sorted(known)} (global-NAME for whole-image)")
        if len(set(v)) != len(v):
            raise ValueError("a learner is listed twice")
        if not v:
            raise ValueError("no learners")
        return v

    @model_validator(mode="after")
    def _curve(self) -> PatchTrainConfig:
        if self.split.train_fraction < 1 and self.train.refit and self.split.run_folds is None:
            raise ValueError("split.train_fraction < 1 is for learning curves on the folds: set train.refit=false "
                             "(a refit model trains on every non-test image)")
        if self.split.subset_seed is not None and self.split.train_fraction >= 1:
            raise ValueError("split.subset_seed draws which patients a learning-curve point keeps: set "
                             "split.train_fraction < 1, or leave subset_seed unset")
        return self


def learning_curve_subset(train_idx: list[int], labels: np.ndarray, groups: list[str], cfg: PatchTrainConfig,
                          fold: int) -> list[int]:
    """Fold ``fold``'s training images at ``split.train_fraction`` of its patients (all when 1): the draw is
    seeded by ``split.subset_seed`` (default ``seed``) and the fold, so another subset seed gives another
    draw while the split, the validation part and the training seeds stay those of ``seed``."""
    draw = cfg.seed if cfg.split.subset_seed is None else cfg.split.subset_seed
    return subsample_groups(train_idx, labels, groups, cfg.split.train_fraction, draw + fold)


def input_spec(name: str, cfg: PatchTrainConfig) -> InputSpec:
    i = cfg.input
    if name.startswith(GLOBAL_PREFIX):
        return InputSpec("global", i.patch_size, i.learner_input, i.global_size, i.mask_global, i.normalise,
                         blank_lungs=i.blank_lungs_global)
    return InputSpec("patch", i.patch_size, i.learner_input, i.global_size, i.mask_outside, i.normalise)


# --------------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, gen: torch.Generator, strength: float, global_mode: bool) -> torch.Tensor:
    """Radiograph-safe jitter of ``(N,1,P,P)`` float [0,1], batched: horizontal flips, brightness,
    contrast, gamma; for whole images also a small rotation, scale and shift."""
    n, dev = x.shape[0], x.device
    if strength <= 0:
        return x

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=gen)).to(dev)

    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    if global_mode:
        ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(7 * strength)
        scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.08 * strength
        shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.05 * strength
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    s = strength
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * u(1 - 0.15 * s, 1 + 0.15 * s) + mean + u(-0.08 * s, 0.08 * s)
    return x.clamp(0, 1).pow(u(1 - 0.2 * s, 1 + 0.25 * s))


# --------------------------------------------------------------------------- votes


@torch.inference_mode()
def votes(model: Learner, data: CxrData, idx: Sequence[int], k: int, seed: int, dist: Dist | None = None,
          batch_images: int = 8, chunk: int = 256, track: Track = no_track, what: str = "voting") -> tuple[np.ndarray, np.ndarray]:
    """``(soft, hard)`` distributions ``(n,M)`` of images ``idx`` from K crops each, drawn exactly as
    ``predict`` draws them (:func:`patchflannel.pipeline.image_seed`). Under torchrun the images are
    shared out over the ranks and gathered."""
    dist = dist or Dist()
    spec = model.input_spec
    kk = k if spec.mode == "patch" else 1
    mine = list(idx)[dist.rank::dist.world]
    soft, hard = [], []
    starts = range(0, len(mine), batch_images)
    for s in track(starts, what, len(starts)):
        sel = torch.as_tensor(mine[s:s + batch_images])
        work, masks = data.images[sel], data.masks[sel]
        seeds = [image_seed(w, seed) for w in work[:, 0].numpy()]
        x, _, _ = make_inputs(work.to(dist.device), masks.to(dist.device), spec, kk, seeds=seeds)
        h, p = vote(predict_distribution(model, x, chunk_size=chunk))
        soft.append(p.cpu().numpy())
        hard.append(h.cpu().numpy())
    m = model.num_classes
    local = (np.concatenate(soft) if soft else np.zeros((0, m), np.float32), np.concatenate(hard) if hard else np.zeros((0, m), np.float32))
    if not dist.enabled:
        return local
    parts = dist.all_gather_object(local)
    n = len(idx)
    out_s, out_h = np.zeros((n, m), np.float32), np.zeros((n, m), np.float32)
    for r, (ps, ph) in enumerate(parts):
        out_s[r::dist.world], out_h[r::dist.world] = ps, ph
    return out_s, out_h


def _macro_f1(y: np.ndarray, pred: np.ndarray, m: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=list(range(m)), average="macro", zero_division=0))


# --------------------------------------------------------------------------- one model


def sample_weights(data: CxrData, idx: Sequence[int], rule: str) -> np.ndarray | None:
    """Balanced-sampling weights over ``idx``: 1/count(class), 1/count(class × age group), or for
    ``class_source`` every class the same mass shared equally by its sources (1/(count(class × source) ·
    sources in the class)), so a source's few images of a class weigh as much as another's many."""
    if rule == "none":
        return None
    second = {"class_age": data.age_groups, "class_source": data.sources}.get(rule)
    keys = [(int(data.labels[i]), second[i] if second is not None else "") for i in idx]
    counts = Counter(keys)
    per_class = Counter(c for c, _ in counts)
    if rule == "class_source":
        return np.array([1.0 / (counts[kk] * per_class[kk[0]]) for kk in keys])
    return np.array([1.0 / counts[kk] for kk in keys])


def train_model(name: str, data: CxrData, train_idx: list[int], val_idx: list[int] | None, cfg: PatchTrainConfig,
                out_dir: Path, dist: Dist, precision: str = "fp32", epochs: int | None = None, seed: int = 0,
                track: Track = no_track, restart: bool = False, label: str = "") -> tuple[Learner, dict[str, Any]]:
    """Train one learner on ``train_idx`` through :class:`~patchflannel.training.Trainer`.

    With ``val_idx``: early stopping on validation macro-F1 (K = ``k_val``); without (refit):
    exactly ``epochs`` epochs, the last one kept. Returns the best model and the run's summary.
    """
    spec = input_spec(name, cfg)
    arch = name.removeprefix(GLOBAL_PREFIX)
    torch.manual_seed(seed)
    model = create_learner(arch, num_classes=len(CLASSES), in_chans=1, pretrained=_pretrained(cfg.pretrained),
                           classes=CLASSES, input_spec=spec)
    if cfg.train.bn_momentum is not None:
        # MobileNetV3 ships BN momentum 0.01, tuned for long ImageNet runs; with a few hundred steps from
        # scratch its running statistics lag and eval-mode predictions collapse.
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.momentum = float(cfg.train.bn_momentum)
    t = cfg.train
    opt = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    refit = val_idx is None
    settings = LoopSettings(epochs=epochs or t.epochs, patience=t.patience if not refit else 10**6,
                            monitor="epoch" if refit else "val_macro_f1", lr_patience=None if refit else t.lr_patience)
    # A fold run's length is train.epochs (resumable: raise it to train longer); a refit's is fixed by the
    # folds' best epochs, so it is part of what the checkpoint must match.
    run_cfg = {"config": cfg.model_dump(mode="json"), "learner": name, "seed": seed,
               **({"refit_epochs": settings.epochs} if refit else {}),
               "train_ids": [data.ids[i] for i in train_idx], "val_ids": [data.ids[i] for i in val_idx or []]}
    trainer = Trainer(model, opt, settings, run_dir=out_dir, config=run_cfg, dist=dist, precision=precision,
                      name=label or name, restart=restart)
    k_train = 1 if spec.mode == "global" else t.patches_per_image
    per_step = max(1, t.batch_size // k_train)
    weights = sample_weights(data, train_idx, t.sampling)
    train_arr = np.asarray(train_idx)

    def batches(epoch: int) -> list[dict[str, Any]]:
        pos = epoch_batches(len(train_idx), per_step, seed, epoch, weights)
        return [{"epoch": epoch, "step": s, "items": train_arr[p]} for s, p in enumerate(pos)]

    def step(net: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        positions = list(range(len(batch["items"])))[dist.rank::dist.world]
        sel = torch.as_tensor(batch["items"][positions])
        seeds = [item_seed(seed, batch["epoch"], batch["step"], p) for p in positions]
        x, _, cm = make_inputs(data.images[sel].to(dist.device), data.masks[sel].to(dist.device), spec, k_train,
                               seeds=seeds, with_masks=spec.mask_outside or spec.blank_lungs)
        x = x.flatten(0, 1)
        gen = torch.Generator().manual_seed(item_seed(seed, batch["epoch"], batch["step"], 991, dist.rank))
        x = augment(x, gen, t.augment, spec.mode == "global")
        if cm is not None:  # the blanked area (outside the lungs, or the lungs) stays exactly 0, as at inference
            x = x * cm.flatten(0, 1).to(x.dtype)
        target = torch.as_tensor(data.labels[batch["items"][positions]], device=dist.device).repeat_interleave(k_train)
        logits = net(x)
        loss = F.cross_entropy(logits.float(), target, reduction="sum", label_smoothing=t.label_smoothing)
        return loss, int(target.numel())

    def validate(net: torch.nn.Module) -> dict[str, float]:
        if refit:
            return {"epoch": float(trainer.epoch + 1)}
        soft, _ = votes(net, data, val_idx, cfg.k_val, seed + 999, dist)
        return {"val_macro_f1": _macro_f1(data.labels[val_idx], soft.argmax(1), len(CLASSES))}

    def on_best(module: torch.nn.Module, metrics: dict[str, float]) -> None:
        module.info = {"member": out_dir.name, "training": {"learner": name, "best_epoch": trainer.epoch + 1,
                                                            "n_train": len(train_idx), "seed": seed, **metrics}}
        module.save_pretrained(out_dir / "best")

    result = trainer.fit(batches, step, validate, on_best, lambda b: len(b["items"]) * k_train, track)
    dist.barrier()
    best = Learner.from_pretrained(out_dir / "best", dist.device)
    weights = out_dir / "best" / "model.safetensors"
    digest = file_sha256(weights)[:16] if weights.is_file() else "none"
    return best, {"best_epoch": result.best_epoch, "best_score": result.best_score, "epochs_run": result.epochs_run,
                  "seconds": result.seconds, "hash": trainer.hash, "weights": digest}


def _pretrained(value: str | None) -> bool | str:
    if value is None or str(value).lower() in ("none", "null", "false", ""):
        return False
    return True if str(value).lower() == "true" else str(value)


# --------------------------------------------------------------------------- the split


def split_fingerprint(data: CxrData) -> str:
    rows = sorted(f"{i}|{data.labels[k]}|{data.groups[k]}|{data.roles[k]}" for k, i in enumerate(data.ids))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def prepare_split(data: CxrData, cfg: PatchTrainConfig, run_dir: Path, dist: Dist, rebuild: bool = False) -> dict[str, Any]:
    """The run's split: made once (grouped by patient, near-duplicates merged) and saved with the data's
    fingerprint; a saved split of other data is refused (``--rebuild`` makes a new one)."""
    path = run_dir / "split.json"
    fp = split_fingerprint(data)
    index = {k: i for i, k in enumerate(data.ids)}
    saved = None
    if path.exists() and not rebuild:
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict) or not {"test", "folds"} <= set(saved):
                raise ValueError("missing test/folds")
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable split ({exc}); delete it or pass --rebuild") from None
        if saved.get("fingerprint") != fp or len(saved["folds"]) != cfg.split.folds or saved.get("seed") != cfg.seed:
            raise DataError(f"{path} was made for other data or settings (fingerprint {saved.get('fingerprint')} vs "
                            f"{fp}, {len(saved['folds'])} vs {cfg.split.folds} folds, seed {saved.get('seed')} vs "
                            f"{cfg.seed}): pass --rebuild to make a new split (every learner of this run then retrains)")
    if saved is None:
        main = [i for i, r in enumerate(data.roles) if r == "main"]
        extra = [i for i, r in enumerate(data.roles) if r == "train_only"]
        s = make_splits(data.labels[main], [data.groups[i] for i in main], cfg.seed, cfg.split.test_frac, cfg.split.folds)
        ext: list[int] = []
        if extra and cfg.data.train_only_holdout > 0:
            groups = sorted({data.groups[i] for i in extra})
            rng = np.random.default_rng(cfg.seed)
            held = set(rng.permutation(groups)[: int(round(cfg.data.train_only_holdout * len(groups)))].tolist())
            ext = [i for i in extra if data.groups[i] in held]
        saved = {"seed": cfg.seed, "grouped_by": "patient_id, near-duplicates merged", "fingerprint": fp,
                 "n_duplicate_pairs": len(data.duplicates), "test": [data.ids[main[i]] for i in s["test"]],
                 "folds": [[data.ids[main[i]] for i in f] for f in s["folds"]],
                 "train_only": [data.ids[i] for i in extra if i not in set(ext)], "external": [data.ids[i] for i in ext]}
        if dist.is_main:
            write_json(path, saved)
    missing = [i for part in ("test", "folds", "train_only", "external") for i in _flat(saved.get(part, [])) if i not in index]
    if missing:
        raise DataError(f"{path}: {len(missing)} ids of the saved split are not in the data (e.g. {missing[0]}); pass --rebuild")
    split = {**saved, "test_idx": [index[i] for i in saved["test"]], "folds_idx": [[index[i] for i in f] for f in saved["folds"]],
             "train_only_idx": [index[i] for i in saved.get("train_only", [])],
             "external_idx": [index[i] for i in saved.get("external", [])]}
    check_grouped({"test": split["test_idx"] + split["external_idx"], "folds": split["folds_idx"]}, data.groups)
    return split


def _flat(x: Any) -> list[str]:
    return [j for i in x for j in (i if isinstance(i, list) else [i])]


# --------------------------------------------------------------------------- a learner over the folds


def run_learner(name: str, data: CxrData, split: dict[str, Any], cfg: PatchTrainConfig, run_dir: Path, dist: Dist,
                precision: str = "fp32", restart: bool = False, track: Track = no_track) -> dict[str, Any]:
    """Train ``name`` on every fold (and refit), write its votes and metrics."""
    from .metrics import classification_report_dict, summarise

    ldir = run_dir / name
    folds: list[list[int]] = split["folds_idx"]
    test_idx: list[int] = split["test_idx"]
    m = len(CLASSES)
    run_folds = cfg.split.run_folds if cfg.split.run_folds is not None else list(range(len(folds)))
    bad = [f for f in run_folds if not 0 <= f < len(folds)]
    if bad:
        raise DataError(f"split.run_folds {bad}: there are folds 0 … {len(folds) - 1}")
    n = len(data.ids)
    oof_soft, oof_hard = np.zeros((n, m), np.float32), np.zeros((n, m), np.float32)
    oof_fold = np.full(n, -1, np.int64)
    ext_idx: list[int] = split["external_idx"]
    ext_soft = np.zeros((len(ext_idx), len(run_folds), m), np.float32)
    test_soft = np.zeros((len(test_idx), len(run_folds), m), np.float32)
    test_hard = np.zeros_like(test_soft)
    reports, best_epochs = [], []
    for col, f in enumerate(run_folds):
        fdir = ldir / f"fold{f}"
        train_all = [i for g, fi in enumerate(folds) if g != f for i in fi]
        tr, va = inner_validation(train_all, data.labels, data.groups, cfg.split.val_frac, cfg.seed + f)
        # a learning curve's point: fewer training patients, the same validation part, OOF fold and test part
        tr = learning_curve_subset(tr, data.labels, data.groups, cfg, f) + split["train_only_idx"]
        model, info = train_model(name, data, tr, va, cfg, fdir, dist, precision, seed=cfg.seed + 100 * f, track=track,
                                  restart=restart, label=f"{name} fold {f}")
        best_epochs.append(info["best_epoch"])
        done = fdir / "votes.npz"
        # keyed by the best model's weights: training a finished fold longer may pick another best model
        key = f"{info['hash']}|best={info['weights']}|k={cfg.k}|{split['fingerprint']}"
        cached = _read_votes(done, key)
        if cached is None:
            os_, oh = votes(model, data, folds[f], cfg.k, cfg.seed, dist, track=track, what=f"{name} fold {f} OOF votes")
            ts, th = votes(model, data, test_idx + ext_idx, cfg.k, cfg.seed, dist, track=track,
                           what=f"{name} fold {f} test votes")
            if dist.is_main:
                write_npz(done, key=np.array(key), oof_soft=os_, oof_hard=oh, test_soft=ts, test_hard=th)
        else:
            os_, oh, ts, th = cached
        ts, th, es = ts[:len(test_idx)], th[:len(test_idx)], ts[len(test_idx):]
        ext_soft[:, col] = es
        oof_soft[folds[f]], oof_hard[folds[f]], oof_fold[folds[f]] = os_, oh, f
        test_soft[:, col], test_hard[:, col] = ts, th
        reports.append(classification_report_dict(data.labels[test_idx], ts, list(CLASSES), positive="covid"))
    refit: dict[str, Any] = {}
    if cfg.train.refit and cfg.split.run_folds is None:
        refit = refit_learner(name, data, split, cfg, ldir / "refit", dist, int(np.median(best_epochs)), cfg.seed + 7,
                              precision, restart, track)
    if not dist.is_main:
        return {}
    oof_idx = [i for f in run_folds for i in folds[f]]
    meta_oof, meta_test = data.subset(oof_idx), data.subset(test_idx)
    common = {"classes": np.array(CLASSES), "k": np.array(1 if name.startswith(GLOBAL_PREFIX) else cfg.k)}
    write_npz(ldir / "oof.npz", **meta_oof, fold=oof_fold[oof_idx], soft=oof_soft[oof_idx], hard=oof_hard[oof_idx], **common)
    write_npz(ldir / "test.npz", **meta_test, soft=test_soft, hard=test_hard, fold_ids=np.array(run_folds), **common,
              **{k: v for k, v in refit.items() if k in ("soft_refit", "hard_refit")})
    if ext_idx:
        ext_extra = {"soft_refit": refit["ext_refit"]} if refit else {}
        write_npz(ldir / "external.npz", **data.subset(ext_idx), soft=ext_soft, **ext_extra, **common)
    y_test = data.labels[test_idx]
    metrics: dict[str, Any] = {
        "learner": name, "input": input_spec(name, cfg).to_dict(), "k": cfg.k, "folds_run": run_folds,
        "best_epochs": best_epochs,
        "test_per_fold_model": reports, "test_summary": summarise(reports),
        "test_mean_of_fold_models": classification_report_dict(y_test, test_soft.mean(1), list(CLASSES), positive="covid"),
        "oof": classification_report_dict(data.labels[oof_idx], oof_soft[oof_idx], list(CLASSES), positive="covid"),
    }
    if refit:
        metrics["refit_epochs"] = refit["epochs"]
        metrics["test_refit"] = classification_report_dict(y_test, refit["soft_refit"], list(CLASSES), positive="covid")
    if ext_idx:
        ext_p = refit["ext_refit"] if refit else ext_soft.mean(1)
        metrics["external"] = {"n": len(ext_idx), "sources": sorted(set(data.sources[i] for i in ext_idx)),
                               "predicted": {c: int((ext_p.argmax(1) == j).sum()) for j, c in enumerate(CLASSES)}}
    write_json(ldir / "metrics.json", metrics)
    try:
        from .plots import plot_confusion

        cm = (metrics.get("test_refit") or metrics["test_mean_of_fold_models"])["confusion_matrix"]
        plot_confusion(np.array(cm), list(CLASSES), ldir / "confusion_test.png",
                       title=f"{name}: held-out test ({'refit model' if refit else 'mean of fold models'})")
    except Exception as exc:  # noqa: BLE001 — a plot must never lose the numbers above
        log.warning("confusion plot for %s failed: %s", name, exc)
    return metrics


def refit_learner(name: str, data: CxrData, split: dict[str, Any], cfg: PatchTrainConfig, out_dir: Path, dist: Dist,
                  epochs: int, seed: int, precision: str = "fp32", restart: bool = False,
                  track: Track = no_track) -> dict[str, Any]:
    """Train ``name`` on every non-test image (the folds + the train-only sources) for ``epochs`` epochs into
    ``out_dir`` and vote on the test and external images (cached in ``out_dir/votes.npz``). Returns
    ``soft_refit``/``hard_refit`` (test part), ``ext_refit`` and ``epochs``. ``train-patch`` calls it with
    ``seed + 7``; ``scripts/refit_repeat.py`` with other seeds, for the spread of what ships."""
    test_idx: list[int] = split["test_idx"]
    ext_idx: list[int] = split["external_idx"]
    train_all = [i for fi in split["folds_idx"] for i in fi] + split["train_only_idx"]
    refit_args = (name, data, train_all, None, cfg, out_dir, dist, precision)
    try:
        model, info = train_model(*refit_args, epochs=epochs, seed=seed, track=track, restart=restart,
                                  label=f"{name} refit")
    except ConfigChangedError as exc:
        # The folds were trained longer and their median best epoch moved: the refit (derived, never resumed by
        # hand) is redone. Any other change is the user's and is refused as for the folds.
        if not exc.changes or any(not c.startswith("refit_epochs:") for c in exc.changes):
            raise
        log.warning("%s refit: the folds' median best epoch is now %d (%s); retraining the refit model",
                    name, epochs, exc.changes[0])
        model, info = train_model(*refit_args, epochs=epochs, seed=seed, track=track, restart=True,
                                  label=f"{name} refit")
    key = f"{info['hash']}|best={info['weights']}|k={cfg.k}|{split['fingerprint']}"
    cached = _read_votes(out_dir / "votes.npz", key)
    if cached is None:
        rs, rh = votes(model, data, test_idx + ext_idx, cfg.k, cfg.seed, dist, track=track, what=f"{name} refit test votes")
        if dist.is_main:
            write_npz(out_dir / "votes.npz", key=np.array(key), test_soft=rs, test_hard=rh)
    else:
        rs, rh = cached[2], cached[3]
    return {"soft_refit": rs[:len(test_idx)], "hard_refit": rh[:len(test_idx)], "epochs": epochs,
            "ext_refit": rs[len(test_idx):]}


def _read_votes(path: Path, key: str) -> tuple[np.ndarray, ...] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None  # votes of another model, k or split: recompute
            if "oof_soft" in z.files:
                return z["oof_soft"], z["oof_hard"], z["test_soft"], z["test_hard"]
            return None, None, z["test_soft"], z["test_hard"]
    except (OSError, ValueError, KeyError):
        return None


def train_patch_run(cfg: PatchTrainConfig, data: CxrData, run_dir: str | os.PathLike[str], dist: Dist | None = None,
                    precision: str = "fp32", restart: bool = False, rebuild_split: bool = False, parallel: str = "ddp",
                    track: Track = no_track) -> dict[str, Any]:
    """Train every learner of ``cfg`` over the folds of ``data``; see the module docstring for the outputs.

    ``parallel`` (under torchrun): ``ddp`` trains each model with all ranks
    together; ``jobs`` gives each rank whole learners to train alone (each
    rank then runs in a world of one on its own device).
    """
    from ._files import write_text

    dist = dist or Dist()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / "config.yaml"
    if cfg_file.exists() and not restart and dist.is_main:
        import yaml

        old = yaml.safe_load(cfg_file.read_text()) or {}
        now = cfg.model_dump(mode="json")
        from .config import diff_configs
        from .training import RESUMABLE_KEYS, SWITCHABLE_KEYS

        changes = [c for c in diff_configs(old, now)
                   if not c.startswith("learners") and c.split(":")[0] not in RESUMABLE_KEYS | SWITCHABLE_KEYS]
        if (old.get("split") or {}).get("run_folds") is None and cfg.split.run_folds is not None:
            # a screen may be completed to every fold, but a full run must not be cut down to a screen
            changes.append(f"split.run_folds: None → {cfg.split.run_folds}")
        if (old.get("train") or {}).get("refit") and not cfg.train.refit:
            # switching the refit on adds a model; switching it off would leave RUN/<learner>/refit/ behind,
            # no longer kept in step with the folds, for export-ensemble --members refit to ship
            changes.append("train.refit: True → False")
        if changes:
            raise ResumeError(f"{run_dir} holds a run with another config ({'; '.join(changes[:6])}); use another "
                              "--run-dir or pass --restart")
    split = prepare_split(data, cfg, run_dir, dist, rebuild_split)
    if dist.is_main:
        write_text(cfg_file, config_to_yaml(cfg))
    results: dict[str, Any] = {}
    if parallel == "jobs" and dist.enabled:
        mine = cfg.learners[dist.rank::dist.world]
        solo = Dist(device=dist.device)
        for name in mine:
            results[name] = run_learner(name, data, split, cfg, run_dir, solo, precision, restart, track)
        dist.barrier()
        gathered = dist.all_gather_object(results)
        return {k: v for part in gathered for k, v in part.items()}
    for name in cfg.learners:
        results[name] = run_learner(name, data, split, cfg, run_dir, dist, precision, restart, track)
    return results
