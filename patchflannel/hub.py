"""Finding, saving and loading weights: one resolver, one on-disk format.

A saved model is a folder (as smp's and Hugging Face's ``save_pretrained``)::

    DIR/config.json         everything needed to rebuild and use the model: task,
                            architecture, classes, input size, preprocessing,
                            training data, metrics, code version
    DIR/model.safetensors   the tensors (nothing executable)

Older single-file weights (``STEM.safetensors`` + ``STEM.json``) load too.

Where a name is looked up (first hit wins), by :func:`resolve_weights`:

1. an explicit path that exists (a folder, or a ``.safetensors`` file);
2. ``$PATCHFLANNEL_WEIGHTS/NAME`` (a folder of weights);
3. ``$PATCHFLANNEL_HOME/weights/NAME``;
4. the weights shipped with the package (``lung_unet_v7c``, ``lung_unet_jsrt``, ``lung_unet_v7``, ``lung_unet_v7b``,
   ``ensemble``).

Loading never downloads anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._files import atomic_path, write_json
from .config import shipped_dir
from .errors import WeightsError, WeightsNotFoundError

log = logging.getLogger(__name__)

__all__ = ["load_pretrained", "replace_dir", "resolve_weights", "save_pretrained", "weight_dirs"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def weight_dirs() -> list[Path]:
    """The folders searched for a weights name, in order."""
    dirs = []
    if os.environ.get("PATCHFLANNEL_WEIGHTS"):
        dirs.append(Path(os.environ["PATCHFLANNEL_WEIGHTS"]).expanduser())
    if os.environ.get("PATCHFLANNEL_HOME"):
        dirs.append(Path(os.environ["PATCHFLANNEL_HOME"]).expanduser() / "weights")
    dirs.append(shipped_dir("weights"))
    return dirs


def _is_weights(p: Path) -> bool:
    if p.is_dir():
        return (p / CONFIG_NAME).is_file() or (p / "flannel" / CONFIG_NAME).is_file()
    return p.suffix == ".safetensors" and p.is_file() or p.with_suffix(".safetensors").is_file()


def resolve_weights(name_or_path: str | os.PathLike[str], option: str = "--weights") -> Path:
    """The folder (or legacy stem) of the weights called ``name_or_path``; see the module doc for the order.

    ``option`` names the CLI option that sets these weights, for the error message.
    """
    p = Path(name_or_path).expanduser()
    if p.exists() or p.with_suffix(".safetensors").exists():
        if not _is_weights(p):
            raise WeightsNotFoundError(f"{p} holds no weights ({CONFIG_NAME} + {WEIGHTS_NAME} expected); "
                                       f"pass {option} a folder written by save_pretrained or export")
        return p
    if len(p.parts) == 1:
        for d in weight_dirs():
            cand = d / p
            if _is_weights(cand):
                return cand
    where = ", ".join(str(d) for d in weight_dirs())
    raise WeightsNotFoundError(
        f"weights {str(name_or_path)!r} not found (looked in: the current directory, {where}). "
        f"Pass {option} PATH to a weights folder, or set PATCHFLANNEL_WEIGHTS to a folder that holds {p.name}/")


def save_pretrained(directory: str | os.PathLike[str], state: dict[str, torch.Tensor] | torch.nn.Module,
                    config: dict[str, Any], card: str | None = None) -> Path:
    """Write ``DIR/model.safetensors`` then ``DIR/config.json`` (last: its presence marks a complete save)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    # safetensors refuses shared storage and non-contiguous tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "patchflannel": __version__})
    if card is not None:
        from ._files import write_text

        write_text(directory / "README.md", card)
    write_json(directory / CONFIG_NAME, {**config, "code_version": __version__})
    return directory


def _legacy_files(p: Path) -> tuple[Path, Path] | None:
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    return (st, js) if st.is_file() else None


def load_pretrained(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                    task: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, config)`` from a weights folder (or a legacy ``.safetensors`` + ``.json`` pair).

    ``task``: refuse weights whose config declares another task.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        st, js = p / WEIGHTS_NAME, p / CONFIG_NAME
    else:
        legacy = _legacy_files(p)
        if legacy is None:
            raise WeightsNotFoundError(f"weights {p} not found")
        st, js = legacy
    if not js.is_file():
        raise WeightsNotFoundError(f"{js} not found: a weights folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(js.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{js}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{js}: expected a JSON object")
    if task is not None and config.get("task") != task:
        raise WeightsError(f"{p}: these are {config.get('task')!r} weights, not {task!r}")
    if not st.is_file():
        raise WeightsNotFoundError(f"{st} not found: a weights folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        state = load_file(str(st), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{st}: not a readable safetensors file ({exc})") from None
    return state, config


def load_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike[str]) -> None:
    """``model.load_state_dict(state)`` with a one-line :class:`WeightsError` when shapes or keys do not fit.

    safetensors keeps tensors only, not the per-module ``_metadata`` (versions)
    that ``state_dict()`` carries; some modules (torchvision's MNASNet) refuse
    to load without it, so the model's own metadata is used.
    """
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + ", ".join(shapes[:3]))
        if missing:
            parts.append(f"{len(missing)} missing tensors, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
        raise WeightsError(f"{source}: the weights do not fit the model its config describes ({'; '.join(parts)})")
    state = {k: v.to(dtype=target[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    meta = getattr(target, "_metadata", None)
    if meta is not None:
        state = type(target)(state)
        state._metadata = meta  # type: ignore[attr-defined]
    model.load_state_dict(state)


def replace_dir(build: Path, dest: Path) -> Path:
    """Put the finished folder ``build`` at ``dest``, removing whatever was there (never a mix of both).

    The old folder is first renamed aside, then the new one renamed into
    place, then the old one deleted: at every moment ``dest`` is either the
    complete old or the complete new folder (or briefly absent).
    """
    dest = Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(build, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
