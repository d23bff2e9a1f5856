"""Typed config sections: dataclass fields with a help line and checks (`f`), built from plain data with every
error naming the full dotted key (`_build`, `_convert`), and turned back into plain data (`config_to_dict`).

`llmrl.config` and `llmrl.config_supervised` declare the sections of every command with these; `llmrl.config_loader`
loads them (`load_config`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import operator
import types
import typing
from dataclasses import MISSING, field, fields
from typing import Any, Mapping, Sequence


class ConfigError(ValueError):
    """A config file, key, value or override is invalid; the message says which and why."""


def f(default: Any = MISSING, help: str = "", **checks: Any) -> Any:
    """A dataclass field with a help line and optional checks: choices=(...), ge=, gt=, le=, lt=."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-safe data (dicts, lists, scalars) in field order; tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {fd.name: config_to_dict(getattr(cfg, fd.name)) for fd in fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(field name, default repr, help) for each field of a config section class."""
    return [(fd.name, "required" if (d := _default(fd)) is MISSING else repr(d), fd.metadata.get("help", ""))
            for fd in fields(cls)]


def _default(fd: dataclasses.Field) -> Any:
    return fd.default_factory() if fd.default_factory is not MISSING else fd.default


def _not_one_of(key: str, value: Any, valid: Sequence[str]) -> str:
    msg = f"{key} {value!r} is not one of: {', '.join(valid) or '(none)'}"
    close = difflib.get_close_matches(str(value), valid, n=1)
    return msg + (f" (did you mean {close[0]!r}?)" if close else "")


def _unknown(key: str, where: str, valid: Sequence[str]) -> ConfigError:
    scope = f"valid keys in {where!r}" if where else "valid top-level keys"
    msg = f"unknown key {key!r}; {scope}: {', '.join(sorted(valid))}"
    close = difflib.get_close_matches(key.rpartition(".")[2], valid, n=1)
    return ConfigError(msg + (f" (did you mean {close[0]!r}?)" if close else ""))


_CHECKS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _build(cls: type, data: Any, prefix: str) -> Any:
    if isinstance(data, cls):
        data = config_to_dict(data)
    if isinstance(data, str) and getattr(cls, "shorthand", None):   # e.g. a reward term given by its name alone
        data = {cls.shorthand: data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix} must be a mapping of keys, got {data!r}")
    hints, fds = typing.get_type_hints(cls), {fd.name: fd for fd in fields(cls)}
    for key in data:
        if key not in fds:
            raise _unknown(f"{prefix}.{key}" if prefix else str(key), prefix, list(fds))
    values = {}
    for name, fd in fds.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if _default(fd) is MISSING:
                raise ConfigError(f"{key} is required")
            continue
        value = values[name] = _convert(data[name], hints[name], key)
        if value is None:
            continue
        if "choices" in fd.metadata and value not in fd.metadata["choices"]:
            raise ConfigError(_not_one_of(key, value, fd.metadata["choices"]))
        for check, (test, word) in _CHECKS.items():
            if check in fd.metadata and not test(value, fd.metadata[check]):
                raise ConfigError(f"{key} must be {word} {fd.metadata[check]}, got {value!r}")
    return cls(**values)


_SIMPLE = {  # annotation -> (what the error says it must be, test)
    bool: ("a bool (true/false)", lambda v: isinstance(v, bool)),
    int: ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("a mapping", lambda v: isinstance(v, Mapping)),
}


def _convert(value: Any, tp: Any, key: str, nullable: bool = False) -> Any:
    """Check `value` against the annotation `tp` and return it in that type, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):           # only `X | None` is used
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _convert(value, inner, key, nullable=True)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float:                                           # ints are fine; YAML reads '3e-6' as a string
        what, x = "a number", value
        with contextlib.suppress(ValueError):
            x = float(value) if isinstance(value, str) else value
        if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x):
            return float(x)
    elif tp in _SIMPLE:
        what, test = _SIMPLE[tp]
        if test(value):
            return copy.deepcopy(dict(value)) if tp is dict else value
    elif origin is tuple:
        what = f"a list of {len(args)} values"
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is list:
        what = "a list"
        if isinstance(value, (list, tuple)):
            return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    else:
        raise TypeError(f"config field {key} has an unsupported type {tp!r}")
    raise ConfigError(f"{key} must be {what}{' or null' if nullable else ''}, got {value!r}")


def sections(schema: type) -> dict[str, type]:
    """{section name: its dataclass} of a config schema (a `X | None` section gives X)."""
    hints = typing.get_type_hints(schema)
    out = {}
    for fd in fields(schema):
        tp = hints[fd.name]
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        if dataclasses.is_dataclass(tp):
            out[fd.name] = tp
    return out


def _nullable(schema: type, section: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(schema)[section])
