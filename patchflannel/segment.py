"""Lung segmentation: an smp U-Net trained on JSRT radiographs with SCR masks.

Data flow at inference (:class:`LungSegmenter`)::

    (H,W) float32 [0,1] ──preprocess──▶ (S,S) net input ──U-Net──▶ (S,S) logits
        ──upsample──▶ (1024,1024) prob ──threshold, 2 largest components,
        fill holes──▶ (1024,1024) bool ──nearest──▶ (H,W) bool

The preprocessing (resize to the net's size S, CLAHE or histogram
equalisation + gamma) is stored in the weights' JSON sidecar and re-applied
exactly at inference.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .io import read_image, read_mask, resize
from .weights import load_weights, save_weights, write_json

log = logging.getLogger(__name__)

WORK_SIZE = 1024  # masks are produced and judged at 1024×1024
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "lung_unet"

Track = Callable[[Iterable[Any], str, int | None], Iterable[Any]]


def _no_track(it: Iterable[Any], description: str = "", total: int | None = None) -> Iterable[Any]:
    return it


# --------------------------------------------------------------------------- preprocessing


@dataclass
class Preprocess:
    """How a radiograph becomes the net's input; saved with the weights."""

    size: int = 256
    method: str = "clahe"  # clahe | equalize | none
    clip_limit: float = 2.0
    tile_grid: int = 8
    gamma: float = 1.0

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """``(H,W) float32 [0,1]`` → ``(size,size) float32 [0,1]``."""
        small = resize(img, self.size, "area")
        return self.enhance(small)

    def enhance(self, small: np.ndarray) -> np.ndarray:
        """Contrast step only, on an image already at the net's size."""
        u8 = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8) if small.dtype != np.uint8 else small
        if self.method == "clahe":
            clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tile_grid, self.tile_grid))
            u8 = clahe.apply(u8)
        elif self.method == "equalize":
            u8 = cv2.equalizeHist(u8)
        elif self.method != "none":
            raise ValueError(f"unknown preprocessing method {self.method!r}; choose clahe, equalize or none")
        out = u8.astype(np.float32) / 255.0
        if self.gamma != 1.0:
            out = np.power(out, self.gamma, dtype=np.float32)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(size=self.size, method=self.method, clip_limit=self.clip_limit, tile_grid=self.tile_grid, gamma=self.gamma)


# --------------------------------------------------------------------------- model


def build_unet(encoder: str = "resnet18", decoder_channels: Sequence[int] = (128, 64, 32, 16, 16), classes: int = 1) -> torch.nn.Module:
    """smp U-Net with one gray input channel and no downloaded encoder weights."""
    import segmentation_models_pytorch as smp

    return smp.Unet(
        encoder_name=encoder,
        encoder_weights=None,  # nothing downloads; trained from scratch here
        in_channels=1,
        classes=classes,
        decoder_channels=list(decoder_channels),
    )


def postprocess(prob: np.ndarray, threshold: float = 0.5, keep: int = 2) -> np.ndarray:
    """``(H,W)`` probabilities → ``(H,W) bool`` mask: threshold, keep the
    ``keep`` largest connected components, fill holes."""
    binary = (prob >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n > keep + 1:
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep_ids = 1 + np.argsort(areas)[::-1][:keep]
        lut = np.zeros(n, dtype=np.uint8)
        lut[keep_ids] = 1
        binary = lut[labels]
    # Holes = background not reachable from the border; flood-fill from a padded corner.
    h, w = binary.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = binary
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return (binary > 0) | holes


class LungSegmenter:
    """A trained lung U-Net with its preprocessing; produces lung masks."""

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, threshold: float = 0.5, config: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.threshold = threshold
        self.config = config or {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = DEFAULT_WEIGHTS, device: str | torch.device = "cpu") -> "LungSegmenter":
        """Load weights saved by :func:`save_segmenter` (``.safetensors`` + ``.json``)."""
        state, cfg = load_weights(path)
        if cfg.get("task") != "lung_segmentation":
            raise ValueError(f"{path}: not lung-segmentation weights (task={cfg.get('task')!r})")
        model = build_unet(cfg["encoder"], cfg["decoder_channels"], cfg.get("classes", 1))
        model.load_state_dict(state)
        return cls(model, Preprocess(**cfg["preprocess"]), cfg.get("threshold", 0.5), cfg, device)

    @torch.inference_mode()
    def predict_logits(self, net_inputs: np.ndarray) -> torch.Tensor:
        """``(B,S,S) float32`` preprocessed → ``(B,1,S,S)`` logits on the device."""
        x = torch.from_numpy(np.ascontiguousarray(net_inputs, dtype=np.float32)).unsqueeze(1).to(self.device)
        return self.model(x - 0.5)

    @torch.inference_mode()
    def predict_prob(self, images: Sequence[np.ndarray], work_size: int = WORK_SIZE) -> np.ndarray:
        """Images ``(H,W)`` float [0,1] → probabilities ``(B, work_size, work_size) float32``."""
        batch = np.stack([self.preprocess(im) for im in images])
        logits = self.predict_logits(batch)
        prob = torch.sigmoid(F.interpolate(logits, size=(work_size, work_size), mode="bilinear", align_corners=False))
        return prob[:, 0].float().cpu().numpy()

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Images ``(H,W)`` float [0,1] → masks ``(H,W) bool`` at each image's own size."""
        out: list[np.ndarray] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            for im, p in zip(chunk, self.predict_prob(chunk)):
                mask = postprocess(p, self.threshold)
                out.append(resize(mask, im.shape, "nearest") if mask.shape != im.shape else mask)
        return out


def save_segmenter(model: torch.nn.Module, path: str | os.PathLike, cfg: dict[str, Any], preprocess: Preprocess,
                   extra: dict[str, Any] | None = None) -> Path:
    """Save a U-Net with everything :meth:`LungSegmenter.from_pretrained` needs."""
    sidecar = {
        "task": "lung_segmentation",
        "architecture": "segmentation_models_pytorch.Unet",
        "encoder": cfg["encoder"],
        "decoder_channels": list(cfg["decoder_channels"]),
        "classes": 1,
        "class_names": ["lung"],
        "in_channels": 1,
        "input_normalisation": "x - 0.5 after preprocessing to [0,1]",
        "preprocess": preprocess.to_dict(),
        "threshold": cfg.get("threshold", 0.5),
        "output_size": WORK_SIZE,
        "postprocess": "upsample bilinear to 1024², threshold, keep 2 largest components, fill holes, nearest to input size",
        **(extra or {}),
    }
    return save_weights(model, path, sidecar)


# --------------------------------------------------------------------------- data


@dataclass
class JsrtCase:
    case_id: str
    image: Path
    masks: list[Path] = field(default_factory=list)


_MASK_DIR = re.compile(r"(left|right).?lung", re.IGNORECASE)


def discover_jsrt(root: str | os.PathLike) -> list[JsrtCase]:
    """Find JSRT images and SCR lung masks under ``root``.

    Works for the repository's layout (``images/*.png``,
    ``masks/{left,right}_lung/*.png``) and the original distributions (raw
    ``*.IMG`` files anywhere, SCR ``.../left lung/*.gif`` and ``right lung``
    folders, e.g. ``fold1/masks/left lung/JPCLN001.gif``). A case is kept
    only when both lung masks are found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"JSRT folder {root} not found")
    images: dict[str, Path] = {}
    masks: dict[str, dict[str, Path]] = {}
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.name.startswith("."):
            continue
        stem, suffix = f.stem.upper(), f.suffix.lower()
        rel = f.relative_to(root).as_posix()
        side = _MASK_DIR.search(rel)
        if side and suffix in (".png", ".gif", ".bmp", ".tif", ".tiff"):
            masks.setdefault(stem, {})[side.group(1).lower()] = f
        elif suffix in (".png", ".img", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff") and stem.startswith("JPC"):
            images[stem] = f
    cases = []
    for stem, img in sorted(images.items()):
        m = masks.get(stem, {})
        if "left" in m and "right" in m:
            cases.append(JsrtCase(stem, img, [m["left"], m["right"]]))
    if not cases:
        raise FileNotFoundError(f"no JSRT images with left and right SCR lung masks found under {root}")
    return cases


def load_case(case: JsrtCase, work_size: int = WORK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """→ image ``(1024,1024) float32`` and mask ``(1024,1024) bool`` (left ∪ right)."""
    img = resize(read_image(case.image), work_size, "area")
    mask = np.zeros((work_size, work_size), dtype=bool)
    for m in case.masks:
        mask |= resize(read_mask(m), work_size, "nearest")
    return img, mask


def split_ids(ids: Sequence[str], seed: int, val_frac: float, test_frac: float) -> dict[str, list[str]]:
    """Seeded split by image (JSRT has one image per patient)."""
    ids = sorted(ids)
    rng = random.Random(seed)
    rng.shuffle(ids)
    n_test = int(round(test_frac * len(ids)))
    n_val = int(round(val_frac * len(ids)))
    return {"test": sorted(ids[:n_test]), "val": sorted(ids[n_test:n_test + n_val]), "train": sorted(ids[n_test + n_val:])}


# --------------------------------------------------------------------------- metrics


def jaccard_dice(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Jaccard index and Dice of two boolean masks (1.0 when both are empty)."""
    inter = np.count_nonzero(pred & truth)
    a, b = np.count_nonzero(pred), np.count_nonzero(truth)
    union = a + b - inter
    if union == 0:
        return 1.0, 1.0
    return inter / union, 2 * inter / (a + b)


def evaluate_segmenter(seg: LungSegmenter, images: Sequence[np.ndarray], truths: Sequence[np.ndarray], ids: Sequence[str],
                       batch_size: int = 8, track: Track = _no_track) -> list[dict[str, Any]]:
    """Per-image Jaccard/Dice at 1024² for the given cases."""
    rows: list[dict[str, Any]] = []
    starts = range(0, len(images), batch_size)
    for i in track(starts, "evaluating", len(starts)):
        preds = seg.predict(images[i:i + batch_size], batch_size=batch_size)
        for cid, p, t in zip(ids[i:i + batch_size], preds, truths[i:i + batch_size]):
            j, d = jaccard_dice(p, t)
            rows.append({"image": cid, "jaccard": j, "dice": d})
    return rows


def summarise_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    j = np.array([r["jaccard"] for r in rows])
    d = np.array([r["dice"] for r in rows])
    worst = min(rows, key=lambda r: r["jaccard"])
    return {"n": len(rows), "jaccard_mean": float(j.mean()), "jaccard_std": float(j.std(ddof=1)) if len(j) > 1 else 0.0,
            "dice_mean": float(d.mean()), "dice_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "jaccard_min": float(j.min()), "worst_image": worst["image"]}


# --------------------------------------------------------------------------- training


def _augmenter(strength: float = 1.0) -> Any:
    import albumentations as A

    return A.Compose([
        A.Affine(scale=(1 - 0.1 * strength, 1 + 0.1 * strength), translate_percent=(-0.06 * strength, 0.06 * strength),
                 rotate=(-10 * strength, 10 * strength), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.8),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        A.RandomGamma(gamma_limit=(75, 133), p=0.5),
        A.GaussNoise(std_range=(0.0, 0.03), p=0.2),
    ])


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    denom = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    return (1 - (2 * inter + 1) / (denom + 1)).mean()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_segmenter(cfg: dict[str, Any], run_dir: str | os.PathLike, resume: bool = False, track: Track = _no_track,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train a lung U-Net as ``cfg`` says; writes everything to ``run_dir``.

    ``run_dir`` gets ``config.yaml``, ``split.json``, ``checkpoint.pt`` (every
    epoch: model, optimiser, scheduler, history, RNG), ``best.safetensors`` +
    ``best.json`` (best validation Jaccard), ``history.csv`` and, at the end,
    ``test_metrics.csv`` / ``test_summary.json`` / ``worst_cases.png`` on the
    held-out test part. ``resume=True`` continues from ``checkpoint.pt``.
    """
    import yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    device = torch.device(device)
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    cases = discover_jsrt(cfg["data"])
    if cfg.get("limit"):
        cases = cases[: int(cfg["limit"])]
    split_path = run_dir / "split.json"
    if resume and split_path.exists():
        import json

        split = json.loads(split_path.read_text())
    else:
        split = split_ids([c.case_id for c in cases], seed, cfg.get("val_frac", 0.1), cfg.get("test_frac", 0.2))
        write_json(split_path, {**split, "seed": seed, "data": str(cfg["data"])})
    from .weights import atomic_write_text

    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    by_id = {c.case_id: c for c in cases}
    pre = Preprocess(**cfg["preprocess"])
    size = pre.size

    def load(ids: list[str], what: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        imgs, masks = [], []
        for cid in track(ids, f"loading {what}", len(ids)):
            im, m = load_case(by_id[cid])
            imgs.append(im)
            masks.append(m)
        return imgs, masks

    train_imgs, train_masks = load(split["train"], "train")
    val_imgs, val_masks = load(split["val"], "val")
    # Train at the net's size; raw (pre-contrast) uint8 so augmentation acts on the radiograph itself.
    tr_x = [np.clip(np.rint(resize(im, size, "area") * 255), 0, 255).astype(np.uint8) for im in train_imgs]
    tr_y = [resize(m.astype(np.float32), size, "area") for m in train_masks]  # soft edges at low res
    del train_imgs, train_masks

    model = build_unet(cfg["encoder"], cfg["decoder_channels"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg.get("lr", 1e-3)), weight_decay=float(cfg.get("weight_decay", 0.0)))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=int(cfg.get("lr_patience", 4)))
    start_epoch, best, bad, history = 0, -1.0, 0, []
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, best, bad, history = ck["epoch"] + 1, ck["best"], ck["bad_epochs"], ck["history"]
        torch.set_rng_state(ck["torch_rng"])
        np.random.set_state(ck["numpy_rng"])
        random.setstate(ck["python_rng"])
        log.info("resumed from %s at epoch %d (best val Jaccard %.4f)", ckpt_path, start_epoch, best)
    elif resume:
        log.warning("--resume given but %s does not exist; starting from scratch", ckpt_path)

    aug = _augmenter(float(cfg.get("augment", 1.0)))
    epochs, bs, patience = int(cfg["epochs"]), int(cfg.get("batch_size", 8)), int(cfg.get("patience", 10))
    seg = LungSegmenter(model, pre, cfg.get("threshold", 0.5), device=device)
    t_start = time.time() - sum(h.get("seconds", 0.0) for h in history)
    for epoch in range(start_epoch, epochs):
        if bad >= patience:
            break
        t0 = time.time()
        model.train()
        order = np.random.permutation(len(tr_x))
        losses = []
        steps = range(0, len(order), bs)
        for s in track(steps, f"epoch {epoch + 1}/{epochs}", len(steps)):
            idx = order[s:s + bs]
            xs, ys = [], []
            for i in idx:
                a = aug(image=tr_x[i], mask=tr_y[i])
                xs.append(pre.enhance(a["image"]))
                ys.append(a["mask"])
            x = torch.from_numpy(np.stack(xs)).unsqueeze(1).to(device) - 0.5
            y = torch.from_numpy(np.stack(ys).astype(np.float32)).unsqueeze(1).to(device)
            logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits, y) + _dice_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        rows = evaluate_segmenter(seg, val_imgs, val_masks, split["val"])
        val_j = float(np.mean([r["jaccard"] for r in rows]))
        sched.step(val_j)
        improved = val_j > best
        if improved:
            best, bad = val_j, 0
            save_segmenter(model, run_dir / "best", cfg, pre, {"best_epoch": epoch + 1, "val_jaccard": val_j})
        else:
            bad += 1
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_jaccard": val_j,
                        "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0})
        log.info("epoch %d: loss %.4f, val Jaccard %.4f%s (lr %.2g, %.0fs)", epoch + 1, history[-1]["train_loss"], val_j,
                 " *" if improved else "", history[-1]["lr"], history[-1]["seconds"])
        _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "epoch": epoch, "best": best, "bad_epochs": bad, "history": history,
                            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                            "python_rng": random.getstate(), "config": cfg}, ckpt_path)
        _write_history(run_dir / "history.csv", history)
    train_seconds = time.time() - t_start
    del tr_x, tr_y, val_imgs, val_masks
    # Evaluate the chosen (best validation) checkpoint on the held-out test part.
    best_seg = LungSegmenter.from_pretrained(run_dir / "best", device=device)
    summary = evaluate_split(best_seg, cases, split["test"], run_dir, track=track)
    summary.update({"train_seconds": train_seconds, "epochs_run": len(history), "best_val_jaccard": best})
    write_json(run_dir / "test_summary.json", summary)
    return summary


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    from .weights import atomic_write_text

    keys = list(history[0].keys())
    lines = [",".join(keys)] + [",".join(f"{h[k]:.6g}" if isinstance(h[k], float) else str(h[k]) for k in keys) for h in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def evaluate_split(seg: LungSegmenter, cases: Sequence[JsrtCase], ids: Sequence[str], out_dir: str | os.PathLike,
                   track: Track = _no_track, prefix: str = "test") -> dict[str, Any]:
    """Evaluate on ``ids``; write per-image CSV, summary JSON and worst-case figure."""
    from .weights import atomic_write_text

    out_dir = Path(out_dir)
    by_id = {c.case_id: c for c in cases}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} split images not found in the data (e.g. {missing[0]})")
    imgs, truths = [], []
    for cid in track(ids, "loading", len(ids)):
        im, m = load_case(by_id[cid])
        imgs.append(im)
        truths.append(m)
    t0 = time.perf_counter()
    rows = evaluate_segmenter(seg, imgs, truths, list(ids), track=track)
    summary = summarise_rows(rows)
    summary["seconds_per_image"] = (time.perf_counter() - t0) / max(len(ids), 1)
    lines = ["image,jaccard,dice"] + [f"{r['image']},{r['jaccard']:.5f},{r['dice']:.5f}" for r in rows]
    atomic_write_text(out_dir / f"{prefix}_metrics.csv", "\n".join(lines) + "\n")
    write_json(out_dir / f"{prefix}_summary.json", summary)
    worst = sorted(range(len(rows)), key=lambda i: rows[i]["jaccard"])[:6]
    preds = seg.predict([imgs[i] for i in worst])
    plot_worst_cases([imgs[i] for i in worst], [truths[i] for i in worst], preds, [rows[i] for i in worst],
                     out_dir / f"{prefix}_worst_cases.png")
    return summary


def plot_worst_cases(images: Sequence[np.ndarray], truths: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                     rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Grid of radiographs with the reference (green) and predicted (red) outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 4 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, im, t, p, r in zip(axes.ravel(), images, truths, preds, rows):
        ax.imshow(im, cmap="gray", vmin=0, vmax=1)
        ax.contour(t, levels=[0.5], colors=["lime"], linewidths=1.0)
        ax.contour(p, levels=[0.5], colors=["red"], linewidths=1.0)
        ax.set_title(f"{r['image']}  J={r['jaccard']:.3f}  D={r['dice']:.3f}", fontsize=9)
    fig.suptitle("Worst held-out cases — green: SCR reference, red: prediction", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Radiograph ``(H,W)`` float + mask ``(H,W)`` bool → BGR uint8 with the lung outline in red."""
    gray = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(mask.shape) / 400))
    cv2.drawContours(bgr, contours, -1, (0, 0, 255), thickness)
    return bgr


def export_segmenter(run_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a run's best weights to ``dest`` (stem), adding the run's split,
    test results and training time to the sidecar so the weights document
    themselves and ``eval-seg`` can re-check them on the same held-out images."""
    import json

    run_dir = Path(run_dir)
    state, cfg = load_weights(run_dir / "best")
    split = json.loads((run_dir / "split.json").read_text())
    summary_path = run_dir / "test_summary.json"
    extra = {k: v for k, v in cfg.items() if k not in ("code_version",)}
    extra["split"] = {k: split[k] for k in ("train", "val", "test")}
    extra["split_seed"] = split.get("seed")
    extra["training_data"] = f"JSRT radiographs + SCR lung masks ({split.get('data')}), " \
                             f"{len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} held-out test images"
    if summary_path.exists():
        extra["test_metrics"] = json.loads(summary_path.read_text())
    return save_weights(state, dest, extra)
