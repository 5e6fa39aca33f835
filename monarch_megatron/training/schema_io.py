"""Generic, typed YAML -> dataclass loading with error messages that name the key.

Every error is a :class:`ConfigError` whose message reads
``config error: <dotted.path[index].key>: <what is wrong>``, e.g.
``config error: phases[1].seq_lenght: unknown key (did you mean seq_length?)``. The launchers
print it and exit with code 2, before any process group or accelerator is touched.

Overrides are ``key=value`` strings with dotted paths into the raw YAML tree (list items by
index: ``phases.0.steps=5``); values are parsed as YAML scalars/flow collections
(``5`` -> int, ``null`` -> None, ``[fc1,fc2]`` -> list).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """An invalid configuration; ``str(err)`` is the full user-facing message."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"config error: {path}: {message}" if path else f"config error: {message}")


def join(path: str, key: str | int) -> str:
    """Dotted path of ``key`` below ``path`` (list indices in brackets)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if value is not None else "null"


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type annotation ``tp`` and return it in canonical form.

    ints are accepted where floats are expected (YAML writes ``1`` for ``1.0``); bools are never
    accepted as numbers, nor are NaN and infinities; lists become tuples where the annotation says tuple.
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigError(path, f"must be one of {', '.join(map(repr, choices))}, got {_describe(value)}{extra}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
        item = get_args(tp)[0]
        items = [convert(item, v, join(path, i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_describe(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string; accept what float() reads.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):  # .nan / .inf: no setting of a run means them
            raise ConfigError(path, f"must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def check_keys(cls: type, data: dict, path: str) -> None:
    """Raise for the first key of ``data`` that is not a field of ``cls`` (with a suggestion)."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            extra = f" (did you mean {hint[0]}?)" if hint else f" (valid keys: {', '.join(names)})"
            raise ConfigError(join(path, str(key)), f"unknown key{extra}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Instantiate dataclass ``cls`` from the mapping ``data`` with full type checking.

    Missing fields take their defaults; a missing field without a default is an error.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path or "<top level>", f"expected a mapping, got {_describe(data)}")
    check_keys(cls, data, path)
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = convert(hints[f.name], data[f.name], join(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(join(path, f.name), "required key is missing")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``"phases.0.steps=5"`` -> (``["phases", 0, "steps"]``, 5)."""
    if "=" not in text:
        raise ConfigError("", f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("", f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(key, f"cannot parse override value {raw!r}: {err}") from None
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    return parts, value


def apply_override(tree: dict, parts: list[str | int], value: Any) -> None:
    """Set ``value`` at ``parts`` in the raw YAML ``tree`` (creating mappings on the way)."""
    node: Any = tree
    path = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, int):
            if not isinstance(node, list):
                raise ConfigError(path, f"override index [{part}] on a non-list")
            if part >= len(node):
                raise ConfigError(join(path, part), f"index out of range (the list has {len(node)} items)")
            if last:
                node[part] = value
            elif node[part] is None:
                node[part] = {}
            path = join(path, part)
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(path, f"cannot set key {part!r} on a non-mapping ({_describe(node)})")
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            path = join(path, part)


def load_yaml(path: str) -> dict:
    """The raw YAML mapping of ``path`` (errors name the file)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping")
    return data


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples -> plain dicts/lists (for YAML/JSON dumps and hashing)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


__all__ = ["ConfigError", "apply_override", "build", "convert", "load_yaml", "parse_override", "to_plain"]
