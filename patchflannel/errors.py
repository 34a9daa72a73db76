"""The errors a user can fix, in one hierarchy.

Everything the command line reports as a one-line message (exit code 2, or a
per-file ``error`` row in a batch) derives from :class:`PatchflannelError`.
Anything else that escapes is a bug and is shown as one, with its traceback.

Leaf module: imports nothing of ours.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ConfigError",
    "DataError",
    "DeviceError",
    "ImageReadError",
    "OutputError",
    "PatchflannelError",
    "ResumeError",
    "StoreError",
    "WeightsError",
    "WeightsNotFoundError",
]


class PatchflannelError(Exception):
    """A problem with the user's input, files, config or machine; the message says what to do."""


class ConfigError(PatchflannelError, ValueError):
    """A config file or ``--set`` override is missing, unknown, ill-typed or out of range."""


class DataError(PatchflannelError, ValueError):
    """A data source (metadata, folders, split, cache) is missing, malformed or stale."""


class DeviceError(PatchflannelError, ValueError):
    """The requested device does not exist on this machine."""


class OutputError(PatchflannelError, OSError):
    """An output folder or file cannot be written (not a folder, read-only, disk full, in use)."""


class ResumeError(PatchflannelError, ValueError):
    """A checkpoint cannot be resumed (changed config, other model, truncated file)."""


class ConfigChangedError(ResumeError):
    """A checkpoint was made with another config; ``changes`` lists the dotted keys as ``key: old → new``."""

    def __init__(self, message: str, changes: list[str]) -> None:
        super().__init__(message)
        self.changes = changes


class StoreError(PatchflannelError, ValueError):
    """A store file is missing, incomplete or not a patchflannel store."""


class WeightsError(PatchflannelError, ValueError):
    """A weights file exists but does not fit (corrupt, wrong task, wrong shapes)."""


class WeightsNotFoundError(PatchflannelError, FileNotFoundError):
    """A weight file is missing; the message says where it is expected and which option sets it."""


class ImageReadError(PatchflannelError, ValueError):
    """A file could not be read as a radiograph or mask; the message names the file and why."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
