"""Writing files safely: the one atomic-write helper, JSON, names used in paths, hashes.

Every file the toolkit writes goes through :func:`atomic_path`: the content is
written to a uniquely named temporary file in the target's folder, flushed
and ``fsync``-ed, given normal permissions (``0666 & ~umask``) and renamed
over the target. A reader therefore sees the old file or the new one, never
half of one, and a crash, ``kill -9`` or a full disk leaves the old file.

Leaf module: imports only the standard library and numpy.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError

__all__ = [
    "atomic_path",
    "check_name",
    "file_sha256",
    "jsonable",
    "write_bytes",
    "write_csv",
    "write_json",
    "write_npz",
    "write_text",
]


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (reading it means setting it: threads writing files at once must not interleave)."""
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    The caller writes the temporary file (any way it likes); when the block
    exits normally the file gets normal permissions and is renamed into
    place. On any exception the temporary file is removed and ``path`` is
    untouched. ``OSError`` s (read-only folder, full disk, a folder in the
    way) become :class:`OutputError` naming ``path``.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{target.parent}: cannot create the output folder ({exc.strerror or exc})") from exc
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; cannot write a file there")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with contextlib.suppress(FileNotFoundError):
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def jsonable(obj: Any) -> Any:
    """Plain JSON types for ``obj``: numpy → Python, Path → str, NaN/inf → None (strict JSON has neither)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # torch tensors, without importing torch here
        return jsonable(obj.tolist())
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented strict JSON (see :func:`jsonable`)."""
    return write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Atomically write dict rows as CSV through the csv module (commas, quotes and
    newlines in values are quoted, never break a row). Columns: ``columns`` or
    the union of keys in first-seen order; missing values and None are empty."""
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return write_text(path, buf.getvalue())


def write_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """Atomically write ``numpy.savez`` arrays (no pickled objects)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return write_bytes(path, buf.getvalue())


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is safe as one path component, else raise ValueError.

    Names read from files (learner names in an ensemble config, fold ids, …)
    become file names; ``../x``, ``/abs``, separators and hidden names would
    let a crafted file write or read outside its folder.
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{what} {name!r} is not a safe file name (letters, digits, '.', '_', '+', '-'; "
                         "no path separators, not starting with '.')")
    return name


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
