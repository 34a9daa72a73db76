"""The one training loop: segmentation, patch learners and the ensemble all train through it.

:class:`Trainer` owns what every training run needs and nothing task-specific:

* epochs over *global* batches that the task defines as a pure function of
  ``(seed, epoch)``, so a resumed or distributed run sees exactly the same
  batches (:func:`epoch_batches`);
* the step: autocast (``--precision``), the loss scaled so that gradients are
  those of the mean over the global batch whatever the number of ranks,
  backward (with a ``GradScaler`` for fp16), optimiser step;
* validation after every epoch, ``ReduceLROnPlateau`` and early stopping on
  one monitored metric, ``on_best`` when it improves (the task saves its best
  weights there);
* ``RUN/checkpoint.pt`` after every epoch (model, optimiser, scheduler,
  scaler, history: tensors and plain types only, loaded with
  ``torch.load(weights_only=True)``), ``RUN/history.csv``;
* resume: a run folder with a checkpoint continues from it, but only when the
  config is the same (except ``train.epochs`` and ``train.patience``, which may
  be raised to train longer, and ``split.run_folds``); otherwise :class:`~patchflannel.errors.ResumeError` lists
  what changed;
* ``torch.distributed``: the model is wrapped in DistributedDataParallel,
  each rank runs its share of every global batch, only rank 0 writes files,
  every rank resumes from the same checkpoint.

Global batch and learning rate: ``batch_size`` is the global batch; with N
ranks each processes about ``batch_size / N`` items per step and DDP
averages the gradients, so the update equals the one-process update on the
same batch and the learning rate needs no change. BatchNorm statistics are
per rank (SyncBatchNorm with ``sync_bn`` on CUDA).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._files import atomic_path, write_csv, write_text
from .config import config_hash, config_to_yaml, diff_configs
from .errors import ConfigChangedError, ResumeError
from .runtime import Dist, autocast

log = logging.getLogger(__name__)

__all__ = ["LoopSettings", "TrainResult", "Trainer", "epoch_batches", "item_seed", "no_track"]

Track = Callable[[Iterable[Any], str, "int | None"], Iterable[Any]]
# Raising these resumes a run instead of refusing it ("train longer"; a fold-0 screen completed to
# every fold). Matched at the top level of a run's config and under "config." (train-patch nests it).
RESUMABLE_KEYS = frozenset({"train.epochs", "train.patience", "split.run_folds"})
_RESUMABLE = RESUMABLE_KEYS | {f"config.{k}" for k in RESUMABLE_KEYS}
# Switching these never changes what a run has trained (train.refit only adds a model after the folds), so a
# finished run may be resumed with them changed; unlike RESUMABLE_KEYS they stay in the hash (the hash of every
# existing checkpoint is unchanged, and what is keyed by it, e.g. cached votes, is redone once). train-patch
# accepts train.refit false → true only (true → false would leave a refit model behind, out of step).
SWITCHABLE_KEYS = frozenset({"train.refit"})
_SWITCHABLE = SWITCHABLE_KEYS | {f"config.{k}" for k in SWITCHABLE_KEYS}
# Checkpoints of v0.3 train-patch folds also hashed a top-level "epochs" (their train.epochs).
_LEGACY_RESUMABLE = frozenset({"epochs"})
CHECKPOINT = "checkpoint.pt"
FORMAT = 2


def no_track(it: Iterable[Any], description: str = "", total: int | None = None) -> Iterable[Any]:
    return it


def item_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, item, …), stable across runs and platforms."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, weights: np.ndarray | None = None,
                  drop_last: bool = False) -> list[np.ndarray]:
    """The global batches of one epoch: positions into the training items, a pure function of ``(seed, epoch)``.

    ``weights`` (n,) draws ``n`` items with replacement ∝ weights (balanced
    sampling); otherwise a permutation.
    """
    gen = torch.Generator().manual_seed(item_seed(seed, epoch))
    if weights is not None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        order = torch.multinomial(w, n, replacement=True, generator=gen).numpy()
    else:
        order = torch.randperm(n, generator=gen).numpy()
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    return batches


@dataclass
class LoopSettings:
    """What the loop needs from a task's config."""

    epochs: int
    patience: int
    monitor: str
    mode: str = "max"  # max | min
    lr_patience: int | None = None  # ReduceLROnPlateau patience; None = constant LR
    lr_factor: float = 0.5
    sync_bn: bool = False
    tiebreak: str | None = None  # a second metric (lower is better) that decides between equal monitored scores
    log_epochs: bool = True  # False: epoch lines at DEBUG level (many small fits, e.g. the ensemble's)


@dataclass
class TrainResult:
    best_score: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """See the module docstring. ``config`` is the task's resolved config (a pydantic model or dict)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: LoopSettings, *,
                 run_dir: str | Path | None, config: Any, dist: Dist | None = None, precision: str = "fp32",
                 name: str = "train", restart: bool = False) -> None:
        self.dist = dist or Dist()
        self.device = self.dist.device
        self.settings = settings
        self.precision = precision
        self.name = name
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = config
        self.config_dict = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config or {})
        self.hash = config_hash(self.config_dict, _RESUMABLE)
        model.to(self.device)
        if self.dist.enabled:
            if settings.sync_bn and self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.module, self.model = model, ddp
        else:
            self.module, self.model = model, model
        self.optimizer = optimizer
        self.scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=settings.mode, factor=settings.lr_factor,
                                                                     patience=settings.lr_patience)
                          if settings.lr_patience is not None else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.epoch = 0
        self.best = -math.inf if settings.mode == "max" else math.inf
        self.best_epoch = 0
        self.best_tiebreak = math.inf
        self.bad = 0
        self.history: list[dict[str, float]] = []
        self.resumed = False
        if self.run_dir is not None:
            ckpt = self.run_dir / CHECKPOINT
            if restart and self.dist.is_main:
                ckpt.unlink(missing_ok=True)
            self.dist.barrier()
            if ckpt.exists():
                self._load(ckpt)

    # ------------------------------------------------------------------ checkpoints

    def _load(self, path: Path) -> None:
        try:
            ck = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 — torch raises many types for a bad file
            raise ResumeError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                              "delete it, or pass --restart to start this run over") from None
        if not isinstance(ck, dict) or ck.get("format") != FORMAT:
            raise ResumeError(f"{path}: not a checkpoint of this version of patchflannel; pass --restart to start over")
        if ck.get("config_hash") != self.hash:
            import json

            old = json.loads(ck.get("config_json", "{}"))
            changes = [c for c in diff_configs(old, self.config_dict)
                       if c.split(":")[0] not in _RESUMABLE | _LEGACY_RESUMABLE | _SWITCHABLE]
            if changes or not old:
                raise ConfigChangedError(
                    f"{path.parent}: this run was started with another config, so it cannot resume "
                    f"({'; '.join(changes[:6]) or 'config differs'}). Use another --run-dir, pass --restart to "
                    f"discard the checkpoint, or rerun with the run's own config ({path.parent / 'config.yaml'}).",
                    changes)
        if int(ck.get("epoch", 0)) > self.settings.epochs:
            raise ResumeError(f"{path.parent}: already trained {int(ck['epoch'])} epochs, more than the "
                              f"{self.settings.epochs} asked for; epochs can be raised, not lowered (pass --restart "
                              "to train this run again from the start)")
        try:
            self.module.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            if self.scheduler is not None and ck.get("scheduler"):
                self.scheduler.load_state_dict(ck["scheduler"])
            if ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ResumeError(f"{path}: does not fit this model ({str(exc)[:200]}); pass --restart to start over") from None
        self.epoch = int(ck["epoch"])
        self.best, self.best_epoch, self.bad = float(ck["best"]), int(ck["best_epoch"]), int(ck["bad"])
        self.best_tiebreak = float(ck.get("best_tiebreak", math.inf))
        self.history = list(ck["history"])
        self.resumed = True
        log.info("%s: resumed from %s after epoch %d (best %s %.4f at epoch %d)", self.name, path, self.epoch,
                 self.settings.monitor, self.best, self.best_epoch)

    def _save(self) -> None:
        if self.run_dir is None or not self.dist.is_main:
            return
        import json

        ck = {"format": FORMAT, "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
              "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
              "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
              "epoch": self.epoch, "best": float(self.best), "best_epoch": self.best_epoch, "bad": self.bad,
              "best_tiebreak": float(self.best_tiebreak),
              "history": self.history, "config_hash": self.hash, "config_json": json.dumps(self.config_dict)}
        with atomic_path(self.run_dir / CHECKPOINT) as tmp:
            torch.save(ck, tmp)
        write_csv(self.run_dir / "history.csv", self.history)

    def write_config(self) -> None:
        """Write ``RUN/config.yaml`` (rank 0; the resolved config this run trains with)."""
        if self.run_dir is not None and self.dist.is_main:
            write_text(self.run_dir / "config.yaml", config_to_yaml(self.config_dict))

    # ------------------------------------------------------------------ the loop

    def _improved(self, score: float, metrics: dict[str, float]) -> bool:
        if not math.isfinite(score):
            return False
        tb = self.settings.tiebreak
        if tb is not None and score == self.best:
            return float(metrics[tb]) < self.best_tiebreak
        return score > self.best if self.settings.mode == "max" else score < self.best

    def fit(self, batches: Callable[[int], Sequence[Any]], step: Callable[[nn.Module, Any], tuple[Tensor, int]],
            validate: Callable[[nn.Module], dict[str, float]], on_best: Callable[[nn.Module, dict[str, float]], None],
            global_size: Callable[[Any], int], track: Track = no_track) -> TrainResult:
        """Train until ``epochs`` or early stopping.

        Args:
            batches: epoch (1-based) → the global batches of that epoch (any objects).
            step: ``(model, batch) → (loss_sum, n)``: the summed loss over this
                rank's share of ``batch`` (the task picks the share with
                ``dist.shard``) and how many items that was.
            validate: ``model → metrics`` (already reduced over ranks); must
                contain ``settings.monitor``. Called on every rank, in eval mode.
            on_best: ``(module, metrics)``, rank 0 only, when the monitored metric improves.
            global_size: ``batch → number of items in the global batch``.
        """
        self.write_config()
        t_start = time.time() - sum(h.get("seconds", 0.0) for h in self.history)
        s = self.settings
        stopped = self.bad >= s.patience
        while self.epoch < s.epochs and not stopped:
            epoch = self.epoch + 1
            t0 = time.time()
            self.model.train()
            torch.manual_seed(item_seed(epoch, self.dist.rank, 17))  # dropout etc.
            total, count = 0.0, 0
            epoch_batches_ = batches(epoch)
            for batch in track(epoch_batches_, f"{self.name} epoch {epoch}/{s.epochs}", len(epoch_batches_)):
                n_global = int(global_size(batch))
                with autocast(self.device, self.precision):
                    loss_sum, n_local = step(self.model, batch)
                # Mean over the *global* batch: DDP averages gradients over ranks, hence × world.
                loss = loss_sum.float() * (self.dist.world / max(n_global, 1))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.name}: non-finite training loss at epoch {epoch}; "
                                             "lower the learning rate or check the inputs")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                total += float(loss_sum.detach())
                count += int(n_local)
            sums = self.dist.all_gather_object((total, count))
            train_loss = sum(t for t, _ in sums) / max(sum(c for _, c in sums), 1)
            self.model.eval()
            with torch.no_grad():
                metrics = validate(self.module if not self.dist.enabled else self.model.module)
            if s.monitor not in metrics:
                raise KeyError(f"validation metrics lack the monitored key {s.monitor!r}: {sorted(metrics)}")
            score = float(metrics[s.monitor])
            if self.scheduler is not None and math.isfinite(score):
                self.scheduler.step(score)
            improved = self._improved(score, metrics)
            if improved:
                self.best, self.best_epoch, self.bad = score, epoch, 0
                if s.tiebreak is not None:
                    self.best_tiebreak = float(metrics[s.tiebreak])
                if self.dist.is_main:
                    on_best(self.module, metrics)
            else:
                self.bad += 1
            self.epoch = epoch
            self.history.append({"epoch": epoch, "train_loss": train_loss, **{k: float(v) for k, v in metrics.items()},
                                 "lr": float(self.optimizer.param_groups[0]["lr"]), "seconds": time.time() - t0})
            log.log(logging.INFO if s.log_epochs else logging.DEBUG, "%s epoch %d: loss %.4f, %s %.4f%s (%.0f s)",
                    self.name, epoch, train_loss, s.monitor, score, " *" if improved else "", time.time() - t0)
            self._save()
            self.dist.barrier()
            stopped = self.bad >= s.patience
        return TrainResult(best_score=self.best, best_epoch=self.best_epoch, epochs_run=self.epoch,
                           stopped_early=stopped and self.epoch < s.epochs, seconds=time.time() - t_start,
                           history=list(self.history))


def shard(items: Sequence[Any] | np.ndarray, dist: Dist) -> Any:
    """This rank's share of a global batch (every ``world``-th item from ``rank``)."""
    return items[dist.rank::dist.world]


def iterate_chunks(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))
