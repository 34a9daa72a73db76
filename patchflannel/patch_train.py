"""Train base learners on in-lung patches (or whole images) over patient-grouped
folds, and produce each image's class distribution from K patch votes.

Run folder written by :func:`train_patch_run`::

    RUN/config.yaml                resolved config
    RUN/split.json                 ids of the held-out test part and of each fold (grouped by patient)
    RUN/<learner>/fold<f>/         checkpoint.pt (every epoch), best.safetensors+json, history.csv, done.json
    RUN/<learner>/oof.npz          out-of-fold distributions of every non-test image  (the ensemble's training data)
    RUN/<learner>/test.npz         test distributions from every fold model
    RUN/<learner>/votes_oof.csv, votes_test.csv   the same, human-readable (test: mean over fold models)
    RUN/<learner>/metrics.json     per fold-model test metrics, mean ± std; confusion_test.png

Vote files (``numpy.savez``; classes in ``classes``):

* ``oof.npz``: ``ids (n,) str, y (n,) int64, fold (n,) int64, soft (n,M), hard (n,M),
  patients (n,) str, sources (n,) str, classes (M,) str, k ()`` —
  each image's distribution from the fold model that never saw its patient.
* ``test.npz``: ``ids (t,), y (t,), soft (t,F,M), hard (t,F,M), patients, sources, classes, k``
  — from each of the F fold models.

``soft`` is the mean patch softmax, ``hard`` the fraction of the K patches voting for
each class. Global learners (``global-<name>``) see the whole image at the learner's
input size once (K = 1).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .cxr import CLASSES, CxrData, inner_validation
from .weights import atomic_write_text, load_state, load_weights, save_weights, write_json

log = logging.getLogger(__name__)
Track = Callable[[Iterable[Any], str, int | None], Iterable[Any]]


def _no_track(it: Iterable[Any], description: str = "", total: int | None = None) -> Iterable[Any]:
    return it


# --------------------------------------------------------------------------- inputs


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Radiograph-safe jitter on ``(N,1,P,P)`` float [0,1]: flips, brightness,
    contrast, gamma — all batched."""
    n = x.shape[0]
    dev = x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=gen)).to(dev)

    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * u(0.85, 1.15) + mean + u(-0.08, 0.08)
    x = x.clamp(0, 1).pow(u(0.8, 1.25))
    return x


def patch_scale(patch_size: int, learner_input: int) -> int:
    """Integer factor between the crop's field of view and the learner's input."""
    if patch_size % learner_input:
        raise ValueError(f"patch_size {patch_size} must be a multiple of learner_input {learner_input}")
    return patch_size // learner_input


def downscale(images: torch.Tensor, masks: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-shrink ``images (B,1,H,W) uint8`` and ``masks (B,1,H,W) bool`` by an
    integer ``factor`` (a mask pixel is lung when at least half its block is)."""
    if factor == 1:
        return images, masks
    img = F.avg_pool2d(images.float(), factor).round_().to(torch.uint8)
    msk = F.avg_pool2d(masks.float(), factor) >= 0.5
    return img, msk


class InputMaker:
    """Makes the learner's inputs for images ``idx``: K in-lung crops
    (``patch``) or the whole image resized (``global``).

    With ``learner_input`` < ``patch_size`` (CPU configs), the images are
    shrunk once by ``patch_size / learner_input`` and crops of
    ``learner_input`` are taken there: the field of view of a ``patch_size``
    crop at 1024², at the learner's resolution."""

    def __init__(self, data: CxrData, mode: str, patch_size: int, global_size: int, mask_outside: bool,
                 device: torch.device, learner_input: int | None = None) -> None:
        self.data, self.mode, self.patch_size, self.mask_outside, self.device = data, mode, patch_size, mask_outside, device
        self.learner_input = learner_input or patch_size
        self.factor = patch_scale(patch_size, self.learner_input)
        if mode == "patch" and self.factor > 1:
            # Shrink every image once, then crop at the learner's size: the same
            # field of view as a patch_size crop, without resizing every crop.
            parts = [downscale(data.images[i:i + 32], data.masks[i:i + 32], self.factor) for i in range(0, len(data.ids), 32)]
            self.images = torch.cat([p[0] for p in parts])
            self.masks = torch.cat([p[1] for p in parts])
        else:
            self.images, self.masks = data.images, data.masks
        if mode == "global":
            # Whole images at the learner's size, computed once (area-averaged from 1024²).
            small = [F.interpolate(data.images[i:i + 32].float() / 255.0, size=(global_size, global_size), mode="area")
                     for i in range(0, len(data.ids), 32)]
            self.global_images = torch.cat(small)

    def make(self, idx: np.ndarray | list[int], k: int, gen: torch.Generator) -> torch.Tensor:
        """→ ``(B,K,1,P,P)`` float [0,1] on the device (K = 1 for global)."""
        from .sampler import sample_patches

        idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        if self.mode == "global":
            return self.global_images[idx_t].unsqueeze(1).to(self.device)
        images = self.images[idx_t].to(self.device)
        masks = self.masks[idx_t].to(self.device)
        crops, _ = sample_patches(images, masks, k, size=self.learner_input, generator=gen, mask_outside=self.mask_outside)
        return crops.float().div_(255.0)


def make_input_maker(data: CxrData, mode: str, cfg: dict[str, Any], device: torch.device) -> InputMaker:
    return InputMaker(data, mode, int(cfg["patch_size"]), int(cfg["global_size"]), bool(cfg["mask_outside"]), device,
                      cfg.get("learner_input"))


# --------------------------------------------------------------------------- votes


@torch.inference_mode()
def distributions(model: torch.nn.Module, maker: InputMaker, idx: list[int], k: int, seed: int, batch_images: int = 4,
                  chunk: int = 128, track: Track = _no_track, what: str = "voting") -> tuple[np.ndarray, np.ndarray]:
    """Each image's ``(soft, hard)`` distributions ``(n,M)`` from K votes."""
    from .vote import predict_distribution, vote

    gen = torch.Generator().manual_seed(seed)
    k_eff = 1 if maker.mode == "global" else k
    model.eval()
    soft, hard = [], []
    starts = range(0, len(idx), batch_images)
    for s in track(starts, what, len(starts)):
        x = maker.make(idx[s:s + batch_images], k_eff, gen)
        logits = predict_distribution(model, x, chunk_size=chunk)
        h, p = vote(logits)
        soft.append(p.cpu().numpy())
        hard.append(h.cpu().numpy())
    return np.concatenate(soft), np.concatenate(hard)


def _macro_f1(y: np.ndarray, pred: np.ndarray, m: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=list(range(m)), average="macro", zero_division=0))


# --------------------------------------------------------------------------- one fold


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def learner_sidecar(name: str, mode: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return {"task": "cxr_classification", "learner": name, "mode": mode, "classes": list(CLASSES), "in_channels": 1,
            "input": "gray float [0,1]; ImageNet normalisation inside the model",
            "patch_size": cfg["patch_size"] if mode == "patch" else None,
            "learner_input": (cfg.get("learner_input") or cfg["patch_size"]) if mode == "patch" else cfg["global_size"],
            "global_size": cfg["global_size"] if mode == "global" else None,
            "mask_outside": cfg["mask_outside"] if mode == "patch" else None,
            "pretrained": cfg.get("pretrained") or "none (random init)"}


def train_fold(name: str, mode: str, data: CxrData, train_idx: list[int], val_idx: list[int], cfg: dict[str, Any],
               out_dir: Path, device: torch.device, track: Track = _no_track, label: str | None = None) -> torch.nn.Module:
    """Train one learner on ``train_idx``; early stopping on ``val_idx`` macro-F1.

    Resumes from ``out_dir/checkpoint.pt``; returns the best model (eval mode).
    """
    from .learners import create_learner

    label = label or name  # what logs call it (e.g. global-NAME)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    model = create_learner(name, num_classes=len(CLASSES), in_chans=1, pretrained=cfg.get("pretrained") or False).to(device)
    if cfg.get("bn_momentum") is not None:
        # torchvision's MobileNetV3 uses BN momentum 0.01, tuned for long ImageNet runs; with a few
        # hundred steps from scratch its running statistics lag and eval-mode predictions collapse.
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.momentum = float(cfg["bn_momentum"])
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg.get("weight_decay", 0.0)))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=int(cfg.get("lr_patience", 3)))
    maker = make_input_maker(data, mode, cfg, device)
    y = data.labels
    counts = np.bincount(y[train_idx], minlength=len(CLASSES)).astype(float)
    class_w = None
    if cfg.get("class_weighted_loss"):
        class_w = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(CLASSES), dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(seed)
    start, best, bad, history = 0, -1.0, 0, []
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists():
        ck = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, best, bad, history = ck["epoch"] + 1, ck["best"], ck["bad"], ck["history"]
        gen.set_state(ck["gen"])
        log.info("%s %s: resumed at epoch %d (best val macro-F1 %.3f)", label, out_dir.name, start, best)
    k_train = 1 if mode == "global" else int(cfg["patches_per_image"])
    per_step = max(1, int(cfg["batch_size"]) // k_train)
    epochs, patience = int(cfg["epochs"]), int(cfg["patience"])
    for epoch in range(start, epochs):
        if bad >= patience:
            break
        t0 = time.time()
        model.train()
        if cfg.get("balanced_sampling"):
            w = 1.0 / counts[y[train_idx]]
            order = np.asarray(train_idx)[torch.multinomial(torch.tensor(w), len(train_idx), replacement=True, generator=gen).numpy()]
        else:
            order = np.asarray(train_idx)[torch.randperm(len(train_idx), generator=gen).numpy()]
        losses = []
        steps = range(0, len(order), per_step)
        for s in track(steps, f"{label} {out_dir.name} epoch {epoch + 1}/{epochs}", len(steps)):
            idx = order[s:s + per_step]
            # Fresh random in-lung centres every step.
            x = maker.make(idx, k_train, gen).flatten(0, 1)
            x = _augment(x, gen)
            target = torch.as_tensor(y[idx], device=device).repeat_interleave(k_train)
            logits = model(x)
            loss = F.cross_entropy(logits, target, weight=class_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        soft, _ = distributions(model, maker, val_idx, int(cfg["k_val"]), seed + 999)
        f1 = _macro_f1(y[val_idx], soft.argmax(1), len(CLASSES))
        sched.step(f1)
        improved = f1 > best
        if improved:
            best, bad = f1, 0
            save_weights(model, out_dir / "best", {**learner_sidecar(name, mode, cfg), "best_epoch": epoch + 1, "val_macro_f1": f1})
        else:
            bad += 1
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_macro_f1": f1,
                        "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0})
        log.info("%s %s epoch %d: loss %.3f, val macro-F1 %.3f%s (%.0fs)", label, out_dir.name, epoch + 1,
                 history[-1]["train_loss"], f1, " *" if improved else "", history[-1]["seconds"])
        _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "epoch": epoch, "best": best, "bad": bad, "history": history, "gen": gen.get_state()}, ckpt)
        keys = list(history[0])
        atomic_write_text(out_dir / "history.csv", "\n".join([",".join(keys)] + [",".join(f"{h[k]:.6g}" for k in keys) for h in history]) + "\n")
    state, _ = load_weights(out_dir / "best", device=device)
    load_state(model, state)
    return model.eval()


# --------------------------------------------------------------------------- a whole learner over the folds


def run_learner(spec: str, data: CxrData, split: dict[str, Any], cfg: dict[str, Any], run_dir: Path, device: torch.device,
                track: Track = _no_track) -> dict[str, Any]:
    """Train ``spec`` (``name`` or ``global-name``) on every fold; write votes and metrics."""
    from .metrics import classification_report_dict, summarise

    import yaml

    mode, name = ("global", spec[len("global-"):]) if spec.startswith("global-") else ("patch", spec)
    ldir = run_dir / spec
    ldir.mkdir(parents=True, exist_ok=True)
    # Per learner too: several train-patch processes may share one run folder.
    atomic_write_text(ldir / "config.yaml", yaml.safe_dump({**cfg, "learner": spec}, sort_keys=False))
    folds: list[list[int]] = split["folds_idx"]
    test_idx: list[int] = split["test_idx"]
    n_classes = len(CLASSES)
    k = int(cfg["k"])
    oof_soft = np.zeros((len(data.ids), n_classes), np.float32)
    oof_hard = np.zeros_like(oof_soft)
    oof_fold = np.full(len(data.ids), -1, np.int64)
    test_soft = np.zeros((len(test_idx), len(folds), n_classes), np.float32)
    test_hard = np.zeros_like(test_soft)
    reports = []
    maker: InputMaker | None = None
    for f, fold_idx in enumerate(folds):
        fdir = ldir / f"fold{f}"
        done = fdir / "done.npz"
        if done.exists():
            z = np.load(done)
            oof_soft[fold_idx], oof_hard[fold_idx] = z["oof_soft"], z["oof_hard"]
            test_soft[:, f], test_hard[:, f] = z["test_soft"], z["test_hard"]
            log.info("%s fold %d already done; reusing its votes", spec, f)
        else:
            train_all = [i for g, fi in enumerate(folds) if g != f for i in fi]
            tr, va = inner_validation(train_all, data.labels, data.patients, float(cfg["val_frac"]), int(cfg["seed"]) + f)
            model = train_fold(name, mode, data, tr, va, {**cfg, "seed": int(cfg["seed"]) + 100 * f}, fdir, device, track,
                               label=spec)
            if maker is None:
                maker = make_input_maker(data, mode, cfg, device)
            vs = int(cfg["seed"]) + 7
            os_, oh = distributions(model, maker, fold_idx, k, vs, track=track, what=f"{spec} fold {f} out-of-fold votes")
            ts, th = distributions(model, maker, test_idx, k, vs + 1, track=track, what=f"{spec} fold {f} test votes")
            oof_soft[fold_idx], oof_hard[fold_idx] = os_, oh
            test_soft[:, f], test_hard[:, f] = ts, th
            np.savez(fdir / ".done.tmp.npz", oof_soft=os_, oof_hard=oh, test_soft=ts, test_hard=th,
                     train_idx=np.array(tr), val_idx=np.array(va))
            os.replace(fdir / ".done.tmp.npz", done)
        oof_fold[fold_idx] = f
        reports.append(classification_report_dict(data.labels[test_idx], test_soft[:, f], list(CLASSES), positive="covid"))
    oof_idx = [i for fi in folds for i in fi]
    ids, patients, sources = np.array(data.ids), np.array(data.patients), np.array(data.sources)
    _savez(ldir / "oof.npz", ids=ids[oof_idx], y=data.labels[oof_idx], fold=oof_fold[oof_idx], soft=oof_soft[oof_idx],
           hard=oof_hard[oof_idx], patients=patients[oof_idx], sources=sources[oof_idx], classes=np.array(CLASSES),
           k=np.array(1 if mode == "global" else k))
    _savez(ldir / "test.npz", ids=ids[test_idx], y=data.labels[test_idx], soft=test_soft, hard=test_hard,
           patients=patients[test_idx], sources=sources[test_idx], classes=np.array(CLASSES),
           k=np.array(1 if mode == "global" else k))
    _votes_csv(ldir / "votes_oof.csv", ids[oof_idx], data.labels[oof_idx], oof_soft[oof_idx], oof_fold[oof_idx])
    _votes_csv(ldir / "votes_test.csv", ids[test_idx], data.labels[test_idx], test_soft.mean(1), None)
    summary = summarise(reports)
    oof_report = classification_report_dict(data.labels[oof_idx], oof_soft[oof_idx], list(CLASSES), positive="covid")
    metrics = {"learner": spec, "mode": mode, "k": k, "test_per_fold_model": reports, "test_summary": summary,
               "test_mean_of_fold_models": classification_report_dict(data.labels[test_idx], test_soft.mean(1), list(CLASSES), positive="covid"),
               "oof": oof_report}
    write_json(ldir / "metrics.json", metrics)
    try:
        from .plots import plot_confusion

        plot_confusion(np.array(metrics["test_mean_of_fold_models"]["confusion_matrix"]), list(CLASSES),
                       ldir / "confusion_test.png", title=f"{spec}: held-out test (mean of fold models)")
    except Exception as exc:  # a plot must never lose the numbers above
        log.warning("confusion plot for %s failed: %s", spec, exc)
    return metrics


def _savez(path: Path, **arrays: Any) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _votes_csv(path: Path, ids: np.ndarray, y: np.ndarray, soft: np.ndarray, fold: np.ndarray | None) -> None:
    head = "id,label," + ("fold," if fold is not None else "") + ",".join(f"p_{c}" for c in CLASSES)
    lines = [head]
    for i in range(len(ids)):
        cells = [str(ids[i]), CLASSES[int(y[i])]] + ([str(int(fold[i]))] if fold is not None else [])
        lines.append(",".join(cells + [f"{v:.5f}" for v in soft[i]]))
    atomic_write_text(path, "\n".join(lines) + "\n")


def prepare_split(data: CxrData, cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Load the run's saved split, or make and save a new one (by image id)."""
    from .cxr import check_grouped, make_splits

    path = run_dir / "split.json"
    index = {k: i for i, k in enumerate(data.ids)}
    if path.exists():
        saved = json.loads(path.read_text())
        missing = [i for part in [saved["test"], *saved["folds"]] for i in part if i not in index]
        if missing:
            raise ValueError(f"{path}: {len(missing)} ids of the saved split are not in the data (e.g. {missing[0]})")
    else:
        s = make_splits(data.labels, data.patients, int(cfg["seed"]), float(cfg["test_frac"]), int(cfg["folds"]))
        saved = {"seed": cfg["seed"], "grouped_by": "patient_id", "test": [data.ids[i] for i in s["test"]],
                 "folds": [[data.ids[i] for i in f] for f in s["folds"]]}
        write_json(path, saved)
    split = {**saved, "test_idx": [index[i] for i in saved["test"]], "folds_idx": [[index[i] for i in f] for f in saved["folds"]]}
    check_grouped({"test": split["test_idx"], "folds": split["folds_idx"]}, data.patients)
    return split


def train_patch_run(cfg: dict[str, Any], run_dir: str | os.PathLike, device: torch.device, track: Track = _no_track) -> dict[str, Any]:
    """Train every learner in ``cfg['learners']`` (and ``global-…`` baselines) over the folds."""
    import yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(cfg, sort_keys=False))
    random.seed(int(cfg["seed"]))
    np.random.seed(int(cfg["seed"]))
    data = CxrData.from_store(cfg["cache"])
    split = prepare_split(data, cfg, run_dir)
    specs = list(cfg["learners"]) + [f"global-{n}" for n in cfg.get("global_learners") or []]
    results = {}
    for spec in specs:
        results[spec] = run_learner(spec, data, split, cfg, run_dir, device, track)
    return results
