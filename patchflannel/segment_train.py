"""Training and evaluating the lung U-Net on two domains and two mask conventions.

* JSRT radiographs with SCR masks supervise the ``scr`` output fully, and the
  ``full`` output where the SCR mask is lung (SCR lungs lie inside the full
  lung field).
* V7 adult COVID-19 radiographs supervise the ``full`` output fully, and the
  ``scr`` output where the V7 mask is *not* lung (no convention puts lung
  outside the lung field).

Each batch mixes both domains (``train.v7_share``). Augmentations that look
like disease and devices — opacity-like blobs painted inside the lungs with
the mask unchanged, tubes and leads, contrast/gamma, blur, noise, small
affine changes — teach the ``scr`` output that opacified lung is still lung.
Loss per output: BCE over its supervised pixels + soft Dice where fully
supervised. Model selection: the mean of the validation Jaccard of JSRT
(``scr``) and V7 (``full``). Everything runs through
:class:`patchflannel.training.Trainer` (checkpoints, resume, early stopping,
torchrun).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from ._files import write_csv, write_json
from .config import Section
from .data import SegCase, discover_jsrt, discover_seg, discover_v7, group_split, load_seg_case, split_ids
from .errors import ConfigError, DataError
from .io import resize
from .runtime import Dist
from .segment import CONVENTIONS, LungSegmenter, Preprocess, build_unet
from .training import LoopSettings, Trainer, Track, item_seed, no_track

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config


class SegDataConfig(Section):
    jsrt: str | None = "../shared/data/jsrt"  # JSRT + SCR masks: the scr convention
    v7: str | None = "../shared/data/v7"  # V7 adult COVID-19 masks: the full convention; null = JSRT only
    limit: int | None = Field(default=None, ge=2)  # use only the first N cases of each dataset (smoke tests)


class SegSplitConfig(Section):
    val_frac: float = Field(default=0.1, gt=0, lt=0.5)
    test_frac: float = Field(default=0.2, gt=0, lt=0.5)


class SegModelConfig(Section):
    encoder: str = "resnet18"
    decoder_channels: list[int] = [128, 64, 32, 16, 16]
    # start from another lung U-Net with the same encoder/decoder (a weights name or folder); its output
    # channels are copied to the conventions it lacks. null = random init (encoder_weights=None).
    init: str | None = None

    @field_validator("decoder_channels")
    @classmethod
    def _five(cls, v: list[int]) -> list[int]:
        if len(v) != 5 or min(v) < 1:
            raise ValueError("decoder_channels needs 5 positive widths")
        return v


class SegPreprocessConfig(Section):
    size: int = Field(default=256, ge=64, le=2048)
    method: Literal["clahe", "equalize", "none"] = "clahe"
    clip_limit: float = Field(default=2.0, gt=0)
    tile_grid: int = Field(default=8, ge=1)
    gamma: float = Field(default=1.0, gt=0)

    @field_validator("size")
    @classmethod
    def _mult32(cls, v: int) -> int:
        if v % 32:
            raise ValueError("size must be a multiple of 32 (the U-Net downsamples 5 times)")
        return v


class SegTrainSection(Section):
    epochs: int = Field(default=80, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_patience: int = Field(default=4, ge=1)
    patience: int = Field(default=15, ge=1)
    augment: float = Field(default=1.0, ge=0, le=2)  # strength of the affine changes
    opacity: float = Field(default=0.5, ge=0, le=1)  # probability of opacity-like blobs inside the lungs
    devices: float = Field(default=0.3, ge=0, le=1)  # probability of tube/lead-like lines
    v7_share: float = Field(default=0.5, ge=0, le=1)  # share of each batch from V7 (when V7 is used)
    dice_weight: float = Field(default=1.0, ge=0)


class SegTrainConfig(Section):
    """``configs/seg_cpu.yaml`` and friends; see the comments there."""

    seed: int = Field(default=0, ge=0, lt=2**31)
    data: SegDataConfig = SegDataConfig()
    split: SegSplitConfig = SegSplitConfig()
    model: SegModelConfig = SegModelConfig()
    preprocess: SegPreprocessConfig = SegPreprocessConfig()
    train: SegTrainSection = SegTrainSection()
    threshold: float = Field(default=0.5, gt=0, lt=1)


# --------------------------------------------------------------------------- augmentation


def _affine(strength: float) -> Any:
    import albumentations as A

    s = strength
    return A.Compose([
        A.Affine(scale=(1 - 0.1 * s, 1 + 0.1 * s), translate_percent=(-0.06 * s, 0.06 * s), rotate=(-10 * s, 10 * s),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.8 if s > 0 else 0.0),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        A.RandomGamma(gamma_limit=(75, 133), p=0.5),
        A.GaussianBlur(sigma_limit=(0.3, 1.2), p=0.15),
        A.GaussNoise(std_range=(0.0, 0.03), p=0.2),
    ])


def paint_opacities(img: np.ndarray, lung: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Opacity-like blobs inside the lungs: ``img`` uint8 (S,S), ``lung`` (S,S) float/bool → uint8.

    Each blob is a smooth random shape of 8–30 % of the image width centred
    on a lung pixel, textured by low-frequency noise and limited to the lung
    field; inside it the radiograph is blended towards the soft-tissue
    brightness of this image (the 80th–95th intensity percentile outside the
    lungs) with 40–95 % opacity: what consolidation and ground glass do.
    """
    s = img.shape[0]
    inside = lung > 0.5
    if inside.sum() < 50:
        return img
    outside = img[~inside]
    tissue = float(np.percentile(outside, rng.uniform(80, 95))) if outside.size else 200.0
    out = img.astype(np.float32)
    ys, xs = np.nonzero(inside)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    soft_lung = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), s / 80)
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(len(ys)))
        cy, cx = float(ys[i]), float(xs[i])
        ry, rx = (rng.uniform(0.08, 0.3) * s for _ in range(2))
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        noise = cv2.resize(rng.standard_normal((6, 6)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
        blob = np.clip(1.2 - d + 0.35 * noise, 0, 1)
        blob = cv2.GaussianBlur(blob, (0, 0), s / 100) * soft_lung
        alpha = rng.uniform(0.4, 0.95) * blob
        out = out * (1 - alpha) + tissue * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def paint_devices(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tube-, line- and lead-like bright curves and electrode dots on ``img`` uint8 (S,S)."""
    s = img.shape[0]
    out = img.copy()
    for _ in range(int(rng.integers(1, 4))):
        pts = np.cumsum(rng.normal(0, s * 0.12, (5, 2)), axis=0) + rng.uniform(0.1 * s, 0.9 * s, (1, 2))
        val = int(rng.uniform(200, 255))
        cv2.polylines(out, [pts.astype(np.int32).reshape(-1, 1, 2)], False, val, thickness=int(rng.integers(1, 4)),
                      lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 4))):
        c = tuple(int(v) for v in rng.uniform(0.05 * s, 0.95 * s, 2))
        cv2.circle(out, c, int(rng.integers(2, max(3, s // 40))), int(rng.uniform(200, 255)), -1, lineType=cv2.LINE_AA)
    return out


# --------------------------------------------------------------------------- data in memory


@dataclass
class _TrainItem:
    case_id: str
    domain: str  # jsrt | v7
    image: np.ndarray  # (S,S) uint8, before contrast enhancement
    ref: np.ndarray  # (S,S) float32 reference mask (soft edges at the net's resolution)


@dataclass
class _EvalSet:
    ids: list[str]
    domain: str
    images: list[np.ndarray]  # (1024,1024) float32
    refs: list[np.ndarray]  # (1024,1024) bool


def _cases(cfg: SegTrainConfig) -> dict[str, list[SegCase]]:
    out: dict[str, list[SegCase]] = {}
    if cfg.data.jsrt:
        out["jsrt"] = discover_jsrt(cfg.data.jsrt)
    if cfg.data.v7:
        out["v7"] = discover_v7(cfg.data.v7)
    if not out:
        raise ConfigError("no training data: set data.jsrt and/or data.v7")
    if cfg.data.limit:
        out = {k: v[: cfg.data.limit] for k, v in out.items()}
    return out


def make_seg_split(cases: dict[str, list[SegCase]], cfg: SegTrainConfig) -> dict[str, dict[str, list[str]]]:
    """JSRT by image (one per patient), V7 grouped by patient; both seeded by ``cfg.seed``."""
    out = {}
    for domain, cs in cases.items():
        if domain == "jsrt":
            out[domain] = split_ids([c.case_id for c in cs], cfg.seed, cfg.split.val_frac, cfg.split.test_frac)
        else:
            out[domain] = group_split(cs, cfg.seed, cfg.split.val_frac, cfg.split.test_frac)
        if not out[domain]["train"] or not out[domain]["val"]:
            raise DataError(f"{domain}: too few cases ({len(cs)}) for a train/validation/test split")
    return out


def _load_eval(cases: Sequence[SegCase], ids: Sequence[str], domain: str, track: Track) -> _EvalSet:
    by_id = {c.case_id: c for c in cases}
    imgs, refs = [], []
    for cid in track(list(ids), f"loading {domain}", len(ids)):
        im, ref, _ = load_seg_case(by_id[cid])
        imgs.append(im)
        refs.append(ref)
    return _EvalSet(list(ids), domain, imgs, refs)


# --------------------------------------------------------------------------- evaluation


def mask_scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Jaccard, Dice, ``missed`` (share of the reference lung not in ``pred``) and
    ``added`` (share of ``pred`` outside the reference). Needs a non-empty ``ref``."""
    inter = np.count_nonzero(pred & ref)
    a, b = np.count_nonzero(pred), np.count_nonzero(ref)
    union = a + b - inter
    return {"jaccard": inter / union if union else 1.0, "dice": 2 * inter / (a + b) if a + b else 1.0,
            "missed": 1 - inter / b if b else 0.0, "added": (a - inter) / a if a else 0.0}


def evaluate_masks(seg: LungSegmenter, images: Sequence[np.ndarray], refs: Sequence[np.ndarray], ids: Sequence[str],
                   conventions: Sequence[str], batch_size: int = 8, track: Track = no_track,
                   what: str = "evaluating") -> tuple[list[dict[str, Any]], list[str]]:
    """Per-image scores of each convention's mask against the reference (1024²).

    Returns ``(rows, skipped)``: one row per image × convention; images whose
    reference mask is empty are skipped (listed), never scored as zero.
    """
    rows: list[dict[str, Any]] = []
    skipped = [i for i, r in zip(ids, refs) if not r.any()]
    keep = [k for k, r in enumerate(refs) if r.any()]
    starts = range(0, len(keep), batch_size)
    for s in track(starts, what, len(starts)):
        chunk = keep[s:s + batch_size]
        for conv in conventions:
            results = seg.segment([images[k] for k in chunk], conv, batch_size)
            for k, res in zip(chunk, results):
                rows.append({"image": ids[k], "convention": conv, **mask_scores(res.mask_work, refs[k]),
                             "suspicious": res.quality.suspicious})
    return rows, skipped


def summarise_masks(rows: Sequence[dict[str, Any]], skipped: Sequence[str] = ()) -> dict[str, Any]:
    """Mean ± std, median, worst image, missed/added, share below 0.75, for one domain × convention."""
    if not rows:
        return {"n": 0, "n_skipped_empty_reference": len(skipped)}
    j = np.array([r["jaccard"] for r in rows])
    d = np.array([r["dice"] for r in rows])
    worst = min(rows, key=lambda r: r["jaccard"])
    sd = (lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0)
    return {"n": len(rows), "n_skipped_empty_reference": len(skipped), "skipped": list(skipped),
            "jaccard_mean": float(j.mean()), "jaccard_std": sd(j), "jaccard_median": float(np.median(j)),
            "jaccard_min": float(j.min()), "worst_image": worst["image"], "below_0.75": int((j < 0.75).sum()),
            "dice_mean": float(d.mean()), "dice_std": sd(d),
            "missed_mean": float(np.mean([r["missed"] for r in rows])),
            "added_mean": float(np.mean([r["added"] for r in rows])),
            "coverage_mean": 1 - float(np.mean([r["missed"] for r in rows]))}


def plot_worst(images: Sequence[np.ndarray], refs: Sequence[np.ndarray], preds: Sequence[np.ndarray],
               titles: Sequence[str], path: str | os.PathLike[str], suptitle: str) -> None:
    """Grid of radiographs with the reference (green) and predicted (red) outlines."""
    from .plots import new_figure, save_figure

    n = len(images)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = new_figure(4 * cols, 4 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, im, t, p, title in zip(axes.ravel(), images, refs, preds, titles):
        ax.imshow(im, cmap="gray", vmin=0, vmax=1)
        ax.contour(t, levels=[0.5], colors=["lime"], linewidths=1.0)
        ax.contour(p, levels=[0.5], colors=["red"], linewidths=1.0)
        ax.set_title(title, fontsize=9)
    fig.suptitle(suptitle, fontsize=10)
    save_figure(fig, path, dpi=80)


def evaluate_domain(seg: LungSegmenter, ev: _EvalSet, out_dir: Path, prefix: str, track: Track = no_track) -> dict[str, Any]:
    """Write ``PREFIX_metrics.csv``, ``PREFIX_summary.json``, ``PREFIX_worst_cases.png``; return the summary.

    JSRT is judged in the ``scr`` convention; V7 in ``full`` (its own) and
    also in ``scr`` (what the sampler uses: how much of the annotated lung the
    default mask covers, and how much of it lies outside).
    """
    own = "scr" if ev.domain == "jsrt" else "full"
    convs = [c for c in ([own] + [c for c in CONVENTIONS if c != own]) if c in seg.conventions]
    if ev.domain == "jsrt":
        convs = [own]
    t0 = time.perf_counter()
    rows, skipped = evaluate_masks(seg, ev.images, ev.refs, ev.ids, convs, track=track, what=f"evaluating {prefix}")
    seconds = time.perf_counter() - t0
    write_csv(out_dir / f"{prefix}_metrics.csv", rows)
    summary: dict[str, Any] = {"domain": ev.domain, "own_convention": own, "seconds": seconds,
                               "by_convention": {c: summarise_masks([r for r in rows if r["convention"] == c], skipped)
                                                 for c in convs}}
    write_json(out_dir / f"{prefix}_summary.json", summary)
    own_rows = sorted((r for r in rows if r["convention"] == own), key=lambda r: r["jaccard"])[:6]
    if own_rows:
        idx = {i: k for k, i in enumerate(ev.ids)}
        ims = [ev.images[idx[r["image"]]] for r in own_rows]
        preds = [s.mask_work for s in seg.segment(ims, own)]
        try:
            plot_worst(ims, [ev.refs[idx[r["image"]]] for r in own_rows], preds,
                       [f"{r['image'][:24]}  J={r['jaccard']:.3f}" for r in own_rows], out_dir / f"{prefix}_worst_cases.png",
                       f"Worst {ev.domain} cases ({own} convention) — green: reference, red: prediction")
        except Exception as exc:  # noqa: BLE001 — a figure must never lose the numbers above
            log.warning("worst-case figure failed: %s", exc)
    return summary


# --------------------------------------------------------------------------- training


def _targets(item: _TrainItem, ref_aug: np.ndarray, conventions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-output target, validity map and full-supervision flag for one augmented item."""
    c = len(conventions)
    s = ref_aug.shape[0]
    target = np.zeros((c, s, s), np.float32)
    valid = np.zeros((c, s, s), np.float32)
    full = np.zeros(c, np.float32)
    for k, conv in enumerate(conventions):
        own = (conv == "scr") == (item.domain == "jsrt")
        if own:
            target[k], valid[k], full[k] = ref_aug, 1.0, 1.0
        elif conv == "full":  # JSRT item, full output: SCR lung is full-lung too
            target[k], valid[k] = 1.0, (ref_aug >= 0.5)
        else:  # V7 item, scr output: outside the whole lung field is not lung in any convention
            target[k], valid[k] = 0.0, (ref_aug < 0.5)
    return target, valid, full


def seg_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, full: torch.Tensor,
             dice_weight: float = 1.0) -> torch.Tensor:
    """Summed over items: per output, BCE over valid pixels + ``dice_weight`` × soft Dice where fully supervised.

    logits, target, valid: (B,C,S,S); full: (B,C) 0/1.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    per = (bce * valid).sum(dim=(2, 3)) / valid.sum(dim=(2, 3)).clamp_min(1.0)  # (B,C)
    p = torch.sigmoid(logits.float())
    inter = (p * target).sum(dim=(2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + 1)
    return (per + dice_weight * dice * full).sum()


class _SegTask:
    """Batches, steps and validation of one segmentation run."""

    def __init__(self, cfg: SegTrainConfig, items: list[_TrainItem], val: list[_EvalSet], dist: Dist,
                 conventions: tuple[str, ...]) -> None:
        self.cfg, self.items, self.val, self.dist, self.conventions = cfg, items, val, dist, conventions
        self.pre = Preprocess(**cfg.preprocess.model_dump())
        self.aug = _affine(cfg.train.augment)
        self.by_domain = {d: [i for i, it in enumerate(items) if it.domain == d] for d in ("jsrt", "v7")}

    def batches(self, epoch: int) -> list[dict[str, Any]]:
        """Global batches: ``v7_share`` of each from V7 (cycling through a seeded permutation of each domain)."""
        bs, n = self.cfg.train.batch_size, len(self.items)
        gen = torch.Generator().manual_seed(item_seed(self.cfg.seed, epoch, 3))
        pools = {d: [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()] for d, idx in self.by_domain.items() if idx}
        share = self.cfg.train.v7_share if len(pools) == 2 else (1.0 if "v7" in pools else 0.0)
        pos = {d: 0 for d in pools}
        out = []
        for step in range(math.ceil(n / bs)):
            n_v7 = int(round(bs * share))
            chosen = []
            for d, k in (("v7", n_v7), ("jsrt", bs - n_v7)):
                for _ in range(k):
                    pool = pools[d]
                    chosen.append(pool[pos[d] % len(pool)])
                    pos[d] += 1
            out.append({"epoch": epoch, "step": step, "items": np.array(chosen)})
        return out

    def make(self, item_idx: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        it = self.items[item_idx]
        rng = np.random.default_rng(seed)
        img = it.image
        if rng.random() < self.cfg.train.opacity:
            img = paint_opacities(img, it.ref, rng)
        if rng.random() < self.cfg.train.devices:
            img = paint_devices(img, rng)
        self.aug.set_random_seed(int(seed % (2**32)))
        a = self.aug(image=img, mask=it.ref)
        target, valid, full = _targets(it, a["mask"].astype(np.float32), self.conventions)
        return self.pre.enhance(a["image"]), target, valid, full

    def step(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        positions = list(range(len(batch["items"])))[self.dist.rank::self.dist.world]
        made = [self.make(int(batch["items"][p]), item_seed(self.cfg.seed, batch["epoch"], batch["step"], p)) for p in positions]
        dev = self.dist.device
        x = torch.from_numpy(np.stack([m[0] for m in made])).unsqueeze(1).to(dev) - 0.5
        target, valid, full = (torch.from_numpy(np.stack([m[i] for m in made])).to(dev) for i in (1, 2, 3))
        return seg_loss(model(x), target, valid, full, self.cfg.train.dice_weight), len(made)

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        seg = LungSegmenter(model, self.pre, self.conventions, self.cfg.threshold, device=self.dist.device)
        metrics: dict[str, float] = {}
        for ev in self.val:
            own = "scr" if ev.domain == "jsrt" else "full"
            convs = [own] if ev.domain == "jsrt" else [own, "scr"]
            rows, _ = evaluate_masks(seg, ev.images, ev.refs, ev.ids, [c for c in convs if c in self.conventions])
            for c in convs:
                rs = [r for r in rows if r["convention"] == c]
                if rs:
                    metrics[f"{ev.domain}_{c}_jaccard"] = float(np.mean([r["jaccard"] for r in rs]))
                    if ev.domain == "v7":
                        metrics[f"{ev.domain}_{c}_coverage"] = 1 - float(np.mean([r["missed"] for r in rs]))
                        metrics[f"{ev.domain}_{c}_added"] = float(np.mean([r["added"] for r in rs]))
        own_scores = [v for k, v in metrics.items() if k in ("jsrt_scr_jaccard", "v7_full_jaccard")]
        metrics["score"] = float(np.mean(own_scores))
        model.train()
        return metrics


def train_segmenter(cfg: SegTrainConfig, run_dir: str | os.PathLike[str], dist: Dist | None = None,
                    precision: str = "fp32", restart: bool = False, track: Track = no_track) -> dict[str, Any]:
    """Train a lung U-Net as ``cfg`` says; everything goes to ``run_dir``.

    ``run_dir`` gets ``config.yaml``, ``split.json``, ``checkpoint.pt`` (every
    epoch), ``history.csv``, ``best/`` (best validation score, a
    :meth:`LungSegmenter.save_pretrained` folder) and, at the end,
    ``test_<domain>_metrics.csv`` / ``_summary.json`` / ``_worst_cases.png`` and
    ``test_summary.json`` for the held-out test parts. A run folder with a
    checkpoint resumes (same config only).
    """
    dist = dist or Dist()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    cases = _cases(cfg)
    split = make_seg_split(cases, cfg)
    split_path = run_dir / "split.json"
    if dist.is_main:
        write_json(split_path, {"seed": cfg.seed, "data": {d: getattr(cfg.data, d) for d in cases}, **split})
    conventions = tuple(c for c in CONVENTIONS if c == "scr" and "jsrt" in cases or c == "full" and "v7" in cases)
    size = cfg.preprocess.size

    items: list[_TrainItem] = []
    for domain, cs in cases.items():
        by_id = {c.case_id: c for c in cs}
        for cid in track(split[domain]["train"], f"loading {domain} train", len(split[domain]["train"])):
            im, ref, _ = load_seg_case(by_id[cid])
            u8 = np.clip(np.rint(resize(im, size, "area") * 255), 0, 255).astype(np.uint8)
            items.append(_TrainItem(cid, domain, u8, resize(ref.astype(np.float32), size, "area")))
    val = [_load_eval(cs, split[d]["val"], d, track) for d, cs in cases.items()]

    model = build_unet(cfg.model.encoder, cfg.model.decoder_channels, len(conventions))
    if cfg.model.init:
        init_from(model, cfg.model.init, conventions)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    settings = LoopSettings(epochs=cfg.train.epochs, patience=cfg.train.patience, monitor="score", mode="max",
                            lr_patience=cfg.train.lr_patience)
    trainer = Trainer(model, opt, settings, run_dir=run_dir, config=cfg, dist=dist, precision=precision,
                      name="train-seg", restart=restart)
    task = _SegTask(cfg, items, val, dist, conventions)
    pre = task.pre
    base_cfg = {"encoder": cfg.model.encoder, "decoder_channels": cfg.model.decoder_channels}

    def on_best(module: torch.nn.Module, metrics: dict[str, float]) -> None:
        seg = LungSegmenter(module, pre, conventions, cfg.threshold, base_cfg, dist.device)
        seg.save_pretrained(run_dir / "best", {"best_epoch": trainer.epoch + 1, "val_metrics": metrics})

    result = trainer.fit(task.batches, task.step, task.validate, on_best, lambda b: len(b["items"]), track)
    del items
    summary: dict[str, Any] = {"train_seconds": result.seconds, "epochs_run": result.epochs_run,
                               "best_epoch": result.best_epoch, "best_val_score": result.best_score}
    if dist.is_main:
        best = LungSegmenter.from_pretrained(run_dir / "best", device=dist.device)
        for d, cs in cases.items():
            if split[d]["test"]:
                ev = _load_eval(cs, split[d]["test"], d, track)
                summary[f"test_{d}"] = evaluate_domain(best, ev, run_dir, f"test_{d}", track)
        write_json(run_dir / "test_summary.json", summary)
    dist.barrier()
    return summary


def init_from(model: torch.nn.Module, ref: str, conventions: Sequence[str]) -> None:
    """Copy a saved lung U-Net's weights into ``model``; output channels are matched by convention name
    (a convention the source lacks starts from the source's first channel)."""
    src = LungSegmenter.from_pretrained(ref)
    state = src.model.state_dict()
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise ConfigError(f"model.init={ref}: tensor {key} does not exist in a {conventions} U-Net with this encoder")
        if key.startswith("segmentation_head") and value.shape[0] == len(src.conventions) != own[key].shape[0]:
            value = torch.stack([value[src.conventions.index(c) if c in src.conventions else 0] for c in conventions])
        if value.shape != own[key].shape:
            raise ConfigError(f"model.init={ref}: {key} has shape {tuple(value.shape)}, this model {tuple(own[key].shape)} "
                              "(use the same model.encoder and model.decoder_channels)")
        own[key] = value.to(own[key].dtype)
    model.load_state_dict(own)
    log.info("initialised from %s (conventions %s)", ref, ", ".join(src.conventions))


def export_segmenter(run_dir: str | os.PathLike[str], dest: str | os.PathLike[str], half: bool = False) -> Path:
    """Copy a run's best U-Net to ``dest`` with its split, test results and training data in the config,
    so the weights document themselves and ``eval-seg`` re-checks them on the same held-out images.

    ``half`` stores the tensors as float16 (predictions are made in float32).
    """
    import json

    run_dir = Path(run_dir)
    for need in ("best/config.json", "best/model.safetensors", "split.json"):
        if not (run_dir / need).is_file():
            raise DataError(f"{run_dir}: not a finished train-seg run folder ({need} is missing)")
    seg = LungSegmenter.from_pretrained(run_dir / "best")
    try:
        split = json.loads((run_dir / "split.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{run_dir / 'split.json'}: not readable ({exc})") from None
    extra: dict[str, Any] = {"split": {d: split[d] for d in ("jsrt", "v7") if d in split}, "split_seed": split.get("seed"),
                             "training_data": {d: f"{split['data'][d]}: {len(split[d]['train'])} train / {len(split[d]['val'])} "
                                                  f"val / {len(split[d]['test'])} held-out test images"
                                               for d in ("jsrt", "v7") if d in split}}
    if (run_dir / "test_summary.json").exists():
        extra["test_metrics"] = json.loads((run_dir / "test_summary.json").read_text())
    if half:
        seg.model.half()
        extra["stored_dtype"] = "float16"
    return seg.save_pretrained(dest, extra)


def eval_seg_data(seg: LungSegmenter, data: str | os.PathLike[str], ids: Sequence[str] | None, out_dir: str | os.PathLike[str],
                  track: Track = no_track) -> dict[str, Any]:
    """``eval-seg``: evaluate ``seg`` on a JSRT or V7 folder (all images, or ``ids``)."""
    cases = discover_seg(data)
    domain = cases[0].domain
    if ids is not None:
        known = {c.case_id for c in cases}
        missing = [i for i in ids if i not in known]
        if missing:
            log.warning("%d of the requested images are not in %s (e.g. %s)", len(missing), data, missing[0])
        ids = [i for i in ids if i in known]
        if not ids:
            raise DataError(f"none of the requested images are in {data}")
    else:
        ids = [c.case_id for c in cases]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return evaluate_domain(seg, _load_eval(cases, ids, domain, track), out, f"eval_{domain}", track)
