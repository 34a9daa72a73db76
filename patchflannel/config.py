"""Typed configs: YAML files validated against pydantic schemas, ``--set`` overrides, hashes.

A config is a YAML file (``configs/NAME.yaml`` or any path) validated
against the schema of the command that reads it (``SegTrainConfig``,
``PatchTrainConfig``, ``EnsembleConfig``, in the training modules). Unknown
keys, wrong types and out-of-range values fail with one message naming the
key, the problem and the valid keys; a missing key takes the schema's
default. ``--set section.key=value`` overrides any value (the value is
parsed as YAML, so ``--set train.epochs=40`` is an int and
``--set learners=[resnet18]`` a list). The resolved config is written to
the run folder; :func:`config_hash` fingerprints it for resume checks.

Where a config name is looked up (first hit wins): a path that exists;
``$PATCHFLANNEL_HOME/configs/NAME.yaml``; the configs shipped with the
package.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

__all__ = [
    "Section",
    "apply_sets",
    "config_hash",
    "config_to_yaml",
    "diff_configs",
    "load_config",
    "resolve_config_path",
    "shipped_dir",
]

S = TypeVar("S", bound="Section")


class Section(BaseModel):
    """Base of every config schema: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def shipped_dir(kind: str) -> Path:
    """Folder of the files shipped with the package (``configs``, ``weights``, ``samples``).

    Inside an installed wheel they sit in the package folder; in a source
    checkout (and an editable install) at the repository root.
    """
    pkg = Path(__file__).resolve().parent
    for cand in (pkg / kind, pkg.parent / kind):
        if cand.is_dir():
            return cand
    return pkg / kind


def _config_dirs() -> list[Path]:
    dirs = []
    home = os.environ.get("PATCHFLANNEL_HOME")
    if home:
        dirs.append(Path(home).expanduser() / "configs")
    dirs.append(shipped_dir("configs"))
    return dirs


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A YAML path, or a bare name (``seg_cpu``) looked up in ``$PATCHFLANNEL_HOME/configs`` then the shipped configs."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if p.exists():
        raise ConfigError(f"config {p} is not a file")
    for d in _config_dirs():
        for cand in (d / p, d / f"{p}.yaml"):
            if cand.is_file():
                return cand
    known = sorted({f.stem for d in _config_dirs() if d.is_dir() for f in d.glob("*.yaml")})
    raise ConfigError(f"config {name_or_path} not found: neither a file nor a name of "
                      f"{', '.join(map(str, _config_dirs()))} (known: {', '.join(known) or 'none'})")


def _parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=40")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc.problem if hasattr(exc, 'problem') else exc})") from None
    return parts, value


def apply_sets(raw: dict[str, Any], sets: list[str] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of ``raw`` with ``--set`` items and dotted ``overrides`` applied (``None`` overrides are skipped)."""
    out = json.loads(json.dumps(raw, default=str))
    items: list[tuple[list[str], Any]] = [_parse_set(s) for s in sets or []]
    items = [(k.split("."), v) for k, v in (overrides or {}).items() if v is not None] + items
    for parts, value in items:
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                if nxt is not None:
                    raise ConfigError(f"cannot set {'.'.join(parts)}: {part} is a value, not a section")
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return out


def _schema_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    node: Any = schema
    for part in loc:
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return None
        field = node.model_fields.get(str(part))
        if field is None:
            return None
        node = field.annotation
        args = getattr(node, "__args__", None)
        if args:  # Optional[Section] and friends
            node = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), node)
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def format_validation_error(exc: ValidationError, schema: type[BaseModel], source: str) -> str:
    """One readable line per problem, naming the key, what is wrong and the valid keys."""
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _schema_at(schema, loc[:-1])
            valid = ", ".join(parent.model_fields) if parent is not None else "?"
            where = f" in section {'.'.join(loc[:-1])}" if loc[:-1] else ""
            problems.append(f"unknown key {key!r}{where} (valid keys: {valid})")
        elif err["type"] == "missing":
            problems.append(f"missing key {key!r}")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{key}: {err['msg']}{got_s}")
    return f"{source}: " + "; ".join(problems)


def validate_config(schema: type[S], raw: Any, source: str) -> S:
    """``raw`` (a mapping) validated against ``schema``; :class:`ConfigError` otherwise."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, schema, source)) from None


def load_config(schema: type[S], name_or_path: str | os.PathLike[str] | None, sets: list[str] | None = None,
                overrides: dict[str, Any] | None = None) -> S:
    """Load, override and validate a config.

    ``name_or_path`` None means the schema's defaults. ``overrides`` are dotted
    keys from dedicated CLI flags (``None`` = flag not given); ``sets`` are
    ``--set KEY=VALUE`` items and win over both.
    """
    if name_or_path is None:
        raw: Any = {}
        source = f"{schema.__name__} defaults"
    else:
        path = resolve_config_path(name_or_path)
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    merged = apply_sets(raw or {}, sets, overrides)
    label = source + (" with overrides" if sets or any(v is not None for v in (overrides or {}).values()) else "")
    return validate_config(schema, merged, label)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: BaseModel | dict[str, Any]) -> str:
    data = config_to_dict(cfg) if isinstance(cfg, BaseModel) else cfg
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# Keys added after run folders existed: a run whose config lacks one ran as if it had this value, so a key at
# this value hashes and compares as absent (older runs resume and keep their cached votes). Matched at the top
# level of a config and under "config." (train-patch checkpoints nest it).
ADDED_DEFAULTS: dict[str, Any] = {"split.train_fraction": 1.0, "split.subset_seed": None,
                                  "input.blank_lungs_global": False}


def _drop_added(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a JSON copy, changed in place) without the :data:`ADDED_DEFAULTS` keys that hold their value."""
    roots = [data] + ([data["config"]] if isinstance(data.get("config"), dict) else [])
    for root in roots:
        for key, value in ADDED_DEFAULTS.items():
            *path, last = key.split(".")
            node: Any = root
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and last in node and node[last] == value:
                del node[last]
    return data


def config_hash(cfg: BaseModel | dict[str, Any], exclude: set[str] | frozenset[str] = frozenset()) -> str:
    """SHA-256 (16 hex) of the config's canonical JSON, without the dotted keys in ``exclude`` (and the
    :data:`ADDED_DEFAULTS` keys at their value)."""
    data = _drop_added(config_to_dict(cfg) if isinstance(cfg, BaseModel) else json.loads(json.dumps(cfg, default=str)))
    for key in exclude:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def diff_configs(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as ``key: old → new`` (an :data:`ADDED_DEFAULTS` key at its value
    counts as absent)."""
    if not prefix:
        old = _drop_added(json.loads(json.dumps(old, default=str)))
        new = _drop_added(json.loads(json.dumps(new, default=str)))
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, dotted + ".")
        elif a != b:
            out.append(f"{dotted}: {a!r} → {b!r}")
    return out
