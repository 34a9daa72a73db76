"""Ensemble run: train FLANNEL and its baselines on the learners' out-of-fold votes,
compare them on the held-out test votes, and write tables, plots, claims and weights.

Inputs are the vote files of one or more ``train-patch`` run folders (see
:mod:`patchflannel.patch_train`): ``RUN/<learner>/oof.npz`` (each non-test
image's distribution from the fold model that never saw its patient — the only
data any combiner is trained on) and ``RUN/<learner>/test.npz`` (the held-out
test images' distributions from each of the F fold models — used only for
evaluation, after every combiner is trained).

Output folder written by :func:`run_ensemble`::

    OUT/config.yaml              resolved config (defaults filled in, run folders)
    OUT/split.json               ensemble-train / validation ids (grouped by patient)
    OUT/table.md                 mean (std) over F fold models × S seeds on the test set
    OUT/table_shipped.md         the shipped configuration (mean of fold models) with bootstrap CIs and paired tests
    OUT/results.json             every number: per-row summaries and per-evaluation reports
    OUT/results.csv              one line per row × metric: mean, std, n
    OUT/claims.md                automatically computed statements (FLANNEL vs baselines, source confound)
    OUT/predictions_test.npz     test ids, labels, learners' P (mean of fold models), each row's probabilities
    OUT/flannel/                 FLANNEL (focal), first seed (config.json + model.safetensors); :func:`load_flannel`
    OUT/calibration.json         FLANNEL's temperature (fitted out of fold) and its test ECE/Brier, the ECE floor
    OUT/*.png                    confusion matrices, ROC/PR, learner weights, training history, reliability
                                 before/after calibration (reliability_test.png)

Rerunning overwrites every file atomically; all training is small MLPs on
(n,N,M) arrays and takes seconds to minutes on a CPU.
"""

from __future__ import annotations

import logging
import copy
import zipfile
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import yaml
from pydantic import Field
from torch import Tensor, nn

from ._files import write_csv, write_json, write_npz, write_text
from .config import Section
from .data import check_grouped, inner_validation
from .errors import ConfigError, DataError
from .runtime import Dist
from .training import LoopSettings, Trainer, epoch_batches
from .ensemble import (
    FlannelWeights,
    StackingMLP,
    _check_P,
    class_balanced_alpha,
    combiner_logits,
    focal_loss,
    hard_vote,
    macro_f1,
    minority_class_weights,
    load_combiner,
    save_combiner,
    soft_vote,
)
from .metrics import classification_report_dict, format_table, summarise

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULTS",
    "EnsembleConfig",
    "LearnerSet",
    "Votes",
    "find_learners",
    "load_flannel",
    "load_votes",
    "resolve_config",
    "run_ensemble",
    "source_confound",
]

T = TypeVar("T")
Track = Callable[[Iterable[T], str, "int | None"], Iterable[T]]

POSITIVE = "covid"
GLOBAL_PREFIX = "global-"
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)  # how the top-class probability's spread is reported
# Below this many adult non-COVID test images the source-confound rate is not interpreted.
MIN_CONFOUND_N = 10



LossName = Literal["focal", "ce", "weighted_ce"]


# --------------------------------------------------------------------------- fitting a combiner (training only)


@dataclass
class FitResult:
    """Outcome of :func:`fit_combiner`; ``model`` holds the best-validation state.

    ``history`` has one entry per epoch in each of ``epoch`` (1-based),
    ``train_loss``, ``val_loss`` and ``val_macro_f1``.
    """

    model: nn.Module
    best_epoch: int
    best_val_macro_f1: float
    best_val_loss: float
    stopped_early: bool
    class_weights: Tensor | None = None
    history: dict[str, list[float]] = field(default_factory=dict)


def _as_inputs(P: Tensor | np.ndarray, y: Tensor | np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    P_t = torch.as_tensor(P, dtype=torch.float32).to(device)
    y_t = torch.as_tensor(y).long().to(device)
    _check_P(P_t)
    if y_t.shape != (P_t.shape[0],):
        raise ValueError(f"labels must be ({P_t.shape[0]},) to match P, got {tuple(y_t.shape)}")
    if y_t.numel() == 0:
        raise ValueError("cannot fit or validate on zero samples")
    if int(y_t.min()) < 0 or int(y_t.max()) >= P_t.shape[2]:
        raise ValueError(f"labels must lie in [0, {P_t.shape[2]}), got [{int(y_t.min())}, {int(y_t.max())}]")
    if not torch.isfinite(P_t).all():
        raise ValueError("P contains NaN or inf; check the learners' outputs")
    return P_t, y_t


@torch.no_grad()
def _evaluate(
    model: nn.Module, P: Tensor, y: Tensor, criterion_weights: Tensor | None, gamma: float, batch_size: int
) -> tuple[float, float]:
    model.eval()
    z = torch.cat([combiner_logits(model, P[i : i + batch_size]) for i in range(0, P.shape[0], batch_size)])
    loss = float(focal_loss(z, y, criterion_weights, gamma))
    return loss, macro_f1(y, z.argmax(dim=1), P.shape[2])


def fit_combiner(
    model: nn.Module,
    P_train: Tensor | np.ndarray,
    y_train: Tensor | np.ndarray,
    P_val: Tensor | np.ndarray,
    y_val: Tensor | np.ndarray,
    *,
    loss: LossName = "focal",
    gamma: float = 2.0,
    alpha: Tensor | Literal["balanced"] | None = "balanced",
    beta: float = 2.0,
    resample: bool = False,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 64,
    patience: int = 10,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FitResult:
    """Train a combiner with Adam and early stopping on validation macro-F1.

    Args:
        model: returns logits ``(B,M)`` or ``(z, w)`` from ``P: (B,N,M)``.
            Construct it under a fixed ``torch.manual_seed`` for a reproducible
            initialisation; ``seed`` here fixes batch order, resampling and
            dropout (without touching the global RNG state).
        P_train, P_val: (n,N,M) float learner distributions (out-of-fold!).
        y_train, y_val: (n,) int class indices.
        loss: ``"focal"`` (uses ``gamma`` and ``alpha``), ``"ce"`` (plain
            cross-entropy) or ``"weighted_ce"`` (cross-entropy with
            :func:`minority_class_weights` of ``y_train`` and ``beta``).
            All reduce by the mean over the batch.
        alpha: focal only — ``"balanced"`` for :func:`class_balanced_alpha` of
            ``y_train``, an (M,) tensor used as given, or ``None`` (ones).
        resample: draw each epoch's n training samples with replacement with
            probability ∝ 1/count(class) (``WeightedRandomSampler``).
        patience: stop after this many epochs without a better validation
            macro-F1 (ties broken by lower validation loss).
        device: everything runs there; inputs may live anywhere.

    Returns:
        :class:`FitResult` whose ``model`` has the best epoch's state loaded
        and is in eval mode.
    """
    if loss not in ("focal", "ce", "weighted_ce"):
        raise ValueError(f"loss must be one of 'focal', 'ce', 'weighted_ce', got {loss!r}")
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError(f"epochs, batch_size and patience must be >= 1, got {epochs}, {batch_size}, {patience}")
    device = torch.device(device)
    P_tr, y_tr = _as_inputs(P_train, y_train, device)
    P_va, y_va = _as_inputs(P_val, y_val, device)
    n_classes = P_tr.shape[2]
    if P_va.shape[1:] != P_tr.shape[1:]:
        raise ValueError(f"train P is (n,{P_tr.shape[1]},{P_tr.shape[2]}) but val P is {tuple(P_va.shape)}")

    # One loss function for all three options: CE is the focal loss with γ = 0
    # and α = 1, weighted CE the same with per-class weights — so all reduce
    # by the plain batch mean, as the focal loss does.
    weights: Tensor | None
    if loss == "focal":
        if isinstance(alpha, str):
            if alpha != "balanced":
                raise ValueError(f"alpha must be 'balanced', a tensor or None, got {alpha!r}")
            weights = class_balanced_alpha(y_tr, n_classes)
        else:
            weights = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        g = float(gamma)
    elif loss == "weighted_ce":
        weights, g = minority_class_weights(y_tr, n_classes, beta), 0.0
    else:
        weights, g = None, 0.0
    if loss != "focal" and isinstance(alpha, Tensor):
        logger.warning("alpha is only used by loss='focal'; ignoring it for loss=%r", loss)
    if weights is not None:
        weights = weights.to(device)

    n = P_tr.shape[0]
    sample_w = None
    if resample:  # each epoch draws n samples with replacement, ∝ 1/count(class)
        counts = torch.bincount(y_tr.cpu(), minlength=n_classes).double()
        sample_w = (1.0 / counts.clamp_min(1))[y_tr.cpu()].numpy()

    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    # The one training loop (patchflannel.training.Trainer), in memory: the combiner is a few
    # thousand parameters fitted in seconds, so no run folder or checkpoint.
    settings = LoopSettings(epochs=epochs, patience=patience, monitor="val_macro_f1", mode="max",
                            tiebreak="val_loss", log_epochs=False)
    fit_cfg = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "loss": loss, "gamma": g}
    trainer = Trainer(model, opt, settings, run_dir=None, config=fit_cfg, dist=Dist(device=device), name="combiner")
    best_state: dict[str, Tensor] = copy.deepcopy(model.state_dict())

    def batches(epoch: int) -> list[np.ndarray]:
        return epoch_batches(n, batch_size, seed, epoch, sample_w)

    def step(m: nn.Module, idx: np.ndarray) -> tuple[Tensor, int]:
        i = torch.as_tensor(idx, device=device)
        return focal_loss(combiner_logits(m, P_tr[i]), y_tr[i], weights, g) * len(i), len(i)

    def validate(m: nn.Module) -> dict[str, float]:
        val_loss, val_f1 = _evaluate(m, P_va, y_va, weights, g, max(batch_size, 1024))
        return {"val_macro_f1": val_f1, "val_loss": val_loss}

    def on_best(m: nn.Module, _: dict[str, float]) -> None:
        best_state.update(copy.deepcopy(m.state_dict()))

    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):  # dropout draws never touch the caller's RNG
        torch.manual_seed(seed)
        result = trainer.fit(batches, step, validate, on_best, len)
    model.load_state_dict(best_state)
    model.eval()
    history = {"epoch": [h["epoch"] for h in result.history], "train_loss": [h["train_loss"] for h in result.history],
               "val_loss": [h["val_loss"] for h in result.history],
               "val_macro_f1": [h["val_macro_f1"] for h in result.history]}
    best_row = next((h for h in result.history if h["epoch"] == result.best_epoch), None)
    best_loss = float(best_row["val_loss"]) if best_row else math.inf
    logger.info("best epoch %d of %d: val macro-F1 %.4f, val loss %.4f", result.best_epoch, result.epochs_run,
                result.best_score, best_loss)
    return FitResult(
        model=model,
        best_epoch=result.best_epoch,
        best_val_macro_f1=result.best_score,
        best_val_loss=best_loss,
        stopped_early=result.stopped_early,
        class_weights=None if weights is None else weights.cpu(),
        history=history,
    )


def _no_track(it: Iterable[T], description: str = "", total: int | None = None) -> Iterable[T]:
    return it


# --------------------------------------------------------------------------- config


class EnsembleConfig(Section):
    """``configs/ensemble_cpu.yaml``; unknown keys are refused (a typo is an error, not a silent default)."""

    learners: list[str] | None = None
    distribution: Literal["soft", "hard"] = "soft"
    gamma: float = Field(default=3.0, ge=0)
    beta: float = Field(default=2.0, gt=0)
    seeds: int = Field(default=3, ge=1)
    epochs: int = Field(default=300, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    batch_size: int = Field(default=64, ge=1)
    patience: int = Field(default=30, ge=1)
    val_frac: float = Field(default=0.2, gt=0, lt=1)
    hidden: int | None = Field(default=None, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)
    stacking_width: int = Field(default=64, ge=1)
    seed: int = Field(default=0, ge=0)
    inputs: Literal["patch", "all"] = "patch"  # what FLANNEL, voting and stacking combine: patch learners or patch + global


DEFAULTS: dict[str, Any] = EnsembleConfig().model_dump()


def resolve_config(cfg: Mapping[str, Any] | EnsembleConfig | None) -> dict[str, Any]:
    """``cfg`` checked against :class:`EnsembleConfig` (missing keys take its defaults) as a plain dict."""
    from .config import validate_config

    if isinstance(cfg, EnsembleConfig):
        return cfg.model_dump()
    raw = {k: v for k, v in (cfg or {}).items() if k != "runs"}
    return validate_config(EnsembleConfig, raw, "ensemble config").model_dump()


# --------------------------------------------------------------------------- votes


@dataclass
class LearnerSet:
    """The learners of an ensemble run, in column order of ``P``."""

    names: list[str]
    classes: list[str]
    distribution: str
    k: dict[str, int]
    folders: dict[str, Path]

    def indices(self, *, global_: bool) -> list[int]:
        """Columns of the whole-image (``global_=True``) or patch learners."""
        return [i for i, n in enumerate(self.names) if _is_global(n) == global_]

    def combined(self, inputs: str) -> list[int]:
        """Columns FLANNEL and the voting/stacking rows combine: ``"patch"`` learners only
        (Patched FLANNEL) or ``"all"`` (patch learners, then whole-image ones)."""
        return self.indices(global_=False) + (self.indices(global_=True) if inputs == "all" else [])


@dataclass
class Votes:
    """Aligned votes of every learner on one image set, sorted by image id.

    ``P`` is ``(n,N,M)`` float32 for out-of-fold votes and ``(t,F,N,M)`` for
    test votes (one distribution per fold model f).
    """

    ids: np.ndarray
    y: np.ndarray
    patients: np.ndarray
    sources: np.ndarray
    P: np.ndarray = field(repr=False)
    views: np.ndarray | None = None  # radiographic view per image (PA, AP, AP Supine, …) when the vote files record it
    folds: np.ndarray | None = None  # out-of-fold votes: the fold each image was held out in (when recorded)
    ages: np.ndarray | None = None  # age group per image (adult / pediatric / "") when the vote files record it


def _is_global(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(GLOBAL_PREFIX)


def find_learners(run_dirs: Sequence[str | os.PathLike[str]]) -> dict[str, Path]:
    """Learner name → folder, for every subfolder of the runs holding ``oof.npz`` and ``test.npz``.

    Names are folder names; a name found in several runs is qualified as
    ``<run folder name>/<learner>`` in all of them.
    """
    found: list[tuple[Path, Path]] = []
    for run in map(Path, run_dirs):
        if not run.is_dir():
            raise DataError(f"run folder {run} not found")
        found += [(run, sub) for sub in sorted(run.iterdir())
                  if sub.is_dir() and (sub / "oof.npz").is_file() and (sub / "test.npz").is_file()]
    if not found:
        where = ", ".join(str(r) for r in run_dirs) or "(no run folders given)"
        raise DataError(f"no learner folders with oof.npz and test.npz in {where}; "
                                "run `patchflannel train-patch` first")
    counts: dict[str, int] = {}
    for _, sub in found:
        counts[sub.name] = counts.get(sub.name, 0) + 1
    out: dict[str, Path] = {}
    for run, sub in found:
        name = sub.name if counts[sub.name] == 1 else f"{run.name}/{sub.name}"
        if name in out:
            raise DataError(f"learner {name!r} appears twice ({out[name]} and {sub}); "
                             "give the run folders distinct names")
        out[name] = sub
    return out


_OOF_KEYS = ("ids", "y", "soft", "hard", "patients", "sources", "classes", "k")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _OOF_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks {missing}; rerun train-patch with this version to rewrite its vote files")
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: not a readable vote file ({type(exc).__name__}: {exc}); rerun train-patch to "
                        "rewrite it") from None


def _sorted_by_id(d: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    ids = d["ids"].astype(str)
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: image ids are not unique")
    order = np.argsort(ids, kind="stable")
    n = len(ids)
    return {k: (v[order] if v.ndim >= 1 and v.shape[0] == n and k != "classes" else v) for k, v in d.items()}


def _check_same_ids(ref: np.ndarray, ids: np.ndarray, name: str, ref_name: str, part: str) -> None:
    if ids.shape == ref.shape and np.array_equal(ids, ref):
        return
    a, b = set(ref.tolist()), set(ids.tolist())
    missing, extra = sorted(a - b), sorted(b - a)
    example = (missing or extra or ["?"])[0]
    raise DataError(
        f"learner {name!r}: its {part} image ids differ from those of {ref_name!r} "
        f"({len(missing)} missing, {len(extra)} extra, e.g. {example!r}); "
        "ensemble only learners trained on the same split (same data and seed)")


def load_votes(
    run_dirs: Sequence[str | os.PathLike[str]],
    learners: Sequence[str] | None = None,
    distribution: str = "soft",
) -> tuple[LearnerSet, Votes, Votes]:
    """Read, check and align the vote files of every learner in the runs.

    Args:
        run_dirs: ``train-patch`` run folders.
        learners: names (see :func:`find_learners`; a bare folder name also
            matches a qualified one if unambiguous) to keep, in this order;
            ``None`` keeps all, patch learners first, then global ones.
        distribution: ``"soft"`` (mean patch softmax) or ``"hard"`` (vote fractions).

    Returns:
        ``(learner set, out-of-fold votes with P (n,N,M), test votes with P (t,F,N,M))``,
        images sorted by id.

    Raises:
        ValueError: a learner's OOF or test ids, labels, classes or number of
            fold models differ from the first learner's.
    """
    if distribution not in ("soft", "hard"):
        raise DataError(f"distribution must be 'soft' or 'hard', got {distribution!r}")
    available = find_learners(run_dirs)
    if learners is None:
        names = [n for n in available if not _is_global(n)] + [n for n in available if _is_global(n)]
    else:
        names = []
        for want in learners:
            match = [n for n in available if n == want] or [n for n in available if n.rsplit("/", 1)[-1] == want]
            if len(match) != 1:
                why = "is ambiguous" if match else "was not found"
                raise DataError(f"learner {want!r} {why}; available: {', '.join(available)}")
            if match[0] in names:
                raise DataError(f"learner {want!r} is listed twice")
            names.append(match[0])
    if not names:
        raise DataError("no learners selected")

    P_oof, P_test, ks = [], [], {}
    ref: dict[str, Any] = {}
    for name in names:
        folder = available[name]
        oof = _sorted_by_id(_read_npz(folder / "oof.npz"), folder / "oof.npz")
        test = _sorted_by_id(_read_npz(folder / "test.npz"), folder / "test.npz")
        classes = [str(c) for c in oof["classes"]]
        ids_o, ids_t = oof["ids"].astype(str), test["ids"].astype(str)
        po = np.asarray(oof[distribution], dtype=np.float32)
        pt = np.asarray(test[distribution], dtype=np.float32)
        if po.shape != (len(ids_o), len(classes)) or pt.ndim != 3 or pt.shape[::2] != (len(ids_t), len(classes)):
            raise DataError(f"learner {name!r}: {distribution} votes have shapes {po.shape} (oof) and {pt.shape} "
                             f"(test); expected (n,{len(classes)}) and (t,F,{len(classes)})")
        if not (np.isfinite(po).all() and np.isfinite(pt).all()):
            raise DataError(f"learner {name!r}: {distribution} votes contain NaN or inf")
        if not ref:
            ref = {"name": name, "classes": classes, "oof": oof, "test": test, "F": pt.shape[1]}
        else:
            if classes != ref["classes"] or [str(c) for c in test["classes"]] != ref["classes"]:
                raise DataError(f"learner {name!r} has classes {classes}, {ref['name']!r} has {ref['classes']}")
            _check_same_ids(ref["oof"]["ids"].astype(str), ids_o, name, ref["name"], "out-of-fold")
            _check_same_ids(ref["test"]["ids"].astype(str), ids_t, name, ref["name"], "test")
            for part, key, d in (("out-of-fold", "oof", oof), ("test", "test", test)):
                bad = int((d["y"] != ref[key]["y"]).sum())
                if bad:
                    raise DataError(f"learner {name!r}: {bad} {part} labels differ from {ref['name']!r}'s")
            if pt.shape[1] != ref["F"]:
                raise DataError(f"learner {name!r} has test votes from {pt.shape[1]} fold models, {ref['name']!r} "
                                 f"from {ref['F']}; every run must use the same number of folds")
        P_oof.append(po)
        P_test.append(pt)
        ks[name] = int(oof["k"])

    o, t = ref["oof"], ref["test"]
    lset = LearnerSet(names=names, classes=ref["classes"], distribution=distribution, k=ks,
                      folders={n: available[n] for n in names})
    oof_votes = Votes(ids=o["ids"].astype(str), y=o["y"].astype(np.int64), patients=o["patients"].astype(str),
                      sources=o["sources"].astype(str), P=np.stack(P_oof, axis=1),
                      views=o["views"].astype(str) if "views" in o else None,
                      folds=o["fold"].astype(np.int64) if "fold" in o else None,
                      ages=o["age_groups"].astype(str) if "age_groups" in o else None)
    test_votes = Votes(ids=t["ids"].astype(str), y=t["y"].astype(np.int64), patients=t["patients"].astype(str),
                       sources=t["sources"].astype(str), P=np.stack(P_test, axis=2),
                       views=t["views"].astype(str) if "views" in t else None,
                       ages=t["age_groups"].astype(str) if "age_groups" in t else None)
    logger.info("ensemble: %d learners (%s), %d out-of-fold and %d test images, %d fold models, %s votes",
                len(names), ", ".join(names), len(oof_votes.ids), len(test_votes.ids), ref["F"], distribution)
    return lset, oof_votes, test_votes


# --------------------------------------------------------------------------- rows


@dataclass
class _Row:
    """One line of the comparison: a fixed rule or a trainable combiner over some learners."""

    name: str
    key: str
    learners: list[int]
    rule: Callable[[Tensor], Tensor] | None = None  # (B,n,M) → (B,M) probabilities
    build: Callable[[], nn.Module] | None = None
    fit: dict[str, Any] = field(default_factory=dict)
    fits: list[FitResult] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    @property
    def trainable(self) -> bool:
        return self.build is not None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _rows(lset: LearnerSet, cfg: dict[str, Any], alpha: Tensor) -> list[_Row]:
    patch, glob = lset.combined(cfg["inputs"]), lset.indices(global_=True)
    m = len(lset.classes)
    hidden, width = cfg["hidden"], cfg["stacking_width"]

    def flannel(n: int) -> Callable[[], nn.Module]:
        return lambda: FlannelWeights(n, m, hidden)

    def stacking(n: int, layers: int) -> Callable[[], nn.Module]:
        return lambda: StackingMLP(n, m, hidden_layers=layers, width=width)

    n = len(patch)
    focal = {"loss": "focal", "gamma": cfg["gamma"], "alpha": alpha}
    rows = [_Row(lset.names[i], _slug(lset.names[i]), [i], rule=lambda P: P[:, 0]) for i in lset.indices(global_=False)]
    rows += [
        _Row("soft voting", "soft_voting", patch, rule=soft_vote),
        _Row("hard voting", "hard_voting", patch, rule=hard_vote),
        _Row("stacking MLP (1 layer)", "stacking_mlp_1", patch, build=stacking(n, 1), fit={"loss": "ce"}),
        _Row("stacking MLP (2 layers)", "stacking_mlp_2", patch, build=stacking(n, 2), fit={"loss": "ce"}),
        _Row(f"FLANNEL (focal γ={cfg['gamma']:g})", "flannel_focal", patch, build=flannel(n), fit=focal),
        _Row("FLANNEL (CE)", "flannel_ce", patch, build=flannel(n), fit={"loss": "ce"}),
        _Row("FLANNEL (CE + resampling)", "flannel_ce_resampling", patch, build=flannel(n),
             fit={"loss": "ce", "resample": True}),
        _Row(f"FLANNEL (weighted CE β={cfg['beta']:g})", "flannel_weighted_ce", patch, build=flannel(n),
             fit={"loss": "weighted_ce", "beta": cfg["beta"]}),
    ]
    if glob:
        rows += [_Row(lset.names[i], _slug(lset.names[i]), [i], rule=lambda P: P[:, 0]) for i in glob]
    if len(glob) > 1 or (glob and cfg["inputs"] == "patch"):
        rows.append(_Row("FLANNEL over global learners (focal)", "flannel_global_focal", glob,
                         build=flannel(len(glob)), fit=focal))
    return rows


def _train(row: _Row, P_tr: np.ndarray, y_tr: np.ndarray, P_va: np.ndarray, y_va: np.ndarray,
           cfg: dict[str, Any], device: torch.device) -> None:
    """Fit ``row`` once per seed on ensemble-train, early-stopped on validation (OOF data only)."""
    assert row.build is not None
    cols = row.learners
    for s in range(cfg["seeds"]):
        seed = cfg["seed"] + s
        # The init comes from the global RNG; fork it so the caller's stream is untouched.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = row.build()
        res = fit_combiner(model, P_tr[:, cols], y_tr, P_va[:, cols], y_va, epochs=cfg["epochs"], lr=cfg["lr"],
                           batch_size=cfg["batch_size"], patience=cfg["patience"],
                           weight_decay=cfg["weight_decay"], seed=seed, device=device, **row.fit)
        logger.debug("%s seed %d: best epoch %d, val macro-F1 %.3f", row.name, seed, res.best_epoch,
                    res.best_val_macro_f1)
        row.fits.append(res)
        row.seeds.append(seed)


@torch.no_grad()
def _predict(
    row: _Row, P: np.ndarray, fit: FitResult | None, device: torch.device
) -> tuple[np.ndarray, np.ndarray | None]:
    """P: (B,N,M) all learners → (probabilities (B,M) float64, FLANNEL weights (B,n) or None)."""
    x = torch.as_tensor(P[:, row.learners], dtype=torch.float32, device=device)
    if fit is None:
        assert row.rule is not None
        return row.rule(x).double().cpu().numpy(), None
    fit.model.eval()
    out = fit.model(x)
    z, w = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
    proba = torch.softmax(z.double(), dim=1).cpu().numpy()
    return proba, None if w is None else w.double().cpu().numpy()


# --------------------------------------------------------------------------- source confound


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _is_pediatric(source: str) -> bool:
    s = source.lower()
    return "kaggle" in s or "pediatric" in s


def source_confound(pred: np.ndarray, y: np.ndarray, sources: np.ndarray, covid: int) -> dict[str, Any]:
    """How often non-COVID images are called COVID, adult vs pediatric sources.

    In these data every COVID image comes from an adult source and most
    non-COVID ones from the pediatric Kaggle set, so a model can score well by
    recognising "adult" instead of COVID. Adult non-COVID images (source not
    containing "kaggle"/"pediatric"; empty sources are left out) are the
    images where that shortcut shows: their COVID call rate should be as low
    as the pediatric one.

    Args:
        pred: (t,) int predicted classes; y: (t,) int labels; sources: (t,) str.
    """
    sources = np.asarray(sources).astype(str)
    known = np.char.str_len(np.char.strip(sources)) > 0
    ped = np.array([_is_pediatric(s) for s in sources], dtype=bool)
    non_covid = np.asarray(y) != covid
    called = np.asarray(pred) == covid

    def group(mask: np.ndarray) -> dict[str, Any]:
        n, k = int(mask.sum()), int((called & mask).sum())
        lo, hi = _wilson(k, n)
        return {"n": n, "predicted_covid": k, "fraction": k / n if n else math.nan, "ci95": [lo, hi]}

    adult, pediatric = group(known & ~ped & non_covid), group(known & ped & non_covid)
    if adult["n"] == 0:
        verdict = "no adult non-COVID test images: the source confound cannot be checked"
    elif adult["n"] < MIN_CONFOUND_N:
        verdict = (f"too few adult non-COVID test images ({adult['n']} < {MIN_CONFOUND_N}) to conclude "
                   "anything about a source confound")
    elif pediatric["n"] and adult["ci95"][0] > pediatric["ci95"][1]:
        verdict = ("adult non-COVID images are called COVID more often than pediatric ones (95% intervals do not "
                   "overlap): consistent with the model partly recognising the adult source rather than COVID")
    elif adult["fraction"] >= 0.5:
        verdict = "at least half of the adult non-COVID images are called COVID: a source shortcut is likely"
    else:
        verdict = "no clear evidence of a source confound at this sample size (intervals overlap)"
    return {"adult_non_covid": adult, "pediatric_non_covid": pediatric,
            "unknown_source": int((~known).sum()), "verdict": verdict}


# --------------------------------------------------------------------------- claims


def _per_fold(evals: list[dict[str, Any]], key: str, n_folds: int) -> np.ndarray:
    """Mean over seeds of one metric for each fold model → (F,)."""
    out = np.full(n_folds, np.nan)
    for f in range(n_folds):
        vals = [_get(e["report"], key) for e in evals if e["fold_model"] == f]
        vals = [v for v in vals if math.isfinite(v)]
        if vals:
            out[f] = float(np.mean(vals))
    return out


def _get(report: Mapping[str, Any], dotted: str) -> float:
    node: Any = report
    for part in dotted.split("."):
        node = node[part]
    return float(node) if node is not None else math.nan


def _compare(a: dict[str, Any], b: dict[str, Any], key: str, n_folds: int) -> dict[str, Any]:
    sa, sb = a["summary"].get(key, {}), b["summary"].get(key, {})
    ma, mb = sa.get("mean", math.nan), sb.get("mean", math.nan)
    da, db = sa.get("std", math.nan), sb.get("std", math.nan)
    fa, fb = _per_fold(a["evaluations"], key, n_folds), _per_fold(b["evaluations"], key, n_folds)
    ok = np.isfinite(fa) & np.isfinite(fb)
    diff = ma - mb
    spread = max(v for v in (da, db, 0.0) if math.isfinite(v))
    if not (math.isfinite(ma) and math.isfinite(mb)):
        verdict = "undefined"
    elif abs(diff) < 1e-12:
        verdict, diff = "tie", 0.0
    elif diff > 0:
        verdict = "yes" if diff > spread and (fa[ok] > fb[ok]).all() else "yes, but within the spread (not conclusive)"
    else:
        verdict = "no" if -diff > spread else "no, but within the spread (not conclusive)"
    return {"metric": key, "flannel": ma, "flannel_std": da, "other": mb, "other_std": db, "difference": diff,
            "fold_models_won": int((fa[ok] > fb[ok]).sum()), "fold_models_compared": int(ok.sum()), "verdict": verdict}


def paired_verdict(d: Mapping[str, float]) -> str:
    """The wording a paired bootstrap difference (A − B with its 95 % CI) supports."""
    if not (math.isfinite(d["ci_low"]) and math.isfinite(d["ci_high"])):
        return "undefined (too few images)"
    if d["ci_low"] > 0:
        return "yes: A beats B (the 95 % CI excludes 0)"
    if d["ci_high"] < 0:
        return "no: B beats A (the 95 % CI excludes 0)"
    return "not demonstrated: the 95 % CI contains 0"


def _paired_claims(res: Mapping[str, Any]) -> list[str]:
    """claims.md's headline: the shipped configuration's paired bootstrap tests, worded by their CIs."""
    ship = res.get("shipped_configuration")
    if not ship or not ship.get("paired"):
        return []
    names = {r["key"]: r["name"] for r in res["rows"]}
    lines = ["## The shipped configuration: paired bootstrap over the test images (what a claim may say)", "",
             (f"FLANNEL (focal) as `predict` runs it (mean of the fold models' distributions) against each "
              f"alternative on the same test images, {ship['n_resamples']} resamples of patients."), "",
             "| A − B | macro-F1 difference [95 % CI] | p | does A beat B? |", "|---|---|---:|---|"]
    for pair, d in ship["paired"].items():
        a, b = pair.split(" - ")
        m = d["macro_f1"]
        lines.append(f"| {names.get(a, a)} − {names.get(b, b)} | {m['diff']:+.3f} [{m['ci_low']:+.3f}, "
                     f"{m['ci_high']:+.3f}] | {m['p']:.3f} | {paired_verdict(m)} |")
    lines += ["", "Only a 'yes' here supports writing \"FLANNEL beats …\"; the table below shows the spread over "
              "training runs, which leaves out the uncertainty of a finite test set.", ""]
    return lines


def _claims_md(res: dict[str, Any], row_fl: str, best: str, best_test: str, covid_name: str) -> str:
    rows = {r["name"]: r for r in res["rows"]}
    f, s = res["n_fold_models"], res["config"]["seeds"]
    nt, nc = res["n_images"]["test"], res["n_images"]["test_per_class"][covid_name]
    fl = rows[row_fl]["summary"]
    lines = [
        "# Claims (computed automatically)",
        "",
        (f"Held-out test set: {nt} images ({nc} {covid_name}); every number is the mean ± std over "
         f"{f} fold models × {s} seeds ({f} fold models for untrained rows). Combiners were trained on "
         f"{res['n_images']['ensemble_train']} out-of-fold images and early-stopped on "
         f"{res['n_images']['ensemble_val']} (grouped by patient); nothing was selected on the test set."),
        "",
        (f"**{row_fl}**: macro-F1 {fl['macro_f1']['mean']:.3f} ± {fl['macro_f1']['std']:.3f}, "
         f"{covid_name} F1 {fl[f'per_class.{covid_name}.f1']['mean']:.3f} ± "
         f"{fl[f'per_class.{covid_name}.f1']['std']:.3f}."),
        "",
    ]
    lines += _paired_claims(res)
    lines += [
        "## Over fold models × seeds (the spread of training, not of the test sample)",
        "",
        "| does FLANNEL (focal) beat … | metric | FLANNEL | other | difference | fold models won | verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for label, comp in res["claims"]["comparisons"].items():
        for c in comp:
            metric = "macro-F1" if c["metric"] == "macro_f1" else f"{covid_name} F1"
            lines.append(f"| {label} | {metric} | {c['flannel']:.3f} ± {c['flannel_std']:.3f} | "
                         f"{c['other']:.3f} ± {c['other_std']:.3f} | {c['difference']:+.3f} | "
                         f"{c['fold_models_won']}/{c['fold_models_compared']} | {c['verdict']} |")
    lines += [
        "",
        (f"The best single learner `{best}` was chosen on out-of-fold macro-F1 "
         f"({rows[best]['oof_macro_f1']:.3f}). For context only (a selection on the test set): the single "
         f"learner with the highest test macro-F1 is `{best_test}` "
         f"({rows[best_test]['summary']['macro_f1']['mean']:.3f})."),
        "",
        ("A verdict is 'yes' only when the mean difference exceeds the larger std and FLANNEL wins on every fold "
         "model; 'within the spread' means the difference is smaller than the variation over fold models/seeds."),
        "",
        "## Learned learner weights (FLANNEL (focal), test images, all fold models × seeds)",
        "",
        "| learner | mean w | std | fraction < 0 |",
        "|---|---:|---:|---:|",
    ]
    for name, st in res["flannel_weights"]["per_learner"].items():
        lines.append(f"| {name} | {st['mean']:+.3f} | {st['std']:.3f} | {st['fraction_negative']:.2f} |")
    lines += ["", "## Source-confound check", "",
              ("When COVID images come (almost) only from adult sources and most non-COVID images from the "
               "pediatric Kaggle set (numbers below), a model can look good by recognising the source. Test images "
               "that are adult and not COVID show whether it does: how many of them are called COVID "
               "(mean-of-fold-model prediction; FLANNEL: the saved first-seed model)."), ""]
    train_mix = res["source_confound"]["training_data"]
    if train_mix["adult_images"] and math.isfinite(train_mix["covid_adult_fraction"]):
        lines.append(f"In the ensemble's out-of-fold data, {train_mix['adult_covid_fraction']:.0%} of the "
                     f"{train_mix['adult_images']} adult-source images are COVID and "
                     f"{train_mix['covid_adult_fraction']:.0%} of the COVID images are adult.")
    else:
        lines.append("The out-of-fold data have no adult-source images or no COVID images (or no recorded sources).")
    lines.append("")
    lines.append("| model | adult non-COVID called COVID | 95% CI | pediatric non-COVID called COVID | verdict |")
    lines.append("|---|---:|---|---:|---|")
    for name, sc in res["source_confound"]["models"].items():
        a, p = sc["adult_non_covid"], sc["pediatric_non_covid"]
        frac = f"{a['predicted_covid']}/{a['n']}" + (f" = {a['fraction']:.2f}" if a["n"] else "")
        ci = f"{a['ci95'][0]:.2f}–{a['ci95'][1]:.2f}" if a["n"] else "–"
        pfrac = f"{p['predicted_covid']}/{p['n']}" + (f" = {p['fraction']:.2f}" if p["n"] else "")
        lines.append(f"| {name} | {frac} | {ci} | {pfrac} | {sc['verdict']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- writing helpers


def _shipped_ci(out: Path, results: dict[str, Any], ev: _Evaluation, test: Votes, classes: list[str], seed: int,
                n_resamples: int = 2000) -> dict[str, Any]:
    """The configuration ``predict`` ships — each row fed the *mean of the fold models'* distributions,
    first seed (what ``export-ensemble --members folds`` writes) — with 95 % bootstrap CIs over the
    test images (patients resampled), and paired bootstraps FLANNEL − soft voting and FLANNEL − best
    single learner (best on out-of-fold votes). Writes ``OUT/table_shipped.md``."""
    from .stats import EvalData, bootstrap_metrics, confound_report, paired_bootstrap, stratified_report

    names = {r["key"]: r["name"] for r in results["rows"]}
    data = {k: EvalData(y=test.y, probs=np.asarray(p, dtype=np.float64), classes=tuple(classes), clusters=test.patients)
            for k, p in ev.mean_proba.items()}
    rows = {k: bootstrap_metrics(d, n_resamples, seed) for k, d in data.items()}
    best = results["claims"]["best_single_key"]
    paired = {f"flannel_focal - {other}": paired_bootstrap(data["flannel_focal"], data[other], ["macro_f1", "accuracy"],
                                                           n_resamples, seed)
              for other in ("soft_voting", best) if other in data}
    pos = next((k for k in next(iter(rows.values())) if k.endswith("_auc")), None)

    def ci(m: dict[str, Any]) -> str:
        if not np.isfinite(m["value"]):
            return "–"
        if not (np.isfinite(m["ci_low"]) and np.isfinite(m["ci_high"])):
            return f"{m['value']:.3f} (too few for a CI)"
        return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

    lines = ["# The shipped configuration, with 95 % bootstrap CIs", "",
             f"Each row as `predict` runs it: fed the mean of the fold models' distributions (first seed). "
             f"{len(test.y)} held-out test images of {len(set(test.patients.tolist()))} patients; "
             f"{n_resamples} bootstrap resamples of patients (seed {seed}). **FLANNEL (focal) is what ships.**", "",
             f"| row | macro-F1 | accuracy | {pos or 'AUC'} | ECE |", "|---|---|---|---|---|"]
    for k, m in sorted(rows.items(), key=lambda kv: kv[0] != "flannel_focal"):
        label = f"**{names.get(k, k)}** (shipped)" if k == "flannel_focal" else names.get(k, k)
        lines.append(f"| {label} | {ci(m['macro_f1'])} | {ci(m['accuracy'])} | {ci(m[pos]) if pos else '–'} | {ci(m['ece'])} |")
    lines += ["", "Paired differences (same images, same resamples):", "", "| difference | macro-F1 | p | accuracy | p |",
              "|---|---|---|---|---|"]
    for name, d in paired.items():
        a, b = name.split(" - ")
        mf, ac = d["macro_f1"], d["accuracy"]
        lines.append(f"| {names.get(a, a)} − {names.get(b, b)} | {mf['diff']:+.3f} [{mf['ci_low']:+.3f}, {mf['ci_high']:+.3f}] "
                     f"| {mf['p']:.3f} | {ac['diff']:+.3f} [{ac['ci_low']:+.3f}, {ac['ci_high']:+.3f}] | {ac['p']:.3f} |")
    lines += ["", "A difference whose interval contains 0 is not a demonstrated improvement."]
    # The confound, measured on the shipped row: per source and age group, within-adult AUC.
    ages = _ages(test)
    fl = data["flannel_focal"]
    groups = {"source": test.sources.tolist(), "age_group": ages}
    if test.views is not None:  # the view is a second shortcut (e.g. AP Supine ≈ COVID in the public data)
        groups["view"] = [v or "unknown" for v in test.views.tolist()]
    strata = stratified_report(fl, groups, n_resamples, seed)
    confound = confound_report(fl, ages, n_resamples, seed)
    lines += ["", f"## FLANNEL (focal), shipped: per {', '.join(g.replace('_', ' ') for g in groups)}", "",
              f"| group | stratum | n | patients | macro-F1 | accuracy | mean p_{pos.split('_')[0] if pos else 'pos'} |",
              "|---|---|---:|---:|---|---|---:|"]
    for g, srows in strata.items():
        for r in srows:
            mean_p = next((v for k, v in r.items() if k.startswith("mean_p_")), float("nan"))
            lines.append(f"| {g} | {r['stratum']} | {r['n']} | {r['patients']} | {ci(r['metrics']['macro_f1'])} | "
                         f"{ci(r['metrics']['accuracy'])} | {mean_p:.3f} |")
    wa, av = confound["within_adults"], confound["adult_vs_pediatric_negatives"]

    def auc(a: dict[str, Any]) -> str:
        return a.get("note") or f"{a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] (n = {a['n']})"

    lines += ["", f"- Within-adult {pos or 'AUC'} (does the score separate the disease when age cannot help?): {auc(wa)}",
              f"- p_covid separating adult from pediatric images without the disease (0.5 = the score ignores "
              f"age/source): {auc(av)}"]
    write_text(out / "table_shipped.md", "\n".join(lines) + "\n")
    return {"rows": rows, "paired": paired, "strata": strata, "confound": confound, "n_resamples": n_resamples,
            "seed": seed, "what": "mean of fold models, first seed; patients resampled"}


def _ages(v: Votes) -> list[str]:
    from .stats import sample_age_group

    if v.ages is not None:
        return [str(a) for a in v.ages]
    return [sample_age_group(patient_id=p, source=s) for p, s in zip(v.patients.tolist(), v.sources.tolist())]


def _read_external(lset: LearnerSet) -> tuple[np.ndarray, np.ndarray] | None:
    """Votes of every learner on the train-only sources' held-out part (``external.npz``, e.g. JSRT
    adult radiographs without pneumonia): ``(ids, P (e,n,M) mean of fold models)``, or None."""
    ids, P = None, []
    for name in lset.names:
        f = lset.folders[name] / "external.npz"
        if not f.is_file():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                d = {k: z[k] for k in ("ids", lset.distribution) if k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"{f}: unreadable vote file ({exc})") from None
        if len(d) < 2:
            return None  # e.g. hard votes asked for, only soft ones recorded for the hold-out
        order = np.argsort(d["ids"].astype(str), kind="stable")
        if ids is not None and not np.array_equal(ids, d["ids"].astype(str)[order]):
            return None
        ids = d["ids"].astype(str)[order]
        P.append(np.asarray(d[lset.distribution], dtype=np.float32)[order].mean(1))
    return (ids, np.stack(P, axis=1)) if ids is not None and len(ids) else None


def _all_images(out: Path, cfg: dict[str, Any], lset: LearnerSet, oof: Votes, test: Votes, rows: list[_Row],
                ev: _Evaluation, results: dict[str, Any], covid: int, n_resamples: int = 2000) -> dict[str, Any] | None:
    """The source confound measured on **every** labelled image, each scored by models that never saw it.

    Test part: as shipped (mean of fold models; combiners trained on all out-of-fold votes). Out-of-fold
    part: the learners' out-of-fold votes; a trained combiner is *cross-fitted* — for the images of fold
    f it is trained (same settings, first seed) on the other folds' out-of-fold votes only. Reports the
    within-adult COVID-vs-rest AUC, adult non-COVID images called COVID (Wilson CI) and per-source /
    per-age metrics with cluster-bootstrap CIs, for FLANNEL (focal), soft voting and the best single
    learner; and what the shipped rows call the held-out train-only images (``external.npz``), e.g.
    JSRT adults without pneumonia. Writes ``OUT/all_images.md``; None when the vote files lack fold ids.
    """
    from .stats import EvalData, bootstrap_metrics, confound_report, plot_strata, score_groups, stratified_report

    if oof.folds is None or len(np.unique(oof.folds)) < 2:
        return None  # no fold ids recorded, or one fold only: nothing to cross-fit on
    keys = ["flannel_focal", "soft_voting", results["claims"]["best_single_key"]]
    by_key = {r.key: r for r in rows}
    y = np.concatenate([oof.y, test.y])
    patients = np.concatenate([oof.patients, test.patients])
    sources = np.concatenate([oof.sources, test.sources]).astype(str)
    ages = _ages(oof) + _ages(test)
    part = np.array(["out-of-fold"] * len(oof.y) + ["test"] * len(test.y))
    ext = _read_external(lset)
    report: dict[str, Any] = {"n_images": int(y.size), "n_out_of_fold": int(len(oof.y)), "n_test": int(len(test.y)),
                              "n_resamples": n_resamples, "models": {}}
    for key in dict.fromkeys(keys):
        row = by_key[key]
        if row.trainable:
            p_oof = np.zeros((len(oof.y), len(lset.classes)))
            for f in np.unique(oof.folds):
                rest = np.flatnonzero(oof.folds != f).tolist()
                tr, va = inner_validation(rest, oof.y, oof.patients, cfg["val_frac"], cfg["seed"])
                one = copy.copy(row)
                one.fits, one.seeds = [], []
                if "alpha" in one.fit:  # class weights from this fit's own training images only
                    one.fit = {**one.fit, "alpha": class_balanced_alpha(oof.y[tr], len(lset.classes))}
                _train(one, oof.P[tr], oof.y[tr], oof.P[va], oof.y[va], {**cfg, "seeds": 1}, torch.device("cpu"))
                held = oof.folds == f
                p_oof[held] = _predict(row, oof.P[held], one.fits[0], torch.device("cpu"))[0]
        else:
            p_oof = _predict(row, oof.P, None, torch.device("cpu"))[0]
        probs = np.concatenate([p_oof, ev.mean_proba[key]])
        d = EvalData(y=y, probs=probs, classes=tuple(lset.classes), clusters=patients)
        entry: dict[str, Any] = {
            "name": row.name,
            "overall": bootstrap_metrics(d, n_resamples, cfg["seed"]),
            "confound": confound_report(d, ages, n_resamples, cfg["seed"]),
            "adult_non_covid_called_covid": source_confound(probs.argmax(1), y, sources, covid)["adult_non_covid"],
            "strata": stratified_report(d, {"age_group": ages, "source": sources.tolist(), "part": part.tolist()},
                                        n_resamples, cfg["seed"]),
        }
        if ext is not None:
            ids_e, P_e = ext
            pe = _predict(row, P_e, row.fits[0] if row.trainable else None, torch.device("cpu"))[0].argmax(1)
            n_e = len(ids_e)
            entry["external"] = {"n": n_e, "predicted": {c: int((pe == j).sum()) for j, c in enumerate(lset.classes)},
                                 "called_covid_ci95": list(_wilson(int((pe == covid).sum()), n_e))}
        report["models"][key] = entry
        if key == "flannel_focal":  # the picture: accuracy per stratum, p_covid by age group × truth
            try:
                plot_strata({"positive": lset.classes[covid], "strata": entry["strata"],
                             "metrics": {"accuracy": entry["overall"]["accuracy"]}},
                            score_groups(d, ages), out / "all_images_strata.png")
            except ImportError:  # matplotlib missing: the tables stand alone
                pass
    write_json(out / "all_images.json", report)
    write_text(out / "all_images.md", _all_images_md(report, lset.classes[covid]))
    return report


def _all_images_md(rep: Mapping[str, Any], covid_name: str) -> str:
    def ci(m: Mapping[str, Any]) -> str:
        if m.get("note"):
            return str(m["note"])
        v, lo, hi = m["value"], m.get("ci_low", math.nan), m.get("ci_high", math.nan)
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{v:.3f}"

    lines = ["# Every labelled image, scored by models that never saw it", "",
             f"{rep['n_images']} images: {rep['n_out_of_fold']} out-of-fold (learners' out-of-fold votes; trained "
             f"combiners cross-fitted over the folds) + {rep['n_test']} test (as shipped). 95 % CIs: "
             f"{rep['n_resamples']} bootstrap resamples of patients; fractions: Wilson.", "",
             f"| model | macro-F1 | within-adult {covid_name}-vs-rest AUC | adult non-{covid_name} called {covid_name} | "
             f"p_{covid_name}: adult vs pediatric non-{covid_name} AUC | held-out train-only images called {covid_name} |",
             "|---|---|---|---|---|---|"]
    for m in rep["models"].values():
        a = m["adult_non_covid_called_covid"]
        e = m.get("external")
        ext = (f"{e['predicted'][covid_name]}/{e['n']} [{e['called_covid_ci95'][0]:.2f}, {e['called_covid_ci95'][1]:.2f}]; "
               f"normal {e['predicted'].get('normal', 0)}/{e['n']}" if e else "–")
        lines.append(f"| {m['name']} | {ci(m['overall']['macro_f1'])} | {ci(m['confound']['within_adults'])} | "
                     f"{a['predicted_covid']}/{a['n']} = {a['fraction']:.2f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}] | "
                     f"{ci(m['confound']['adult_vs_pediatric_negatives'])} | {ext} |")
    for m in rep["models"].values():
        lines += ["", f"## {m['name']}: per group", "", "| group | stratum | n | patients | macro-F1 | accuracy | "
                  f"mean p_{covid_name} |", "|---|---|---:|---:|---|---|---:|"]
        for g, srows in m["strata"].items():
            for r in srows:
                mp = next((v for k, v in r.items() if k.startswith("mean_p_")), float("nan"))
                lines.append(f"| {g} | {r['stratum']} | {r['n']} | {r['patients']} | {ci(r['metrics']['macro_f1'])} | "
                             f"{ci(r['metrics']['accuracy'])} | {mp:.3f} |")
    return "\n".join(lines) + "\n"


def _calibrate(out: Path, row: _Row, oof: Votes, test: Votes, va: list[int]) -> dict[str, Any]:
    """Temperature for the shipped FLANNEL (first seed) fitted on the ensemble-validation part of the
    out-of-fold votes (never on test); ECE/Brier on the test votes (mean of fold models) before and after."""
    from .calibrate import brier_score, ece_noise_floor, expected_calibration_error, fit_calibrator

    model = row.fits[0].model.cpu().eval()
    with torch.no_grad():
        z_va = combiner_logits(model, torch.as_tensor(oof.P[va][:, row.learners], dtype=torch.float32)).double()
        z_te = combiner_logits(model, torch.as_tensor(test.P.mean(1)[:, row.learners], dtype=torch.float32)).double()
    cal = fit_calibrator(z_va, oof.y[va], "temperature")
    raw = torch.softmax(z_te, 1).numpy()
    calibrated = torch.softmax(cal(z_te), 1).numpy()
    ece = expected_calibration_error(calibrated, test.y)
    summary = {**cal.to_dict(), "fitted_on": f"ensemble-validation part of the out-of-fold votes ({len(va)} images)",
               "test_ece_raw": expected_calibration_error(raw, test.y), "test_ece_calibrated": ece,
               # what a perfectly calibrated model with these confidences would show on this many images
               "test_ece_floor": ece_noise_floor(calibrated, seed=0, observed=ece),
               "test_brier_raw": brier_score(raw, test.y), "test_brier_calibrated": brier_score(calibrated, test.y),
               "test_mean_confidence_raw": float(raw.max(1).mean()),
               "test_mean_confidence_calibrated": float(calibrated.max(1).mean()),
               # the spread of the top-class probability (min, 10/25/50/75/90 %, max): does it use the range?
               "test_top_probability_quantiles_calibrated": np.quantile(calibrated.max(1), QUANTILES).tolist(),
               "test_top_probability_quantiles_raw": np.quantile(raw.max(1), QUANTILES).tolist(),
               "test_accuracy": float((raw.argmax(1) == test.y).mean()),
               # the temperature is fitted on one fold model's votes; predict feeds the mean of the fold models':
               # each fold model alone on the test part shows whether that mismatch is what is left
               "test_per_fold_model_calibrated": _per_fold_calibration(model, row, test, cal)}
    write_json(out / "calibration.json", summary)
    try:
        from .plots import plot_reliability_before_after

        plot_reliability_before_after(raw, calibrated, test.y, out / "reliability_test.png",
                                      f"Test part ({len(test.y)} images): temperature {cal.temperature:.3f}")
    except Exception as exc:  # noqa: BLE001 — a figure must never lose the numbers above
        logger.warning("reliability figure failed: %s", exc)
    return summary


def _per_fold_calibration(model: nn.Module, row: _Row, test: Votes, cal: Any) -> list[dict[str, float]]:
    """Accuracy, mean top-class probability and ECE of the calibrated FLANNEL fed one fold model's test votes."""
    from .calibrate import expected_calibration_error

    out = []
    for f in range(test.P.shape[1]):
        with torch.no_grad():
            z = combiner_logits(model, torch.as_tensor(test.P[:, f][:, row.learners], dtype=torch.float32)).double()
        p = torch.softmax(cal(z), 1).numpy()
        out.append({"fold_model": f, "accuracy": float((p.argmax(1) == test.y).mean()),
                    "mean_confidence": float(p.max(1).mean()), "ece": expected_calibration_error(p, test.y)})
    return out


def _weight_stats(ws: list[np.ndarray], names: list[str]) -> dict[str, Any]:
    w = np.concatenate(ws, axis=0)  # (evaluations·t, N)
    return {"n": int(w.shape[0]), "per_learner": {
        n: {"mean": float(w[:, i].mean()), "std": float(w[:, i].std()), "min": float(w[:, i].min()),
            "max": float(w[:, i].max()), "fraction_negative": float((w[:, i] < 0).mean())}
        for i, n in enumerate(names)}}


# --------------------------------------------------------------------------- the run


def run_ensemble(
    cfg: Mapping[str, Any] | None,
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    track: Track | None = None,
) -> dict[str, Any]:
    """Train FLANNEL and its baselines on out-of-fold votes; evaluate on test votes; write the report.

    Args:
        cfg: hyper-parameters (missing keys from :data:`DEFAULTS`).
        run_dirs: ``train-patch`` run folders holding ``<learner>/oof.npz`` and ``test.npz``.
        out_dir: output folder (see the module docstring); files are overwritten atomically.
        track: ``track(iterable, description, total)`` progress wrapper, e.g. the CLI's.

    Returns:
        The content of ``results.json``.
    """
    cfg = resolve_config(cfg)
    track = track or _no_track
    device = torch.device(device)
    out = Path(out_dir)
    cfg["runs"] = [str(Path(r).resolve()) for r in run_dirs]
    lset, oof, test = load_votes(run_dirs, cfg["learners"], cfg["distribution"])
    lowered = [c.lower() for c in lset.classes]
    if POSITIVE not in lowered:
        raise DataError(f"the vote files' classes {lset.classes} have no {POSITIVE!r} class")
    covid = lowered.index(POSITIVE)
    if not lset.indices(global_=False):
        raise DataError(f"no patch learners among {lset.names}: FLANNEL needs at least one")
    warnings: list[str] = []
    shared = set(oof.patients.tolist()) & set(test.patients.tolist())
    if shared:
        warnings.append(f"{len(shared)} patients have images in both the out-of-fold and the test set "
                        f"(e.g. {min(shared)!r}): the test set is not patient-disjoint")
        logger.warning("%s", warnings[-1])
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))

    # ---- ensemble-train / validation split of the OOF images, grouped by patient
    tr, va = inner_validation(list(range(len(oof.ids))), oof.y, oof.patients, cfg["val_frac"], cfg["seed"])
    check_grouped({"test": va, "folds": [tr]}, oof.patients)
    write_json(out / "split.json", {"grouped_by": "patient_id", "seed": cfg["seed"], "val_frac": cfg["val_frac"],
                                    "train": oof.ids[tr].tolist(), "val": oof.ids[va].tolist()})
    alpha = class_balanced_alpha(oof.y[tr], len(lset.classes))
    rows = _rows(lset, cfg, alpha)

    # ---- phase 1: train every combiner on out-of-fold votes only
    trainable = [r for r in rows if r.trainable]
    for row in track(trainable, "ensemble: training combiners", len(trainable)):
        _train(row, oof.P[tr], oof.y[tr], oof.P[va], oof.y[va], cfg, device)

    # ---- phase 2: evaluate on the test votes (fold model f × seed)
    ev = _Evaluation()
    for row in track(rows, "ensemble: evaluating on test", len(rows)):
        ev.rows.append(_evaluate_row(row, lset, oof, test, device, ev))

    results = _results(cfg, lset, oof, test, tr, va, alpha, rows, ev, covid, warnings)
    results["calibration"] = _calibrate(out, next(r for r in rows if r.key == "flannel_focal"), oof, test, va)
    results["shipped_configuration"] = _shipped_ci(out, results, ev, test, lset.classes, cfg["seed"])
    _write_outputs(out, results, lset, test, rows, ev)
    try:  # an extra report: its failure must not cost the run's main outputs
        results["all_images"] = _all_images(out, cfg, lset, oof, test, rows, ev, results, covid)
    except (DataError, ValueError) as exc:
        results["all_images"] = None
        results["warnings"].append(f"all-images report skipped: {exc}")
        logger.warning("%s", results["warnings"][-1])
    write_json(out / "results.json", results)
    f1 = {r["key"]: r["summary"]["macro_f1"] for r in results["rows"]}
    logger.info("ensemble: FLANNEL (focal) macro-F1 %.3f ± %.3f (best single %s %.3f, soft voting %.3f); wrote %s",
                f1["flannel_focal"]["mean"], f1["flannel_focal"]["std"], results["claims"]["best_single_learner"],
                f1[results["claims"]["best_single_key"]]["mean"], f1["soft_voting"]["mean"], out)
    return results


@dataclass
class _Evaluation:
    """Test-set outputs collected while evaluating the rows."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    mean_proba: dict[str, np.ndarray] = field(default_factory=dict)  # row key → (t,M), mean of fold models, 1st seed
    flannel_ws: list[np.ndarray] = field(default_factory=list)  # FLANNEL (focal) (t,N) per seed × fold model
    flannel_w_mean: np.ndarray | None = None  # (t,N) on the mean of fold models, first seed


def _evaluate_row(row: _Row, lset: LearnerSet, oof: Votes, test: Votes, device: torch.device,
                  ev: _Evaluation) -> dict[str, Any]:
    """Reports of one row on every fold model's test votes × seed, and on their mean."""
    classes = lset.classes
    fits: list[FitResult | None] = list(row.fits) if row.trainable else [None]
    seeds: list[int | None] = list(row.seeds) if row.trainable else [None]
    P_mean = test.P.mean(axis=1)  # (t,N,M)
    evals, mean_reports = [], []
    for fit, seed in zip(fits, seeds, strict=True):
        for f in range(test.P.shape[1]):
            proba, w = _predict(row, test.P[:, f], fit, device)
            evals.append({"fold_model": f, "seed": seed,
                          "report": classification_report_dict(test.y, proba, classes, positive=POSITIVE)})
            if row.key == "flannel_focal" and w is not None:
                ev.flannel_ws.append(w)
        proba, w = _predict(row, P_mean, fit, device)
        mean_reports.append({"seed": seed,
                             "report": classification_report_dict(test.y, proba, classes, positive=POSITIVE)})
        if seed == seeds[0]:
            ev.mean_proba[row.key] = proba
            if row.key == "flannel_focal":
                ev.flannel_w_mean = w
    entry: dict[str, Any] = {
        "name": row.name, "key": row.key, "learners": [lset.names[i] for i in row.learners],
        "trainable": row.trainable, "group": "global" if _is_global(lset.names[row.learners[0]]) else "patch",
        "n_evaluations": len(evals),
        "summary": summarise([e["report"] for e in evals]),
        "evaluations": evals,
        "test_mean_of_fold_models": {"summary": summarise([r["report"] for r in mean_reports]),
                                     "reports": mean_reports},
    }
    if row.trainable:
        entry["fit"] = [{"seed": s, "best_epoch": r.best_epoch, "best_val_macro_f1": r.best_val_macro_f1,
                         "best_val_loss": r.best_val_loss, "stopped_early": r.stopped_early,
                         "epochs_run": len(r.history.get("epoch", [])),
                         "class_weights": None if r.class_weights is None else r.class_weights.tolist()}
                        for s, r in zip(row.seeds, row.fits, strict=True)]
    else:
        # For choosing the best single learner without looking at the test set.
        oof_proba, _ = _predict(row, oof.P, None, device)
        entry["oof_macro_f1"] = classification_report_dict(oof.y, oof_proba, classes, positive=None)["macro_f1"]
    return entry


def _results(cfg: dict[str, Any], lset: LearnerSet, oof: Votes, test: Votes, tr: list[int], va: list[int],
             alpha: Tensor, rows: list[_Row], ev: _Evaluation, covid: int, warnings: list[str]) -> dict[str, Any]:
    """Everything that goes into results.json."""
    classes, covid_name, n_folds = lset.classes, lset.classes[covid], test.P.shape[1]
    by_key = {r["key"]: r for r in ev.rows}
    groups = ("patch", "global") if cfg["inputs"] == "all" else ("patch",)
    singles = [r for r in ev.rows if not r["trainable"] and r["group"] in groups and len(r["learners"]) == 1
               and r["key"] not in ("soft_voting", "hard_voting")]
    best = max(singles, key=lambda r: r["oof_macro_f1"])
    best_test = max(singles, key=lambda r: r["summary"]["macro_f1"]["mean"])
    fl = by_key["flannel_focal"]
    metrics = ("macro_f1", f"per_class.{covid_name}.f1")
    others = {f"(a) best single {'' if cfg['inputs'] == 'all' else 'patch '}learner `{best['name']}`": best, "(b) soft voting": by_key["soft_voting"],
              "(c) FLANNEL (CE)": by_key["flannel_ce"]}
    claims = {"best_single_learner": best["name"], "best_single_key": best["key"],
              "best_single_selected_on": "out-of-fold macro-F1",
              "best_single_on_test_context_only": best_test["name"],
              "comparisons": {label: [_compare(fl, other, k, n_folds) for k in metrics]
                              for label, other in others.items()}}

    adult_oof = np.array([bool(s.strip()) and not _is_pediatric(s) for s in oof.sources])
    covid_oof = oof.y == covid
    confound = {
        "definition": "adult = non-empty source not containing 'kaggle' or 'pediatric'; non-COVID = label != covid; "
                      "predictions from the mean over fold models (FLANNEL: its first seed, the saved model)",
        "min_n_to_conclude": MIN_CONFOUND_N,
        "training_data": {"adult_images": int(adult_oof.sum()),
                          "adult_covid_fraction": float(covid_oof[adult_oof].mean()) if adult_oof.any() else math.nan,
                          "covid_adult_fraction": float(adult_oof[covid_oof].mean()) if covid_oof.any() else math.nan},
        "models": {r["name"]: source_confound(ev.mean_proba[r["key"]].argmax(1), test.y, test.sources, covid)
                   for r in (fl, best)},
    }
    fl_seeds = next(r for r in rows if r.key == "flannel_focal").seeds
    patch_names = [lset.names[i] for i in lset.indices(global_=False)]
    combined = [lset.names[i] for i in lset.combined(cfg["inputs"])]
    per_seed = {str(s): np.concatenate(ev.flannel_ws[i * n_folds:(i + 1) * n_folds]).mean(axis=0).tolist()
                for i, s in enumerate(fl_seeds)}
    return {
        "config": cfg,
        "classes": classes,
        "positive": covid_name,
        "learners": lset.names,
        "patch_learners": patch_names,
        "global_learners": [lset.names[i] for i in lset.indices(global_=True)],
        "combined_learners": combined,
        "learner_folders": {n: str(p) for n, p in lset.folders.items()},
        "k": lset.k,
        "distribution": lset.distribution,
        "n_fold_models": n_folds,
        "n_images": {"oof": len(oof.ids), "ensemble_train": len(tr), "ensemble_val": len(va), "test": len(test.ids),
                     "oof_per_class": {c: int((oof.y == i).sum()) for i, c in enumerate(classes)},
                     "test_per_class": {c: int((test.y == i).sum()) for i, c in enumerate(classes)}},
        "alpha": alpha.tolist(),
        "row_order": [r["name"] for r in ev.rows],
        "rows": ev.rows,
        "flannel_weights": {**_weight_stats(ev.flannel_ws, combined), "per_seed_mean": per_seed},
        "claims": claims,
        "source_confound": confound,
        "warnings": warnings,
    }


def _write_outputs(out: Path, results: dict[str, Any], lset: LearnerSet, test: Votes, rows: list[_Row],
                   ev: _Evaluation) -> None:
    """table.md, results.json/csv, claims.md, predictions_test.npz, flannel.safetensors/json, plots."""
    cfg, classes, covid_name = results["config"], results["classes"], results["positive"]
    n_folds = results["n_fold_models"]
    by_key = {r["key"]: r for r in results["rows"]}
    fl, best = by_key["flannel_focal"], by_key[results["claims"]["best_single_key"]]
    best_test = next(r for r in ev.rows if r["name"] == results["claims"]["best_single_on_test_context_only"])
    fl_row = next(r for r in rows if r.key == "flannel_focal")
    patch_names = results["combined_learners"]

    table = format_table({r["name"]: r["summary"] for r in ev.rows}, classes, positive=covid_name)
    caption = (f"\nHeld-out test set ({len(test.ids)} images): mean (std) over {n_folds} fold models × "
               f"{cfg['seeds']} seeds for trained rows, over {n_folds} fold models otherwise. Learners: "
               f"{', '.join(lset.names)}; {lset.distribution} distributions; K = "
               f"{', '.join(f'{n}: {k}' for n, k in lset.k.items())} patches per image.\n")
    write_text(out / "table.md", table + caption)
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", [{"model": r["name"], "key": r["key"], "metric": k, "mean": v["mean"],
                                     "std": v["std"], "n": v["n"]}
                                    for r in ev.rows for k, v in r["summary"].items()])
    write_text(out / "claims.md", _claims_md(results, fl["name"], best["name"], best_test["name"], covid_name))
    write_npz(out / "predictions_test.npz", ids=test.ids, y=test.y, sources=test.sources,
               classes=np.array(classes), learners=np.array(lset.names), P_mean_of_fold_models=test.P.mean(axis=1),
               row_keys=np.array([r["key"] for r in ev.rows]), row_names=np.array([r["name"] for r in ev.rows]),
               flannel_focal_weights=ev.flannel_w_mean if ev.flannel_w_mean is not None else np.zeros((0,)),
               flannel_learners=np.array(patch_names),
               **{f"proba_{k}": v for k, v in ev.mean_proba.items()})

    ks = sorted({lset.k[n] for n in results["patch_learners"]})  # whole-image learners vote once (k=1)
    sidecar = {
        "learners": patch_names, "classes": classes, "distribution": lset.distribution,
        "k": ks[0] if len(ks) == 1 else {n: lset.k[n] for n in patch_names},
        "n_learners": len(patch_names), "n_classes": len(classes), "hidden": cfg["hidden"], "gamma": cfg["gamma"],
        "alpha": results["alpha"], "source_runs": cfg["runs"], "seed": fl_row.seeds[0],
        "best_epoch": fl_row.fits[0].best_epoch, "val_macro_f1": fl_row.fits[0].best_val_macro_f1,
        "test_macro_f1": fl["summary"]["macro_f1"],
        "test_macro_f1_this_model_mean_of_fold_models":
            fl["test_mean_of_fold_models"]["reports"][0]["report"]["macro_f1"],
        "input": "P: (B, n_learners, n_classes) per-learner class distributions, learners in the order above; "
                 "output softmax(z) with (z, w) = model(P)",
        "training_data": {k: results["n_images"][k] for k in ("oof", "ensemble_train", "ensemble_val")},
    }
    save_combiner(fl_row.fits[0].model, out / "flannel", "flannel", {"hidden": cfg["hidden"]}, sidecar)
    _plots(out, results, ev.mean_proba, test.y, classes, covid_name, best, ev.flannel_w_mean, patch_names, fl_row)


def _plots(out: Path, results: dict[str, Any], mean_proba: dict[str, np.ndarray], y: np.ndarray,
           classes: list[str], covid_name: str, best: dict[str, Any], w: np.ndarray | None,
           patch_names: list[str], fl_row: _Row) -> None:
    from .plots import plot_confusion, plot_roc_pr, plot_training_history, plot_weight_distribution

    by_key = {r["key"]: r for r in results["rows"]}
    fl = by_key["flannel_focal"]

    def cm(key: str) -> np.ndarray:
        return np.array(by_key[key]["test_mean_of_fold_models"]["reports"][0]["report"]["confusion_matrix"])

    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("confusion_flannel_focal.png", lambda: plot_confusion(
            cm("flannel_focal"), classes, out / "confusion_flannel_focal.png",
            title=f"{fl['name']}: test (mean of fold models, seed {fl_row.seeds[0]})")),
        ("confusion_best_single.png", lambda: plot_confusion(
            cm(best["key"]), classes, out / "confusion_best_single.png",
            title=f"best single learner {best['name']}: test (mean of fold models)")),
        ("roc_pr_covid.png", lambda: plot_roc_pr(
            y, {fl["name"]: mean_proba["flannel_focal"], "soft voting": mean_proba["soft_voting"],
                best["name"]: mean_proba[best["key"]], "FLANNEL (CE)": mean_proba["flannel_ce"]},
            classes, covid_name, out / "roc_pr_covid.png", title="test set, mean of fold models")),
        ("history_flannel_focal.png", lambda: plot_training_history(
            fl_row.fits[0].history, out / "history_flannel_focal.png", best_epoch=fl_row.fits[0].best_epoch,
            title=f"{fl['name']}, seed {fl_row.seeds[0]}")),
    ]
    if w is not None:
        jobs.append(("weights_flannel_focal.png", lambda: plot_weight_distribution(
            w, patch_names, out / "weights_flannel_focal.png", title="FLANNEL (focal) weights, test")))
    for name, job in jobs:
        try:
            job()
        except Exception as exc:  # noqa: BLE001 — a figure must never lose the numbers already written
            logger.warning("plot %s failed: %s", name, exc)


# --------------------------------------------------------------------------- loading


def load_flannel(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The FLANNEL module an ensemble run saved in ``OUT/flannel`` (eval mode) and its config.

    Use it as ``z, w = model(P)`` with ``P: (B, n_learners, n_classes)`` float32 in the
    config's learner order; the prediction is ``softmax(z)``.
    """
    return load_combiner(path, device)


# --------------------------------------------------------------------------- shipping


def _measured_figures(src: Path, members: str = "folds") -> dict[str, str]:
    """One-line summaries of what ``ensemble`` measured for the exported FLANNEL (read from its
    ``results.json`` / ``all_images.json``), for the classifier's config and model card.

    ``ensemble`` scores the test part with the mean of the fold models: for ``members="refit"``
    those test lines do not describe the exported models and are replaced by a pointer to how
    to measure them; the out-of-fold line (fold models by construction) is labelled as such."""
    import json

    def ci(m: Mapping[str, Any]) -> str:
        return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

    out: dict[str, str] = {}
    try:
        res = json.loads((src / "results.json").read_text(encoding="utf-8"))
        row = res["shipped_configuration"]["rows"]["flannel_focal"]
        out[f"Held-out test part ({res['n_images']['test']} images), as shipped"] = (
            f"macro-F1 {ci(row['macro_f1'])}, accuracy {ci(row['accuracy'])} (`ensemble`'s table_shipped.md)")
        cal = res.get("calibration") or {}
        if "test_ece_raw" in cal:
            out["Calibration (test)"] = (f"ECE {cal['test_ece_raw']:.3f} raw → {cal['test_ece_calibrated']:.3f} "
                                         f"with the temperature {cal['temperature']:.3f}")
            if "test_ece_floor" in cal:
                fl = cal["test_ece_floor"]
                out["Calibration (test)"] += (f"; a perfectly calibrated model would show {fl['median']:.3f} "
                                              f"[{fl['low']:.3f}, {fl['high']:.3f}] on these {fl['n_images']} images")
            pf = cal.get("test_per_fold_model_calibrated") or []
            if pf:
                out["Calibration (test)"] += (
                    f"; confidence {cal['test_mean_confidence_calibrated']:.3f} vs accuracy {cal['test_accuracy']:.3f} "
                    "(one fold model alone: " + ", ".join(f"{r['mean_confidence']:.3f} vs {r['accuracy']:.3f}" for r in pf)
                    + ")")
        every = (res.get("all_images") or {}).get("models", {}).get("flannel_focal")
        if every:
            a, text = every["adult_non_covid_called_covid"], [f"macro-F1 {ci(every['overall']['macro_f1'])}"]
            if np.isfinite(every["confound"]["within_adults"].get("value", math.nan)):
                text.append(f"within-adult COVID-vs-rest AUC {ci(every['confound']['within_adults'])}")
            text.append(f"adult non-COVID called COVID {a['predicted_covid']}/{a['n']}")
            if every.get("external"):
                e = every["external"]
                text.append(f"held-out train-only images called normal {e['predicted'].get('normal', 0)}/{e['n']}")
            out[f"All {res['all_images']['n_images']} labelled images out of fold"] = "; ".join(text) + " (all_images.md)"
    except (OSError, ValueError, KeyError, TypeError):
        pass  # an older ensemble folder: export without the summary
    if members == "refit":
        for key in [k for k in out if k.startswith("Held-out test part") or k == "Calibration (test)"]:
            del out[key]
        for key in [k for k in out if k.endswith("out of fold")]:
            out[key] += "; scored by the fold models (a refit model has no out-of-fold images)"
        out["Held-out test part, refit members"] = ("not scored by `ensemble` (its test figures are the fold models'); "
                                                    "measure the exported folder with `predict` + `evaluate`")
    return out


def _shown_path(path: str | os.PathLike[str]) -> str:
    """A path as a shipped config records it: relative to the working directory when inside it
    (no machine-specific prefix in committed files), absolute otherwise."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(p)


def _has_refit_votes(folder: Path) -> bool:
    """Whether a learner folder holds a finished refit model's test votes (``train.refit=true`` writes them last)."""
    try:
        with np.load(folder / "test.npz", allow_pickle=False) as z:
            return "soft_refit" in z.files
    except Exception:  # noqa: BLE001 — missing, truncated or not a zip (OSError, EOFError, BadZipFile, …): no refit
        return False


def _has_refit_model(folder: Path) -> bool:
    """A finished refit model: its votes in ``test.npz`` and its weights in ``refit/best``."""
    from .hub import WEIGHTS_NAME

    return _has_refit_votes(folder) and (folder / "refit" / "best" / WEIGHTS_NAME).is_file()


def export_classifier(ensemble_dir: str | os.PathLike[str], dest: str | os.PathLike[str], members: str = "auto",
                      half: bool = True) -> Path:
    """Build the :class:`~patchflannel.pipeline.Classifier` an ensemble run describes and save it to ``dest``.

    ``members="folds"``: each learner's fold models (``RUN/<learner>/fold<f>/best``, every fold the
    learner's ``test.npz`` lists; a missing one is an error, nothing is globbed) — FLANNEL then sees
    the mean of the fold models, as in the ensemble report's "mean of fold models" evaluation.
    ``members="refit"``: the one model refit on every non-test image (``RUN/<learner>/refit/best``).
    ``members="auto"`` (the default): ``refit`` when every learner has a finished refit model (its votes
    and its weights; what the shipped classifier uses since v0.5: the out-of-fold temperature describes
    one model per image), else ``folds``; the choice is recorded in the folder's ``config.json`` (``training.members``).
    The destination is replaced whole (no file of an earlier export remains).
    """
    from ._files import check_name, file_sha256
    from .calibrate import Calibrator
    from .hub import WEIGHTS_NAME, resolve_weights
    from .learners import Learner
    from .pipeline import Classifier
    from .segment import LungSegmenter

    if members not in ("auto", "folds", "refit"):
        raise ConfigError(f"members must be 'auto', 'folds' or 'refit', got {members!r}")
    src = Path(ensemble_dir)
    if not (src / "flannel" / "config.json").is_file() or not (src / "config.yaml").is_file():
        raise DataError(f"{src}: not an ensemble output folder (needs config.yaml and flannel/ written by "
                        "`patchflannel ensemble`)")
    try:
        cfg = yaml.safe_load((src / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{src}: not an ensemble output folder (config.yaml: {exc})") from None
    combiner, ccfg = load_combiner(src / "flannel")
    names = [str(n) for n in ccfg["learners"]]
    for name in names:
        # Learner names become folder names of the Classifier: refuse '../x', 'run/x' before loading anything.
        try:
            check_name(name, "learner name")
        except ValueError as exc:
            raise DataError(f"{src / 'flannel'}: {exc}; a learner found in several runs is named '<run>/<learner>' "
                            "and cannot be exported: give the learner folders distinct names") from None
    available = find_learners(cfg["runs"])
    if members == "auto":
        members = "refit" if all(name in available and _has_refit_model(available[name]) for name in names) else "folds"
    learners: dict[str, list[Learner]] = {}
    run_cfg: dict[str, Any] = {}
    for name in names:
        folder = available.get(name)
        if folder is None:
            raise DataError(f"learner {name} of {src / 'flannel'} is not in the runs {cfg['runs']}")
        run_cfg = yaml.safe_load((folder.parent / "config.yaml").read_text(encoding="utf-8")) or {}
        if members == "refit":
            if not _has_refit_votes(folder):
                # a refit/ folder without refit votes is not a finished refit of this run
                raise DataError(f"{folder}: no finished refit model (test.npz has no refit votes; train-patch with "
                                "train.refit=true writes them)")
            dirs = [("refit", folder / "refit" / "best")]
        else:
            try:
                with np.load(folder / "test.npz", allow_pickle=False) as z:
                    folds = [int(f) for f in z["fold_ids"]] if "fold_ids" in z.files else list(range(z["soft"].shape[1]))
            except Exception as exc:  # noqa: BLE001 — missing or unreadable votes: a user error, not a traceback
                raise DataError(f"{folder / 'test.npz'}: cannot read the learner's test votes ({exc}); rerun "
                                "train-patch on that run") from None
            dirs = [(f"fold{f}", folder / f"fold{f}" / "best") for f in folds]
        learners[name] = []
        for member, d in dirs:
            if not (d / WEIGHTS_NAME).is_file():
                raise DataError(f"{d}: model {member} of learner {name} is missing"
                                + (" (train-patch with train.refit=true writes it)" if members == "refit" else ""))
            m = Learner.from_pretrained(d)
            m.info["member"] = member
            learners[name].append(m)
    seg_ref = str((run_cfg.get("data") or {}).get("segmenter", "lung_unet_jsrt"))
    seg_path = resolve_weights(seg_ref, option="data.segmenter in the train-patch config")
    seg_file = seg_path / WEIGHTS_NAME if seg_path.is_dir() else seg_path.with_suffix(".safetensors")
    segmenter = LungSegmenter.from_pretrained(seg_path)
    k = ccfg.get("k", 100)
    config = {"classes": list(ccfg["classes"]), "learners": names, "distribution": ccfg.get("distribution", "soft"),
              "combiner": "flannel", "combiner_options": {"hidden": ccfg.get("options", {}).get("hidden")},
              "segmenter": {"name": seg_ref, "convention": "scr", "sha256": file_sha256(seg_file)},
              "defaults": {"k": int(k) if isinstance(k, int) else 100},
              "training": {"ensemble_dir": _shown_path(src), "runs": [_shown_path(r) for r in cfg["runs"]],
                           "members": members,
                           "combiner": {key: ccfg.get(key) for key in ("gamma", "alpha", "seed", "best_epoch", "val_macro_f1",
                                                                        # test_macro_f1: scored with the fold models
                                                                        *(("test_macro_f1",) if members == "folds" else ()),
                                                                        "training_data")}}}
    measured = _measured_figures(src, members)
    if measured:
        config["training"]["results"] = measured
    calib = Calibrator.from_dict(None)
    if (src / "calibration.json").exists():
        import json

        calib = Calibrator.from_dict(json.loads((src / "calibration.json").read_text()))
    clf = Classifier(segmenter, learners, combiner, calib, config)
    return clf.save_pretrained(dest, half=half)
