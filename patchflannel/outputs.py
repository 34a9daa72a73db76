"""Output folders of batch commands (``segment``, ``predict``, ``explain``): safe, owned, resumable to read.

:class:`OutputDir` is opened before any computation:

* the folder is created and a probe file written, so a ``--out`` that is a
  file, read-only or on a full disk fails at once, not after the work;
* a lock file (``OUT/.patchflannel.lock``, holding the PID) refuses a second
  run into the same folder while the first is alive;
* ``OUT/manifest.json`` records the command, its inputs and every file the run
  wrote. A folder holding an earlier run's manifest is refused unless
  ``overwrite=True``, which first deletes the files that manifest lists — so
  no stale mask, JSON or overlay of an earlier run sits beside new results;
* per-image result rows are appended to a CSV through the csv module as each
  image finishes (a crash keeps the finished rows), with ``status`` and
  ``error`` columns for files that failed.

Output names come from :func:`unique_names`: input stems, made unique across
folders without ever colliding with another input's stem.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from ._files import write_json
from .errors import OutputError

log = logging.getLogger(__name__)

__all__ = ["OutputDir", "unique_names"]

LOCK = ".patchflannel.lock"
MANIFEST = "manifest.json"


def unique_names(files: Sequence[Path]) -> dict[Path, str]:
    """Output name per input: its stem, or — where stems collide — ``parent_stem``, then ``stem-2``, ``stem-3`` …,
    never equal to any other input's name."""
    stems = [f.stem or f.name for f in files]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    taken = {s for s in stems if counts[s] == 1}
    names: dict[Path, str] = {}
    for f, s in zip(files, stems):
        if counts[s] == 1:
            names[f] = s
            continue
        cand = f"{f.parent.name}_{s}" if f.parent.name else s
        base, k = cand, 2
        while cand in taken:
            cand = f"{base}-{k}"
            k += 1
        taken.add(cand)
        names[f] = cand
    return names


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDir:
    """An output folder owned by one run (see the module docstring). Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], command: str, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.command = command
        self.overwrite = overwrite
        self.written: list[str] = []
        self._csv: dict[str, tuple[TextIO, csv.DictWriter[str]]] = {}
        self._locked = False
        self.inputs: list[str] = []

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> OutputDir:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        self.close("finished" if exc_type is None else "failed")

    def open(self) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise OutputError(f"--out {p}: is a file, not a folder")
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / f".probe-{os.getpid()}"
            probe.write_bytes(b"x" * 4096)
            probe.unlink()
        except OSError as exc:
            raise OutputError(f"--out {p}: cannot write there ({exc.strerror or exc})") from None
        self._lock()
        manifest = p / MANIFEST
        if manifest.exists() and not self._earlier_files(manifest):
            manifest.unlink(missing_ok=True)  # an earlier run that wrote nothing (e.g. failed at once) owns nothing
        if manifest.exists():
            if not self.overwrite:
                self._unlock()
                raise OutputError(f"--out {p}: holds the results of an earlier run ({manifest}); pass --overwrite to "
                                  "replace them, or choose another --out")
            self._remove_previous(manifest)
        self._write_manifest(status="running")

    def close(self, status: str = "finished") -> None:
        for fh, _ in self._csv.values():
            try:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
            except OSError:
                pass
        self._csv.clear()
        if self._locked:
            try:
                self._write_manifest(status=status)
            finally:
                self._unlock()

    def _lock(self) -> None:
        lock = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise OutputError(f"--out {self.path}: another patchflannel run (PID {pid}) is writing there; "
                                      "wait for it or choose another --out") from None
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._locked = True
            return
        raise OutputError(f"--out {self.path}: cannot take the lock {lock}")

    def _unlock(self) -> None:
        (self.path / LOCK).unlink(missing_ok=True)
        self._locked = False

    @staticmethod
    def _earlier_files(manifest: Path) -> list[str]:
        try:
            return list(json.loads(manifest.read_text()).get("files") or [])
        except (OSError, json.JSONDecodeError, AttributeError):
            return ["?"]  # unreadable: treat as an earlier run's results

    def _remove_previous(self, manifest: Path) -> None:
        try:
            old = json.loads(manifest.read_text())
            files = old.get("files", [])
        except (OSError, json.JSONDecodeError):
            files = []
        root = self.path.resolve()
        removed = 0
        for rel in files:
            f = (self.path / rel).resolve()
            if root in f.parents and f.is_file():  # never outside the folder, whatever the manifest says
                f.unlink()
                removed += 1
        manifest.unlink(missing_ok=True)
        log.info("--overwrite: removed %d files of the earlier run in %s", removed, self.path)

    def _write_manifest(self, status: str) -> None:
        write_json(self.path / MANIFEST, {
            "command": self.command, "status": status, "patchflannel": __version__,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": self.inputs, "files": sorted(set(self.written))})

    # ---------------------------------------------------------------- writing

    def file(self, *parts: str) -> Path:
        """A path inside the folder, recorded in the manifest (the caller writes it)."""
        rel = Path(*parts)
        self.written.append(rel.as_posix())
        return self.path / rel

    def append_row(self, name: str, row: dict[str, Any], columns: Sequence[str]) -> None:
        """Append ``row`` to ``OUT/name`` (created with a header on first use), flushed at once."""
        if name not in self._csv:
            path = self.file(name)
            try:
                fh = open(path, "w", newline="", encoding="utf-8")
            except OSError as exc:
                raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore", restval="")
            writer.writeheader()
            self._csv[name] = (fh, writer)
        fh, writer = self._csv[name]
        try:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
            fh.flush()
        except OSError as exc:
            raise OutputError(f"{self.path / name}: cannot write ({exc.strerror or exc})") from None
