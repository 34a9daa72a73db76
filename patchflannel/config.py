"""YAML configs with flag overrides.

A config is a plain dict loaded from ``configs/*.yaml``; CLI flags override
keys (dotted keys reach into nested sections, e.g. ``preprocess.size``);
options left at ``None`` do not override. The resolved config is saved in the
run folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file is missing or malformed."""


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A path, or a bare name looked up in ``configs/`` (``seg_cpu`` → ``configs/seg_cpu.yaml``)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    known = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))) or "none"
    raise ConfigError(f"config {name_or_path} not found (neither a file nor one of configs/: {known})")


def load_config(name_or_path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a YAML config and apply ``overrides`` (``None`` values are ignored)."""
    path = resolve_config_path(name_or_path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return apply_overrides(cfg, overrides or {})


def apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(cfg))  # deep copy via plain types
    for key, value in overrides.items():
        if value is None:
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return out


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
