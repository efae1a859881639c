"""Typed dataclass configs from YAML, with `--set a.b=c` overrides.

Why hand-rolled rather than a framework: the configs are plain dataclasses (importable
anywhere, picklable to Ray workers), and we want errors that name the dotted field
(`ingest.crop_size: expected int, got 'big'`) as early as possible, before any cluster
work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from cohortcast.errors import CohortcastError

T = TypeVar("T")


class ConfigError(CohortcastError, ValueError):
    """A config value is missing, unknown or invalid; the message names the field."""


def require(ok: bool, where: str, message: str) -> None:
    """For `validate()` methods: raise ConfigError naming the field unless `ok`."""
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert where lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


# A dataclass with a `from_flavor(name)` classmethod accepts this key in its mapping: the
# named instance is the base the mapping's other keys override (model.flavor, presets.py).
FLAVOR_KEY = "flavor"


def _names_flavor(cls: Any, data: Any) -> bool:
    return isinstance(data, dict) and FLAVOR_KEY in data and callable(getattr(cls, "from_flavor", None))


def _apply_flavor(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` without its flavour key, laid over the flavour's values (explicit keys win)."""
    if not _names_flavor(cls, data):
        return data
    rest = {k: v for k, v in data.items() if k != FLAVOR_KEY}
    try:
        base = cls.from_flavor(data[FLAVOR_KEY])
    except ConfigError as exc:
        raise ConfigError(f"{_join(where, FLAVOR_KEY)}: {exc}") from None
    return _merged_section(base, rest)


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every field's type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    data = _apply_flavor(cls, data, where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{_join(where, key)}: unknown field{hint}; known: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            value = data[name]
            if isinstance(value, dict) and field.default_factory is not dataclasses.MISSING:
                # A partial section overrides the field's own default (e.g. a factory
                # StageConfig(lr=1e-3)), not the bare class defaults.
                # A section naming a flavour starts from the flavour instead (applied
                # by the section's own from_dict, below).
                default = field.default_factory()
                if dataclasses.is_dataclass(default) and not _names_flavor(type(default), value):
                    value = _merged_section(default, value)
            kwargs[name] = _coerce(value, hints[name], _join(where, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required field is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{where + '.' if where else ''}{exc}") from None
    return obj


def _merged_section(default: Any, update: dict[str, Any]) -> dict[str, Any]:
    """`update` over the dataclass instance `default`: nested sections merge, any other
    value (a list, or a mapping such as a Tune grid) replaces the default whole."""
    out = to_dict(default)
    for key, value in update.items():
        current = getattr(default, key, None)
        merge = (
            isinstance(value, dict) and dataclasses.is_dataclass(current) and not _names_flavor(type(current), value)
        )  # a flavour replaces the default (from_dict)
        out[key] = _merged_section(current, value) if merge else value
    return out


def _join(prefix: str, key: Any) -> str:
    # A prefix given with its separator ("model.denoiser.") must not double the dot.
    prefix = prefix.rstrip(".")
    return f"{prefix}.{key}" if prefix else str(key)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML and JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"ingest.crop_size": 64, ...}`: the shape MLflow params and Tune spaces want."""
    out: dict[str, Any] = {}
    items = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    for key, value in items.items():
        name = _join(prefix, key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"ingest.hu_window=[-1000, 400]"` -> (["ingest", "hu_window"], [-1000, 400])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. ingest.crop_size=64")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict; unknown keys are caught later by `from_dict`."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML file <- `--set` overrides, validated; errors name the field."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides or []))
    where = str(path) if path else ""
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{where + ': ' if where else ''}{exc}") from None


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
