"""Configs are dataclasses: saved as YAML next to caches and checkpoints, loaded with ``safe_load``,
overridden from the command line with dotted ``key=value`` pairs (``model.depth=4``)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from voxseq import VoxseqError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict (lists, not tuples) of a config dataclass, ready for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error message is the useful one
            return _coerce(options[0], value, where)
        for a in options:
            try:
                return _coerce(a, value, where)
            except (VoxseqError, TypeError, ValueError):
                continue
        raise VoxseqError(f"{where}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise VoxseqError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise VoxseqError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise VoxseqError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any or tp is object:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise VoxseqError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise VoxseqError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise VoxseqError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise VoxseqError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build a config dataclass from a dict, checking names and types; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        prefix = f"{where}." if where else ""
        near = {u: m[0] for u in sorted(unknown) if (m := difflib.get_close_matches(u, names, n=1, cutoff=0.6))}
        hint = ", ".join(prefix + m + ("" if len(unknown) == 1 else f" for {prefix + u}") for u, m in near.items())
        hint = f"; did you mean {hint}?" if hint else ""
        raise VoxseqError(f"unknown config field(s) {', '.join(prefix + u for u in sorted(unknown))}{hint} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def require_at_least(cfg: Any, minimum: int, *names: str) -> None:
    """One clear error for the first of ``names`` whose value on ``cfg`` is below ``minimum``."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise VoxseqError(f"{name} must be >= {minimum}, not {getattr(cfg, name)}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.depth=4"`` -> (["model", "depth"], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise VoxseqError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise VoxseqError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested dict (in place) and return it."""
    for text in overrides:
        keys, value = parse_override(text)
        d = data
        for k in keys[:-1]:
            if not isinstance(d.get(k), dict):
                d[k] = {} if d.get(k) is None else d[k]
                if not isinstance(d[k], dict):
                    raise VoxseqError(f"override {text!r}: {k} is not a section")
            d = d[k]
        d[keys[-1]] = value
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise VoxseqError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise VoxseqError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VoxseqError(f"{path}: a config file must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Config from a YAML file (optional) plus dotted overrides, checked against ``cls``."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def dump_yaml(data: dict[str, Any] | Any) -> str:
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    return yaml.safe_dump(data, sort_keys=False)


def save_yaml(data: dict[str, Any] | Any, path: str | os.PathLike) -> Path:
    """Write YAML atomically (temp file, fsync, rename)."""
    from voxseq.files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, dump_yaml(data))
