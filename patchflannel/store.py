"""HDF5 cache of a radiograph dataset at 1024×1024.

Layout of a store (``.h5``)::

    images   (N,1024,1024) uint8, one image per chunk (lzf)
    masks    (N,1024,1024) uint8 0/1 lung masks, one per chunk   [optional]
    ids      (N,) str      image ids
    meta     (N,) str      one JSON object per image (source file, original
                           size, label, patient id, …)
    attrs    complete=True, format_version, created, provenance JSON

The file is written under a temporary name in the same folder and renamed
only when complete, and ``complete`` is set last, so a crash never leaves a
file that looks valid. Opening an incomplete or foreign file is a
:class:`StoreError`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from . import __version__
from ._files import _umask
from .errors import StoreError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SIZE = 1024


class StoreWriter:
    """Append images (and masks) to a new store; renamed into place on success.

    >>> with StoreWriter("cache.h5", provenance={"source": "..."}) as w:
    ...     w.add("img1", image_u8, mask_bool, {"label": "covid"})
    """

    def __init__(self, path: str | os.PathLike, with_masks: bool = True, size: int = SIZE,
                 provenance: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.documents: dict[str, Any] = {}  # JSON documents stored as string datasets (no 64 KB attribute limit)
        self.size = size
        self.with_masks = with_masks
        self.provenance = provenance or {}
        if self.path.is_dir():
            raise StoreError(f"--store {self.path}: is a folder; give a file name such as {self.path / 'store.h5'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"--store {self.path}: cannot create its folder ({exc.strerror or exc})") from None
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.h5 = h5py.File(self.tmp, "w")
        self.h5.attrs["complete"] = False
        shape, chunk = (0, size, size), (1, size, size)
        self.images = self.h5.create_dataset("images", shape, maxshape=(None, size, size), dtype="u1", chunks=chunk,
                                             compression="lzf")
        self.masks = (self.h5.create_dataset("masks", shape, maxshape=(None, size, size), dtype="u1", chunks=chunk,
                                             compression="lzf") if with_masks else None)
        self._ids: list[str] = []
        self._meta: list[str] = []

    def add(self, image_id: str, image: np.ndarray, mask: np.ndarray | None = None, meta: dict[str, Any] | None = None) -> None:
        """Append ``image`` ``(S,S)`` uint8 (or float [0,1]) and ``mask`` ``(S,S)`` bool."""
        if image.shape != (self.size, self.size):
            raise ValueError(f"{image_id}: image must be {self.size}×{self.size}, got {image.shape}")
        if image.dtype != np.uint8:
            image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        n = len(self._ids)
        self.images.resize(n + 1, axis=0)
        self.images[n] = image
        if self.masks is not None:
            if mask is None or mask.shape != (self.size, self.size):
                raise ValueError(f"{image_id}: a {self.size}×{self.size} mask is required in this store")
            self.masks.resize(n + 1, axis=0)
            self.masks[n] = mask.astype(np.uint8)
        self._ids.append(image_id)
        self._meta.append(json.dumps(meta or {}, default=str))

    def __len__(self) -> int:
        return len(self._ids)

    def close(self) -> Path:
        """Finish: write ids/metadata, mark complete, rename into place."""
        str_dt = h5py.string_dtype("utf-8")
        self.h5.create_dataset("ids", data=np.array(self._ids, dtype=object), dtype=str_dt)
        self.h5.create_dataset("meta", data=np.array(self._meta, dtype=object), dtype=str_dt)
        for name, doc in self.documents.items():
            self.h5.create_dataset(f"doc_{name}", data=json.dumps(doc, default=str), dtype=str_dt)
        self.h5.attrs["format_version"] = FORMAT_VERSION
        self.h5.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        self.h5.attrs["code_version"] = __version__
        self.h5.attrs["provenance"] = json.dumps(self.provenance, default=str)
        self.h5.attrs["complete"] = True  # last: a crash before this leaves an incomplete file
        self.h5.close()
        os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp made it 0600
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.h5.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Store:
    """Read access to a complete store. Images are read lazily, one chunk each."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path}: store file not found")
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise StoreError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        if not bool(self.h5.attrs.get("complete", False)) or "ids" not in self.h5:
            self.h5.close()
            raise StoreError(f"{self.path}: incomplete store (writing was interrupted); delete it and build it again")
        self.ids: list[str] = [s.decode() if isinstance(s, bytes) else s for s in self.h5["ids"][()]]
        self.meta: list[dict[str, Any]] = [json.loads(s) for s in self.h5["meta"].asstr()[()]]
        self.provenance: dict[str, Any] = json.loads(self.h5.attrs.get("provenance", "{}"))
        self.has_masks = "masks" in self.h5
        self.documents: dict[str, Any] = {k[4:]: json.loads(self.h5[k].asstr()[()]) for k in self.h5 if k.startswith("doc_")}
        self.index = {k: i for i, k in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> np.ndarray:
        """``(1024,1024) uint8``."""
        return self.h5["images"][i]

    def mask(self, i: int) -> np.ndarray:
        """``(1024,1024) bool``."""
        if not self.has_masks:
            raise StoreError(f"{self.path}: this store has no masks")
        return self.h5["masks"][i].astype(bool)

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
