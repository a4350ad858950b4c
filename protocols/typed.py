"""Typed dataclass configs: strict loading from dicts and commented YAML output.

A config *is* a tree of dataclasses. :func:`from_dict` rejects unknown keys and wrong types,
naming the dotted key; :func:`to_commented_yaml` writes every field with its default and the
``help`` text of its ``field(metadata=...)`` as a comment, so ``node.yaml`` documents itself.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from protocols.errors import ConfigError

__all__ = ["from_dict", "to_dict", "to_commented_yaml", "load_yaml_config", "setting"]

T = TypeVar("T")


def setting(default: Any, help: str) -> Any:  # noqa: A002 - mirrors typer's vocabulary
    """A dataclass field with a default and a help text (the YAML comment)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(
            default_factory=lambda: type(value)(value), metadata={"help": help}
        )
    return dataclasses.field(default=default, metadata={"help": help})


def _check(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {allowed}", where)
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, arm, key, where)
            except ConfigError as exc:
                errors.append(exc.what)
        raise ConfigError(f"{key}: {value!r} has the wrong type", where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, found {type(value).__name__}", where)
        return _from(tp, value, key + ".", where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, found {type(value).__name__}", where)
        (arm,) = get_args(tp) or (Any,)
        return [_check(v, arm, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, found {type(value).__name__}", where)
        karm, varm = get_args(tp) or (Any, Any)
        return {
            _check(k, karm, key, where): _check(v, varm, f"{key}.{k}", where)
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads ``1e-3`` (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, found {value!r}", where) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, found {value!r}", where)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, found {value!r}", where)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, found {value!r}", where)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, found {value!r}", where)
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}", where)


def _from(cls: Any, data: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key {prefix}{key}", where)
    kwargs = {k: _check(v, hints[k], prefix + k, where) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}", where) from None


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build ``cls`` from ``data``; missing keys take defaults, unknown keys are errors."""
    result: T = _from(cls, data or {}, "", where)
    return result


def to_dict(obj: Any) -> dict[str, Any]:
    result: dict[str, Any] = dataclasses.asdict(obj)
    return result


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def _emit(obj: Any, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        help_text = f.metadata.get("help")
        if help_text:
            for part in str(help_text).splitlines():
                lines.append(f"{pad}# {part}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _emit(value, indent + 1, lines)
        else:
            lines.append(f"{pad}{f.name}: {_yaml_scalar(value)}")


def to_commented_yaml(obj: Any, header: str = "") -> str:
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    _emit(obj, 0, lines)
    return "\n".join(lines) + "\n"


def load_yaml_config(cls: type[T], path: str) -> T:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError("config file not found", path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}".splitlines()[0], path) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError("top level must be a mapping", path)
    return from_dict(cls, data, where=path)
