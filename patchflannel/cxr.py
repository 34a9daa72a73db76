"""Labelled chest radiographs for the 4-class task, from the layouts users have,
and their HDF5 cache at 1024² with lung masks from the segmenter.

Sources understood by :func:`load_records`:

* this project's ``metadata.csv`` (``image_id, file, label, patient_id, …``)
* the Kaggle "Chest X-Ray Images (Pneumonia)" folders: ``…/NORMAL/*.jpeg`` and
  ``…/PNEUMONIA/*bacteria*.jpeg`` / ``*virus*.jpeg`` (any ``train/test/val``
  nesting); patient id from the file name (``person1008_…`` → ``person1008``)
* the ieee8023 covid-chestxray-dataset ``metadata.csv`` (``patientid, finding,
  view, folder, filename``); PA/AP views only; findings mapped to the classes
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CLASSES = ("normal", "bacteria", "virus", "covid")


@dataclass
class Record:
    image_id: str
    file: Path
    label: str
    patient_id: str
    source: str = ""


class DataError(ValueError):
    """A data source is missing or malformed; the message says which and why."""


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from exc


def _project_csv(path: Path, rows: list[dict[str, str]]) -> list[Record]:
    out = []
    for i, r in enumerate(rows):
        label = r["label"].strip().lower()
        if label not in CLASSES:
            raise DataError(f"{path}, row {i + 2}: unknown label {label!r} (expected one of {', '.join(CLASSES)})")
        out.append(Record(r["image_id"], path.parent / r["file"], label, r["patient_id"], r.get("source", "")))
    return out


_IEEE_BACTERIA = ("bacterial", "streptococcus", "klebsiella", "legionella", "mycoplasma", "staphylococcus", "e.coli",
                  "chlamydophila", "nocardia", "pneumocystis", "aspergillosis", "tuberculosis")
_IEEE_VIRUS = ("viral", "sars", "mers", "influenza", "varicella", "herpes", "h1n1")


def ieee_label(finding: str) -> str | None:
    """Map an ieee8023 ``finding`` to a class (``None`` = not one of ours)."""
    f = finding.lower()
    if "covid" in f:
        return "covid"
    if "no finding" in f or f.strip() == "normal":
        return "normal"
    if any(k in f for k in _IEEE_BACTERIA):
        return "bacteria"
    if any(k in f for k in _IEEE_VIRUS):
        return "virus"
    return None


def _ieee_csv(path: Path, rows: list[dict[str, str]]) -> list[Record]:
    out = []
    for r in rows:
        if r.get("view", "").strip().upper() not in ("PA", "AP", "AP SUPINE", "AP ERECT"):
            continue
        label = ieee_label(r.get("finding", ""))
        if label is None:
            continue
        folder = r.get("folder") or "images"
        f = path.parent / folder / r["filename"]
        out.append(Record(f"ccx-{Path(r['filename']).stem}", f, label, f"ccx-{r['patientid']}", "ieee8023"))
    return out


_KAGGLE_PATIENT = re.compile(r"^(person\d+|(?:NORMAL\d?-)?IM-\d+)", re.IGNORECASE)


def _kaggle(root: Path) -> list[Record]:
    out = []
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() not in (".jpeg", ".jpg", ".png") or f.name.startswith("."):
            continue
        parent = f.parent.name.upper()
        if parent == "NORMAL":
            label = "normal"
        elif parent == "PNEUMONIA":
            name = f.name.lower()
            label = "bacteria" if "bacteria" in name else "virus" if "virus" in name else None
            if label is None:
                continue
        else:
            continue
        m = _KAGGLE_PATIENT.match(f.stem)
        pid = m.group(1) if m else f.stem
        out.append(Record(f"kcx-{f.stem}", f, label, f"kcx-{pid}", "kaggle-chest-xray-pneumonia"))
    return out


def load_records(sources: Sequence[str | os.PathLike]) -> list[Record]:
    """Records from one or more sources (CSV files or folders; see module doc)."""
    records: list[Record] = []
    for src in sources:
        p = Path(src)
        if p.is_dir() and (p / "metadata.csv").exists():
            p = p / "metadata.csv"
        if p.is_file():
            rows = _read_csv(p)
            cols = set(rows[0]) if rows else set()
            if {"image_id", "file", "label", "patient_id"} <= cols:
                records += _project_csv(p, rows)
            elif {"patientid", "finding", "filename"} <= cols:
                records += _ieee_csv(p, rows)
            else:
                raise DataError(f"{p}: unrecognised metadata columns {sorted(cols)[:8]}…")
        elif p.is_dir():
            found = _kaggle(p)
            if not found:
                raise DataError(f"{p}: no metadata.csv and no Kaggle NORMAL/PNEUMONIA folders found")
            records += found
        else:
            raise DataError(f"data source {p} not found")
    ids = Counter(r.image_id for r in records)
    dup = [k for k, v in ids.items() if v > 1]
    if dup:
        raise DataError(f"duplicate image ids across sources, e.g. {dup[0]}")
    log.info("%d labelled images: %s", len(records), dict(Counter(r.label for r in records)))
    return records


def build_cache(records: Sequence[Record], segmenter: Any, path: str | os.PathLike, batch_size: int = 8,
                track: Callable[[Iterable[Any], str, int | None], Iterable[Any]] | None = None) -> tuple[Path, list[str]]:
    """Read, resize to 1024² (aspect not kept, as in the reference method) and
    segment every record; write them to an HDF5 store.

    Returns the store path and the list of error messages for unreadable
    files (those images are left out, never silently).
    """
    from .io import ImageReadError, read_image, resize
    from .segment import WORK_SIZE, postprocess
    from .store import StoreWriter

    errors: list[str] = []
    starts = range(0, len(records), batch_size)
    it = track(starts, "caching + segmenting", len(starts)) if track else starts
    with StoreWriter(path, provenance={"segmenter": segmenter.config.get("encoder"), "classes": list(CLASSES),
                                       "resize": "1024x1024, aspect not kept"}) as w:
        for s in it:
            batch = records[s:s + batch_size]
            imgs, ok = [], []
            for r in batch:
                try:
                    im = read_image(r.file)
                except ImageReadError as exc:
                    errors.append(str(exc))
                    log.warning("skipped: %s", exc)
                    continue
                imgs.append((resize(im, WORK_SIZE, "area"), im.shape))
                ok.append(r)
            if not imgs:
                continue
            probs = segmenter.predict_prob([i for i, _ in imgs])
            for r, (im, shape), p in zip(ok, imgs, probs):
                mask = postprocess(p, segmenter.threshold)
                meta = {k: str(v) for k, v in asdict(r).items()}
                meta.update(orig_height=shape[0], orig_width=shape[1], lung_fraction=float(mask.mean()))
                w.add(r.image_id, im, mask, meta)
    return Path(path), errors


@dataclass
class CxrData:
    """A cached dataset in memory: ``images``/``masks`` ``(N,1,1024,1024)`` uint8/bool tensors."""

    ids: list[str]
    labels: np.ndarray  # (N,) int64 index into CLASSES
    patients: list[str]
    sources: list[str]
    images: Any
    masks: Any

    @classmethod
    def from_store(cls, path: str | os.PathLike) -> "CxrData":
        import torch

        from .store import Store

        with Store(path) as s:
            n = len(s)
            images = torch.from_numpy(s.h5["images"][()]).unsqueeze(1)
            masks = torch.from_numpy(s.h5["masks"][()].astype(bool)).unsqueeze(1)
            labels = np.array([CLASSES.index(m["label"]) for m in s.meta], dtype=np.int64)
            patients = [m["patient_id"] for m in s.meta]
            sources = [m.get("source", "") for m in s.meta]
            ids = list(s.ids)
        empty = [ids[i] for i in range(n) if not bool(masks[i].any())]
        if empty:
            log.warning("%d images have an empty lung mask; their patches fall back to the whole image (e.g. %s)",
                        len(empty), empty[0])
        return cls(ids, labels, patients, sources, images, masks)


def make_splits(labels: np.ndarray, groups: Sequence[str], seed: int, test_frac: float, n_folds: int) -> dict[str, Any]:
    """Held-out test part + stratified k folds on the rest, all grouped by patient.

    Returns ``{"test": [idx…], "folds": [[idx…] × n_folds]}`` (indices into the data).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    idx = np.arange(len(labels))
    groups = np.asarray(groups)
    n_test_splits = max(2, int(round(1 / test_frac)))
    outer = StratifiedGroupKFold(n_splits=n_test_splits, shuffle=True, random_state=seed)
    rest, test = next(iter(outer.split(idx, labels, groups)))
    inner = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed + 1)
    folds = [rest[v].tolist() for _, v in inner.split(rest, labels[rest], groups[rest])]
    split = {"test": sorted(test.tolist()), "folds": [sorted(f) for f in folds]}
    check_grouped(split, groups)
    return split


def inner_validation(train_idx: Sequence[int], labels: np.ndarray, groups: Sequence[str], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Carve a patient-grouped, stratified validation part out of a training part."""
    from sklearn.model_selection import StratifiedGroupKFold

    train_idx = np.asarray(train_idx)
    g = np.asarray(groups)[train_idx]
    k = max(2, int(round(1 / frac)))
    tr, va = next(iter(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(train_idx, labels[train_idx], g)))
    return sorted(train_idx[tr].tolist()), sorted(train_idx[va].tolist())


def check_grouped(split: dict[str, Any], groups: Sequence[str]) -> None:
    """Raise if any patient appears in two parts of a split."""
    parts = [split["test"], *split["folds"]]
    seen: dict[str, int] = {}
    for p, idx in enumerate(parts):
        for i in idx:
            g = groups[i]
            if seen.setdefault(g, p) != p:
                raise AssertionError(f"patient {g} appears in two parts of the split")
