"""JSON round-trip for the frozen config dataclasses that every stage uses.

Tuples stay tuples and nested dataclasses come back as their class, so
``from_dict(cls, to_dict(config)) == config`` holds for every stage config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from hnseg_keras.errors import HnsegError
from hnseg_keras.files import write_json_atomic  # noqa: F401  (re-exported: the JSON home of the configs)

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a dict, converting lists back to tuples and nested dicts to dataclasses.

    Unknown keys raise HnsegError naming the key and the accepted ones.
    """
    if not isinstance(data, dict):
        raise HnsegError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise HnsegError(f"{cls.__name__}: unknown key(s) {unknown}; accepted keys: {sorted(names)}")
    return cls(**{key: _convert(hints[key], value) for key, value in data.items()})


def _convert(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for option in typing.get_args(hint):
            if option is not type(None):
                return _convert(option, value)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item) for item in value)
        return tuple(_convert(arg, item) for arg, item in zip(args, value, strict=False))
    if hint is float and isinstance(value, int):
        return float(value)
    return value


def replace_from_overrides(config: T, overrides: list[str]) -> T:
    """Apply ``key=value`` command-line overrides (value parsed as JSON, else kept as a string).

    Nested dataclass fields use dots: ``augment.mixup=false``.
    """
    data = to_dict(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise HnsegError(f"override {item!r} is not of the form key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            if not isinstance(target.get(parent), dict):
                raise HnsegError(f"override {item!r}: {parent!r} is not a config section")
            target = target[parent]
        if leaf not in target:
            raise HnsegError(f"override {item!r}: unknown key {leaf!r}; accepted: {sorted(target)}")
        target[leaf] = value
    return from_dict(type(config), data)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a missing or malformed file into a one-line HnsegError."""
    path = Path(path)
    if not path.is_file():
        raise HnsegError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HnsegError(f"{path}: not valid JSON ({error})") from None
