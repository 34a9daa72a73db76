"""Save and load model weights as safetensors + a JSON sidecar.

``<stem>.safetensors`` holds the tensors; ``<stem>.json`` holds everything
needed to rebuild and use the model (architecture, classes, input size,
preprocessing, training data, metrics, code version), in the spirit of smp's
``save_pretrained`` and timm's ``PretrainedCfg``. Loading never downloads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .io import _publish

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


class WeightsNotFoundError(FileNotFoundError):
    """A weight file is missing; the message says where it is expected."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_nan(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_nan(v) for v in obj]
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` via a temp file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NaN/inf → null)."""
    atomic_write_text(path, json.dumps(_clean_nan(obj), indent=2, default=_json_default) + "\n")


def stem_of(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Save ``model`` (or a state dict) to ``<stem>.safetensors`` + ``<stem>.json``; returns the stem."""
    stem = stem_of(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    # safetensors refuses shared storage and non-contiguous tensors.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{stem.name}.", suffix=".tmp", dir=stem.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "patchflannel": __version__})
        _publish(tmp, stem.with_suffix(".safetensors"))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json(stem.with_suffix(".json"), {**config, "code_version": __version__})
    return stem


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """``model.load_state_dict(state)`` for a state dict read from safetensors.

    safetensors keeps tensors only, not the per-module ``_metadata`` (versions)
    that ``state_dict()`` carries; some modules (torchvision's MNASNet) refuse
    to load without it. The model's own metadata is the right one here.
    """
    state = dict(state)
    meta = getattr(model.state_dict(), "_metadata", None)
    if meta is not None:
        state = type(model.state_dict())(state)
        state._metadata = meta  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=strict)


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(state_dict, config)`` from a safetensors file and its JSON sidecar."""
    stem = stem_of(path)
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for f in (st, js):
        if not f.exists():
            raise WeightsNotFoundError(
                f"weights file {f} not found. Put the model's .safetensors and .json side by side there, "
                f"or pass --weights PATH to a weights file (shipped ones live in {WEIGHTS_DIR})."
            )
    try:
        config = json.loads(js.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{js}: sidecar is not valid JSON ({exc})") from exc
    try:
        state = load_file(str(st), device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{st}: not a readable safetensors file ({exc})") from exc
    return state, config
