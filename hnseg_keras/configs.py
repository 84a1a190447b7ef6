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


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build ``cls`` from a dict, converting lists back to tuples and nested dicts to dataclasses.

    Every value is checked against its field's type (a bool takes only true/false, an int refuses
    "abc"); unknown keys and wrong types raise HnsegError naming the dotted key (``where`` prefixes it).
    """
    if not isinstance(data, dict):
        raise HnsegError(f"{where or cls.__name__}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = [f"{where}.{key}" if where else key for key in unknown]
        raise HnsegError(f"{cls.__name__}: unknown key(s) {keys}; accepted keys: {sorted(names)}")
    values = {key: _convert(hints[key], value, f"{where}.{key}" if where else key) for key, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise HnsegError(f"{where or cls.__name__}: invalid value ({str(error).splitlines()[0]})") from None


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a JSON object"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _refuse(key: str, hint: Any, value: Any) -> HnsegError:
    return HnsegError(f"{key}: expected {_describe(hint)}, got {json.dumps(value, default=str)}")


def _convert(hint: Any, value: Any, key: str = "value") -> Any:
    """``value`` as the field type ``hint`` wants it, or HnsegError naming ``key``."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(hint, value, key)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise HnsegError(f"{key}: expected one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise HnsegError(f"{key}: expected a section (JSON object), got {json.dumps(value, default=str)}")
        return from_dict(hint, value, key)
    if origin is tuple:
        return _convert_tuple(hint, value, key)
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise _refuse(key, origin, value)
        return value
    return _convert_scalar(hint, value, key)


def _convert_union(hint: Any, value: Any, key: str) -> Any:
    options = typing.get_args(hint)
    if value is None:
        if type(None) in options:
            return None
        raise HnsegError(f"{key}: must not be null")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert(option, value, key)
        except HnsegError as error:
            errors.append(str(error))
    nullable = " or null" if type(None) in options else ""
    raise HnsegError(f"{errors[0]}{nullable}")


def _convert_tuple(hint: Any, value: Any, key: str) -> tuple:
    if not isinstance(value, list | tuple):
        raise HnsegError(f"{key}: expected a list, got {json.dumps(value, default=str)}")
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if len(value) != len(args):
        raise HnsegError(f"{key}: expected a list of {len(args)} values, got {len(value)}")
    return tuple(_convert(arg, item, f"{key}[{i}]") for i, (arg, item) in enumerate(zip(args, value, strict=True)))


def _convert_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _refuse(key, hint, value)
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _refuse(key, hint, value)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _refuse(key, hint, value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _refuse(key, hint, value)
    if hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise _refuse(key, hint, value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _refuse(key, hint, value)
    return value


def _field_hint(cls: Any, parts: list[str]) -> Any:
    """The type hint of the dotted field ``parts`` of dataclass ``cls`` (None when unknown)."""
    hint = cls
    for part in parts:
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next((o for o in typing.get_args(hint) if dataclasses.is_dataclass(o)), hint)
    return hint


def _wants_text(hint: Any) -> bool:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return str in options or Path in options


def replace_from_overrides(config: T, overrides: list[str]) -> T:
    """Apply ``key=value`` command-line overrides (value parsed as JSON, else kept as a string).

    Nested dataclass fields use dots: ``augment.mixup=false``. A string field takes the text as given
    (``--set data=123`` is the name "123"); every value is type-checked, errors name the key.
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
        if not isinstance(value, str) and value is not None and _wants_text(_field_hint(type(config), key.split("."))):
            value = raw
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
