"""The JSON form of the resolved job's dataclasses, read back strictly: every field checked against its type hint.

The ledger's params_json and the pool's `run` command carry this form; `read` is their only reader. It checks
shape and types only (the manifest reader has already checked ranges) and must not read files or fill in defaults.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, Union

T = TypeVar("T")


class JobDataError(ValueError):
    """Stored or sent job data that does not have the resolved job's shape; names the field and the value."""


def write(obj: Any) -> Any:
    """A dataclass (or a value inside one) as plain JSON values: tuples become lists, paths strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        if to_dict is not None:
            return to_dict()
        return {f.name: write(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [write(item) for item in obj]
    if isinstance(obj, dict):
        return {str(key): write(value) for key, value in obj.items()}
    return obj


def read(cls: type[T], data: Any, where: str = "job") -> T:
    """`data` (JSON values) as an instance of the dataclass `cls` (its own fields; nested dataclasses with a
    `from_dict(data, where)` are read by it); JobDataError names the first wrong field.

    A field without a default must be present (what `write` made has it, so a missing one was dropped on the
    way); a field with a default may be absent: it was added later, and data written before reads as it did.
    Keys that name a property of the class (derived values a `to_dict` adds, such as video.width) are
    skipped; any other unknown key is an error.
    """
    return _dataclass(cls, data, where)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise JobDataError(f"{where}: got {data!r}, expected an object of {cls.__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    derived = {name for name, value in vars(cls).items() if isinstance(value, property)}
    unknown = sorted(set(data) - set(fields) - derived)
    if unknown:
        raise JobDataError(f"{where}.{unknown[0]}: not a field of {cls.__name__} ({', '.join(fields)})")
    hints = _hints(cls)
    values = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise JobDataError(f"{where}.{name}: missing")
            continue
        values[name] = _value(hints[name], data[name], f"{where}.{name}")
    return cls(**values)


def _value(hint: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return data
    if origin in (Union, types.UnionType):
        return _union(typing.get_args(hint), data, where)
    if dataclasses.is_dataclass(hint):
        reader = getattr(hint, "from_dict", None)  # a class with its own reader (the Job) knows its form best
        return reader(data, where) if reader is not None else _dataclass(hint, data, where)
    if origin is tuple:
        return _tuple(typing.get_args(hint), data, where)
    if origin is list:
        if not isinstance(data, list):
            raise JobDataError(f"{where}: got {data!r}, expected a list")
        return [_value(typing.get_args(hint)[0], item, f"{where}[{i}]") for i, item in enumerate(data)]
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(data, dict) or not all(isinstance(key, key_type) for key in data):
            raise JobDataError(f"{where}: got {data!r}, expected an object")
        return {key: _value(value_type, item, f"{where}.{key}") for key, item in data.items()}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(data)
        except ValueError:
            raise JobDataError(f"{where}: got {data!r}, expected one of "
                               f"{', '.join(str(m.value) for m in hint)}") from None
    return _scalar(hint, data, where)


def _union(options: tuple[Any, ...], data: Any, where: str) -> Any:
    if data is None:
        if type(None) in options:
            return None
        raise JobDataError(f"{where}: got null, expected a value")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _value(option, data, where)
        except JobDataError as exc:
            errors.append(str(exc))
    raise JobDataError(errors[-1] if len(errors) == 1 else f"{where}: got {data!r}, expected "
                       + " or ".join(_name(o) for o in options if o is not type(None)))


def _tuple(args: tuple[Any, ...], data: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(data, (list, tuple)):
        raise JobDataError(f"{where}: got {data!r}, expected a list")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_value(args[0], item, f"{where}[{i}]") for i, item in enumerate(data))
    if len(data) != len(args):
        raise JobDataError(f"{where}: got {len(data)} values, expected {len(args)}")
    return tuple(_value(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(args, data, strict=True)))


def _scalar(hint: Any, data: Any, where: str) -> Any:
    # JSON true/false decode to bool, a subclass of int: a step count of `true` is garbage, not 1.
    if hint is bool and isinstance(data, bool):
        return data
    if hint is int and isinstance(data, int) and not isinstance(data, bool):
        return data
    if hint is float and isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if hint is str and isinstance(data, str):
        return data
    if hint is Path and isinstance(data, str):
        return Path(data)
    raise JobDataError(f"{where}: got {data!r}, expected {_name(hint)}")


def _name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
