"""Datasets for training and evaluation: where the files are, how they are split.

* :func:`discover_jsrt` — JSRT radiographs with SCR left/right lung masks
  (this project's PNG layout or the original ``.IMG`` + ``.gif`` distribution);
  the ``scr`` mask convention.
* :func:`discover_v7` — the V7 Labs lung annotations of adult COVID-19
  radiographs (``images/``, ``masks/``, ``metadata.csv`` with ``patient_id``);
  the ``full`` convention.
* :func:`load_records` — labelled radiographs for the 4-class task: this
  project's ``metadata.csv``, the Kaggle pneumonia folders, the ieee8023
  ``metadata.csv``; the label mapping of ``finding`` is :data:`FINDING_MAP`.
* splits grouped by patient: :func:`split_ids` (one image per patient, JSRT),
  :func:`group_split` (V7), :func:`make_splits` (held-out test + stratified
  grouped folds), :func:`inner_validation`, :func:`check_grouped`.

Training-side module: inference code never imports it.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .io import read_image, read_mask, resize

log = logging.getLogger(__name__)

CLASSES = ("normal", "bacteria", "virus", "covid")


# --------------------------------------------------------------------------- segmentation datasets


@dataclass
class SegCase:
    """One radiograph with its reference lung mask(s) (union of the files in ``masks``)."""

    case_id: str
    image: Path
    masks: list[Path] = field(default_factory=list)
    patient_id: str = ""
    domain: str = "jsrt"  # jsrt (SCR convention) | v7 (full convention)

    @property
    def convention(self) -> str:
        return "scr" if self.domain == "jsrt" else "full"


_MASK_DIR = re.compile(r"(left|right).?lung", re.IGNORECASE)


def discover_jsrt(root: str | os.PathLike[str]) -> list[SegCase]:
    """JSRT images with SCR lung masks under ``root``.

    Works for this project's layout (``images/*.png``,
    ``masks/{left,right}_lung/*.png``) and the original distributions (raw
    ``*.IMG`` files anywhere, SCR ``.../left lung/*.gif`` and ``right lung``
    folders). A case is kept only when both lung masks are found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"JSRT folder {root} not found")
    images: dict[str, Path] = {}
    masks: dict[str, dict[str, Path]] = {}
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.name.startswith("."):
            continue
        stem, suffix = f.stem.upper(), f.suffix.lower()
        side = _MASK_DIR.search(f.relative_to(root).as_posix())
        if side and suffix in (".png", ".gif", ".bmp", ".tif", ".tiff"):
            masks.setdefault(stem, {})[side.group(1).lower()] = f
        elif suffix in (".png", ".img", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff") and stem.startswith("JPC"):
            images[stem] = f
    cases = [SegCase(stem, img, [masks[stem]["left"], masks[stem]["right"]], stem, "jsrt")
             for stem, img in sorted(images.items()) if {"left", "right"} <= set(masks.get(stem, {}))]
    if not cases:
        raise DataError(f"no JSRT images with left and right SCR lung masks found under {root}")
    return cases


def discover_v7(root: str | os.PathLike[str]) -> list[SegCase]:
    """V7 lung annotations: ``root/metadata.csv`` (``image_id, image, mask, patient_id``) or, without it,
    ``images/X.*`` paired with ``masks/X.png`` (each image its own patient)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"V7 folder {root} not found")
    meta = root / "metadata.csv"
    cases = []
    if meta.is_file():
        for i, r in enumerate(_read_csv(meta)):
            try:
                cases.append(SegCase(r["image_id"], root / r["image"], [root / r["mask"]], r.get("patient_id") or r["image_id"], "v7"))
            except KeyError as exc:
                raise DataError(f"{meta}, row {i + 2}: missing column {exc}") from None
    else:
        masks = {f.stem: f for f in (root / "masks").glob("*") if f.is_file()} if (root / "masks").is_dir() else {}
        for f in sorted((root / "images").glob("*")) if (root / "images").is_dir() else []:
            if f.stem in masks:
                cases.append(SegCase(f.stem, f, [masks[f.stem]], f.stem, "v7"))
    if not cases:
        raise DataError(f"no V7 images with masks found under {root} (expected metadata.csv or images/ + masks/)")
    return cases


def discover_seg(root: str | os.PathLike[str]) -> list[SegCase]:
    """JSRT/SCR or V7 layout, told apart by the V7 ``metadata.csv`` columns or ``masks/*.png`` without lung subfolders."""
    root = Path(root)
    meta = root / "metadata.csv"
    if meta.is_file():
        with meta.open(newline="", encoding="utf-8") as fh:
            head = next(csv.reader(fh), [])
        if {"image", "mask"} <= set(head):
            return discover_v7(root)
    if (root / "masks").is_dir() and not any(_MASK_DIR.search(p.name) for p in (root / "masks").iterdir() if p.is_dir()):
        return discover_v7(root)
    return discover_jsrt(root)


def load_seg_case(case: SegCase, work_size: int = 1024) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """→ image ``(work,work) float32``, reference mask ``(work,work) bool`` (union of its files), original (H, W)."""
    img = read_image(case.image)
    mask = np.zeros((work_size, work_size), dtype=bool)
    for m in case.masks:
        ref = read_mask(m)
        mask |= resize(ref, work_size, "nearest")
    return resize(img, work_size, "area"), mask, img.shape


def split_ids(ids: Sequence[str], seed: int, val_frac: float, test_frac: float) -> dict[str, list[str]]:
    """Seeded split by image (JSRT has one image per patient)."""
    ids = sorted(ids)
    rng = random.Random(seed)
    rng.shuffle(ids)
    n_test = int(round(test_frac * len(ids)))
    n_val = int(round(val_frac * len(ids)))
    return {"test": sorted(ids[:n_test]), "val": sorted(ids[n_test:n_test + n_val]), "train": sorted(ids[n_test + n_val:])}


def group_split(cases: Sequence[SegCase], seed: int, val_frac: float, test_frac: float) -> dict[str, list[str]]:
    """Seeded train/val/test split of case ids with every patient in one part only."""
    by_patient: dict[str, list[str]] = {}
    for c in cases:
        by_patient.setdefault(c.patient_id, []).append(c.case_id)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    n = len(cases)
    parts: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    for p in patients:
        if len(parts["test"]) < test_frac * n:
            parts["test"] += by_patient[p]
        elif len(parts["val"]) < val_frac * n:
            parts["val"] += by_patient[p]
        else:
            parts["train"] += by_patient[p]
    return {k: sorted(v) for k, v in parts.items()}


# --------------------------------------------------------------------------- labelled radiographs


@dataclass
class Record:
    image_id: str
    file: Path
    label: str
    patient_id: str
    source: str = ""
    finding: str = ""
    view: str = ""
    age_group: str = ""  # adult | pediatric | "" (unknown)


#: ``finding`` (case-insensitive substring) → class; first match wins. Fungal findings
#: (Pneumocystis, Aspergillosis) are mapped to ``bacteria`` as in the FLANNEL paper's data
#: preparation; ``exclude_findings`` in the patch config can leave them out.
FINDING_MAP: tuple[tuple[str, str], ...] = (
    ("covid", "covid"),
    ("no finding", "normal"),
    ("normal", "normal"),
    ("bacterial", "bacteria"), ("streptococcus", "bacteria"), ("klebsiella", "bacteria"), ("legionella", "bacteria"),
    ("mycoplasma", "bacteria"), ("staphylococcus", "bacteria"), ("e.coli", "bacteria"), ("chlamydophila", "bacteria"),
    ("nocardia", "bacteria"), ("tuberculosis", "bacteria"),
    ("pneumocystis", "bacteria"), ("aspergillosis", "bacteria"),  # fungal → bacteria (see above)
    ("viral", "virus"), ("sars", "virus"), ("mers", "virus"), ("influenza", "virus"), ("varicella", "virus"),
    ("herpes", "virus"), ("h1n1", "virus"),
)
FUNGAL_FINDINGS = ("pneumocystis", "aspergillosis")


def finding_label(finding: str) -> str | None:
    """Map a source's ``finding`` to a class (``None`` = not one of ours)."""
    f = finding.strip().lower()
    for key, label in FINDING_MAP:
        if key in f:
            return label
    return None


def age_group(source: str, age: str = "") -> str:
    """``pediatric`` for the Kaggle (Guangzhou, ages 1–5) source, ``adult`` for the adult collections, else by age."""
    s = source.lower()
    if "kaggle" in s or "pediatric" in s:
        return "pediatric"
    if "adult" in s or "ieee8023" in s or "actualmed" in s or "jsrt" in s:
        return "adult"
    try:
        return "adult" if float(age) >= 18 else "pediatric"
    except ValueError:
        return ""


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from None


def _project_csv(path: Path, rows: list[dict[str, str]]) -> list[Record]:
    out = []
    for i, r in enumerate(rows):
        label = (r.get("label") or "").strip().lower()
        if label not in CLASSES:
            raise DataError(f"{path}, row {i + 2}: unknown label {label!r} (expected one of {', '.join(CLASSES)})")
        source = r.get("source", "")
        out.append(Record(r["image_id"], path.parent / r["file"], label, r["patient_id"], source, r.get("finding", ""),
                          r.get("view", ""), age_group(source, r.get("age", ""))))
    return out


def _ieee_csv(path: Path, rows: list[dict[str, str]]) -> list[Record]:
    out = []
    for r in rows:
        view = r.get("view", "").strip()
        if view.upper() not in ("PA", "AP", "AP SUPINE", "AP ERECT"):
            continue
        label = finding_label(r.get("finding", ""))
        if label is None:
            continue
        f = path.parent / (r.get("folder") or "images") / r["filename"]
        out.append(Record(f"ccx-{Path(r['filename']).stem}", f, label, f"ccx-{r['patientid']}", "ieee8023 (adult)",
                          r.get("finding", ""), view, age_group("ieee8023", r.get("age", ""))))
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
        out.append(Record(f"kcx-{f.stem}", f, label, f"kcx-{pid}", "kaggle-chest-xray-pneumonia (pediatric)",
                          label, "AP", "pediatric"))
    return out


def _jsrt_normals(root: Path) -> list[Record]:
    """JSRT radiographs as adult non-pneumonia images (label ``normal``; JPCLN ones carry a lung nodule)."""
    return [Record(f"jsrt-{c.case_id}", c.image, "normal", f"jsrt-{c.case_id}", "JSRT (adult, Japan)",
                   "nodule" if c.case_id.startswith("JPCLN") else "no nodule", "PA", "adult")
            for c in discover_jsrt(root)]


def load_records(sources: Sequence[str | os.PathLike[str]], exclude_findings: Sequence[str] = ()) -> list[Record]:
    """Records from one or more sources (see the module doc); ``jsrt:PATH`` adds JSRT radiographs as adult normals.

    ``exclude_findings``: case-insensitive substrings of ``finding`` whose images are left out.
    """
    records: list[Record] = []
    for src in sources:
        s = str(src)
        if s.startswith("jsrt:"):
            records += _jsrt_normals(Path(s[5:]))
            continue
        p = Path(s)
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
                raise DataError(f"{p}: unrecognised metadata columns {sorted(cols)[:8]}")
        elif p.is_dir():
            found = _kaggle(p)
            if not found:
                raise DataError(f"{p}: no metadata.csv and no Kaggle NORMAL/PNEUMONIA folders found")
            records += found
        else:
            raise DataError(f"data source {p} not found")
    if exclude_findings:
        keys = [e.lower() for e in exclude_findings]
        before = len(records)
        records = [r for r in records if not any(k in r.finding.lower() for k in keys)]
        log.info("excluded %d images whose finding matches %s", before - len(records), ", ".join(keys))
    dup = [k for k, v in Counter(r.image_id for r in records).items() if v > 1]
    if dup:
        raise DataError(f"duplicate image ids across sources, e.g. {dup[0]}")
    if not records:
        raise DataError("no labelled images found in " + ", ".join(map(str, sources)))
    log.info("%d labelled images: %s", len(records), dict(Counter(r.label for r in records)))
    return records


# --------------------------------------------------------------------------- splits


def make_splits(labels: np.ndarray, groups: Sequence[str], seed: int, test_frac: float, n_folds: int) -> dict[str, Any]:
    """Held-out test part + stratified k folds on the rest, all grouped by patient.

    Returns ``{"test": [idx…], "folds": [[idx…] × n_folds]}`` (indices into the data).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    counts = Counter(labels.tolist())
    n_test_splits = max(2, int(round(1 / test_frac)))
    need = n_test_splits * n_folds
    small = {CLASSES[k] if isinstance(k, (int, np.integer)) and k < len(CLASSES) else k: v for k, v in counts.items() if v < need}
    if small:
        raise DataError(f"too few images per class for a test part and {n_folds} folds (need ≥ {need} of each; "
                        f"have {small}); add data or lower split.folds / raise split.test_frac")
    idx = np.arange(len(labels))
    g = np.asarray(groups)
    outer = StratifiedGroupKFold(n_splits=n_test_splits, shuffle=True, random_state=seed)
    rest, test = next(iter(outer.split(idx, labels, g)))
    inner = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed + 1)
    folds = [rest[v].tolist() for _, v in inner.split(rest, labels[rest], g[rest])]
    split = {"test": sorted(test.tolist()), "folds": [sorted(f) for f in folds]}
    check_grouped(split, groups)
    return split


def inner_validation(train_idx: Sequence[int], labels: np.ndarray, groups: Sequence[str], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Carve a patient-grouped, stratified validation part out of a training part."""
    from sklearn.model_selection import StratifiedGroupKFold

    train_idx = np.asarray(train_idx)
    g = np.asarray(groups)[train_idx]
    k = max(2, int(round(1 / frac)))
    present = np.bincount(np.asarray(labels)[train_idx])
    smallest = int(present[present > 0].min()) if present.any() else 0
    if smallest < k:
        raise DataError(f"too few images per class for a validation part of {frac:g}: the smallest class has "
                        f"{smallest} images in this training part, {k} are needed; add data or raise split.val_frac")
    tr, va = next(iter(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(train_idx, labels[train_idx], g)))
    return sorted(train_idx[tr].tolist()), sorted(train_idx[va].tolist())


def subsample_groups(train_idx: Sequence[int], labels: np.ndarray, groups: Sequence[str], frac: float,
                     seed: int) -> list[int]:
    """Keep ``frac`` of a training part's patients — a learning curve's point.

    Per class (a patient's class: its first image's), the patients are put in one seeded order and the
    first ``round(frac · n)`` (at least one) are kept, with all their images. The order does not depend on
    ``frac``, so smaller shares are subsets of larger ones (nested points, as a learning curve needs);
    ``frac >= 1`` keeps everything.
    """
    if frac >= 1:
        return sorted(int(i) for i in train_idx)
    if not 0 < frac < 1:
        raise DataError(f"split.train_fraction {frac:g}: must be in (0, 1]")
    train_idx = np.asarray(train_idx)
    g = np.asarray(groups)[train_idx]
    uniq, first = np.unique(g, return_index=True)
    klass = np.asarray(labels)[train_idx][first]
    rng = np.random.default_rng(seed)
    keep: list[str] = []
    for c in np.unique(klass):
        members = uniq[klass == c]
        keep += members[rng.permutation(len(members))][:max(1, int(round(frac * len(members))))].tolist()
    return sorted(train_idx[np.isin(g, keep)].tolist())


def check_grouped(split: dict[str, Any], groups: Sequence[str]) -> None:
    """Raise DataError if any patient (group) appears in two parts of a split."""
    parts = [split["test"], *split["folds"]]
    seen: dict[str, int] = {}
    for p, idx in enumerate(parts):
        for i in idx:
            g = groups[i]
            if seen.setdefault(g, p) != p:
                raise DataError(f"patient {g} appears in two parts of the split")


# --------------------------------------------------------------------------- fingerprints and duplicates


def content_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes."""
    from ._files import file_sha256

    return file_sha256(path)[:16]


def records_fingerprint(records: Sequence[Record], hashes: Sequence[str]) -> dict[str, Any]:
    """What a cache or split was built from: per image id its label, patient, source and content hash."""
    return {r.image_id: {"label": r.label, "patient": r.patient_id, "source": r.source, "hash": h}
            for r, h in zip(records, hashes)}


def diff_fingerprints(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`records_fingerprint` results (empty = same)."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = {key: sorted(i for i in set(old) & set(new) if old[i].get(key) != new[i].get(key))
               for key in ("hash", "label", "patient")}
    out = []
    if added:
        out.append(f"{len(added)} images added (e.g. {added[0]})")
    if removed:
        out.append(f"{len(removed)} images removed (e.g. {removed[0]})")
    for key, what in (("hash", "changed content"), ("label", "changed label"), ("patient", "changed patient id")):
        if changed[key]:
            out.append(f"{len(changed[key])} images {what} (e.g. {changed[key][0]})")
    return out


def thumbnail(img: np.ndarray, side: int = 64) -> np.ndarray:
    """``(side²,) float32`` area-resized thumbnail of an image, standardised (mean 0, std 1)."""
    import cv2

    t = cv2.resize(np.asarray(img, dtype=np.float32), (side, side), interpolation=cv2.INTER_AREA).ravel()
    return ((t - t.mean()) / (t.std() + 1e-6)).astype(np.float32)


def find_duplicates(thumbs: np.ndarray, groups: Sequence[str], min_corr: float = 0.98) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, correlation)`` of images in *different* groups whose standardised 64×64 thumbnails
    correlate at ≥ ``min_corr``: the same radiograph resized or recompressed. (Measured on the 965
    development images: the two true duplicates correlate at 0.99999, the next pair of different
    patients at 0.963.)"""
    t = np.asarray(thumbs, dtype=np.float32)
    if len(t) < 2:
        return []
    corr = (t @ t.T) / t.shape[1]
    g = np.asarray(groups)
    ii, jj = np.nonzero(np.triu(corr >= min_corr, k=1))
    return [(int(i), int(j), float(corr[i, j])) for i, j in zip(ii, jj) if g[i] != g[j]]


def merge_groups(groups: Sequence[str], pairs: Sequence[tuple[int, int, float]]) -> list[str]:
    """Groups after merging every pair's groups (union-find); a merged group is named after its smallest member."""
    parent: dict[str, str] = {g: g for g in groups}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in pairs:
        a, b = find(groups[i]), find(groups[j])
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(g) for g in groups]


# --------------------------------------------------------------------------- the cache of work images and lung masks


@dataclass
class CxrData:
    """A cached dataset in memory: ``images``/``masks`` ``(N,1,1024,1024)`` uint8/bool tensors, metadata, groups.

    ``groups`` are the patient ids after merging near-duplicate images of
    different patients (every split groups by them).
    """

    ids: list[str]
    labels: np.ndarray  # (N,) int64 index into CLASSES
    patients: list[str]
    groups: list[str]
    sources: list[str]
    age_groups: list[str]
    views: list[str]
    findings: list[str]
    images: Any
    masks: Any
    fingerprint: dict[str, Any]
    duplicates: list[dict[str, Any]]
    provenance: dict[str, Any]
    roles: list[str] = field(default_factory=list)  # main | train_only (set by the caller; default all main)

    def __post_init__(self) -> None:
        if not self.roles:
            self.roles = ["main"] * len(self.ids)

    def subset(self, idx: Sequence[int]) -> dict[str, np.ndarray]:
        """Metadata arrays for ``idx`` (for vote files and stratified reports)."""
        i = np.asarray(idx, dtype=np.int64)
        return {"ids": np.array(self.ids)[i], "y": self.labels[i], "patients": np.array(self.patients)[i],
                "groups": np.array(self.groups)[i], "sources": np.array(self.sources)[i],
                "age_groups": np.array(self.age_groups)[i], "views": np.array(self.views)[i],
                "findings": np.array(self.findings)[i]}


def build_cache(records: Sequence[Record], segmenter: Any, path: str | os.PathLike[str], segmenter_ref: str = "",
                segmenter_sha256: str = "", batch_size: int = 8, track: Any = None,
                dedup_corr: float = 0.98) -> tuple[Path, list[str]]:
    """Read every record, make its work image and lung mask exactly as ``predict`` does
    (:func:`patchflannel.pipeline.prepare`) and write them to an HDF5 store with the data's
    fingerprint (ids, labels, patients, content hashes), the segmenter's identity and the
    near-duplicates found. Returns the store path and the messages of unreadable files
    (left out, never silently)."""
    from .errors import ImageReadError
    from .pipeline import prepare
    from .store import StoreWriter

    errors: list[str] = []
    unreadable: list[dict[str, str]] = []
    kept: list[Record] = []
    hashes: list[str] = []
    thumbs: list[np.ndarray] = []
    starts = range(0, len(records), batch_size)
    it = track(starts, "caching + segmenting", len(starts)) if track else starts
    prov = {"segmenter": segmenter_ref, "segmenter_sha256": segmenter_sha256,
            "classes": list(CLASSES), "work_image": "1024x1024 area resize (aspect not kept), uint8",
            "mask": "scr convention from the work image (as predict)"}
    with StoreWriter(path, provenance=prov) as w:
        for s in it:
            batch, imgs = [], []
            for r in records[s:s + batch_size]:
                try:
                    imgs.append(read_image(r.file))
                    batch.append(r)
                except ImageReadError as exc:
                    errors.append(str(exc))
                    unreadable.append({"image_id": r.image_id, "file": str(r.file), "error": exc.problem})
                    log.warning("skipped: %s", exc)
            if not imgs:
                continue
            prep = prepare(imgs, segmenter)
            for k, (r, im) in enumerate(zip(batch, imgs)):
                work = prep.work[k, 0].numpy()
                h = content_hash(r.file)
                thumbs.append(thumbnail(work))
                meta = {"file": str(r.file), "label": r.label, "patient_id": r.patient_id, "source": r.source,
                        "finding": r.finding, "view": r.view, "age_group": r.age_group, "orig_height": im.shape[0],
                        "orig_width": im.shape[1], "hash": h, **prep.quality[k].to_dict()}
                w.add(r.image_id, work, prep.masks[k, 0].numpy(), meta)
                kept.append(r)
                hashes.append(h)
        pairs = find_duplicates(np.stack(thumbs) if thumbs else np.zeros((0, 1)), [r.patient_id for r in kept], dedup_corr)
        w.documents["fingerprint"] = records_fingerprint(kept, hashes)
        w.documents["duplicates"] = [{"a": kept[i].image_id, "b": kept[j].image_id, "patient_a": kept[i].patient_id,
                                      "patient_b": kept[j].patient_id, "correlation": c} for i, j, c in pairs]
        w.documents["unreadable"] = unreadable
    log.info("cache %s: %d images, %d unreadable, %d near-duplicate pairs across patients", path, len(kept), len(errors),
             len(pairs))
    return Path(path), errors


def load_cache(path: str | os.PathLike[str], records: Sequence[Record] | None = None, segmenter_sha256: str | None = None,
               dedup: bool = True) -> CxrData:
    """Open a cache. With ``records`` (the current metadata) only those images are loaded, and the cache is
    refused if any of them is missing from it or changed (content, label or patient) since it was built;
    with ``segmenter_sha256`` it is refused if another segmenter made its masks. ``dedup`` merges the groups
    of near-duplicate images. Images unreadable at build time were reported then and stay out."""
    import torch

    from .store import Store

    with Store(path) as s:
        fp = s.documents.get("fingerprint")
        if fp is None:
            raise DataError(f"cache {path} has no data fingerprint (built by an older version); rebuild it with --rebuild")
        prov = s.provenance
        if segmenter_sha256 and prov.get("segmenter_sha256") and prov["segmenter_sha256"] != segmenter_sha256:
            raise DataError(f"cache {path} was built with masks from another lung segmenter ({prov.get('segmenter')}); "
                            "rebuild it with --rebuild")
        ids_all = list(s.ids)
        if records is not None:
            skipped = {u["image_id"] for u in s.documents.get("unreadable", [])}
            wanted = [r for r in records if r.image_id not in skipped]
            current = records_fingerprint(wanted, [content_hash(r.file) for r in wanted])
            diffs = diff_fingerprints({k: v for k, v in fp.items() if k in current}, current)
            if diffs:
                raise DataError(f"cache {path} does not match the current data ({'; '.join(diffs)}): "
                                "rebuild it with --rebuild")
            keep = sorted(s.index[r.image_id] for r in wanted)
        else:
            keep = list(range(len(ids_all)))
        images = torch.from_numpy(s.h5["images"][keep]).unsqueeze(1)
        masks = torch.from_numpy(s.h5["masks"][keep].astype(bool)).unsqueeze(1)
        meta = [s.meta[i] for i in keep]
        ids = [ids_all[i] for i in keep]
        dups = list(s.documents.get("duplicates", []))
        fp = {i: fp[i] for i in ids}
    n = len(ids)
    labels = np.array([CLASSES.index(m["label"]) for m in meta], dtype=np.int64)
    patients = [m["patient_id"] for m in meta]
    groups = list(patients)
    index = {k: i for i, k in enumerate(ids)}
    dups = [d for d in dups if d["a"] in index and d["b"] in index]
    if dedup and dups:
        groups = merge_groups(patients, [(index[d["a"]], index[d["b"]], 1.0) for d in dups])
    empty = [ids[i] for i in range(n) if not bool(masks[i].any())]
    if empty:
        log.warning("%d cached images have an empty lung mask; their crops fall back to the whole image (e.g. %s)",
                    len(empty), empty[0])
    return CxrData(ids, labels, patients, groups, [m.get("source", "") for m in meta],
                   [m.get("age_group", "") for m in meta], [m.get("view", "") for m in meta],
                   [m.get("finding", "") for m in meta], images, masks, fp, dups, prov)
