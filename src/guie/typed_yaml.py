"""Typed configs from YAML: dataclasses built recursively, unknown keys and wrong types rejected with the key's path.

Why by hand: dacite/omegaconf would do it, but this is 60 lines and gives errors naming the recipe file and key.

A mapping of *overrides* of another dataclass's fields (e.g. a model's preprocessing: only the keys given replace
the backbone's own values) is declared with `overrides_of(Cls)`: its keys and values are checked against `Cls`'s
fields here, and `Cls(**value)` must accept them, so its errors carry the file and key path too.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import InputError

T = TypeVar("T")


class ConfigError(InputError):
    """A recipe that cannot be used; the message names the file and the key."""


_OVERRIDES_OF = "guie.overrides_of"


def overrides_of(cls: type) -> Any:
    """A dataclass field holding a mapping of (some of) `cls`'s fields, default empty, typed and validated on load."""
    return dataclasses.field(default_factory=dict, metadata={_OVERRIDES_OF: cls})


def _build_overrides(cls: type, value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in value if k not in names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {names}")
    built = {k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()}
    try:
        cls(**built)  # the class's own checks (ranges, choices) on top of the defaults
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return built


def _build(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        last_err = None
        for a in non_none:
            try:
                return _build(a, value, where)
            except ConfigError as e:
                last_err = e
        raise last_err or ConfigError(f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        items = [_build(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _build(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any or tp is object:
        return value
    if tp in (dict, list) and isinstance(value, tp):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-4" as a string
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is Path and isinstance(value, (str, Path)):
        return Path(os.path.expandvars(os.path.expanduser(str(value))))
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a dict, recursively; unknown keys raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    overrides = {f.name: f.metadata[_OVERRIDES_OF] for f in dataclasses.fields(cls) if _OVERRIDES_OF in f.metadata}
    kwargs = {k: _build_overrides(overrides[k], v, f"{where}.{k}") if k in overrides
              else _build(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # shipped recipes: package data, in the wheel too


def shipped_recipes() -> dict[str, Path]:
    """The recipes guie ships (src/guie/recipes/*.yaml): name (file name without .yaml) -> path."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: `name_or_path` itself when it is a file, else the shipped recipe of that name (with or
    without .yaml, e.g. "emoji-lite0-cpu"). ConfigError naming both places when neither exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    raise ConfigError(f"{name_or_path}: recipe not found (no such file, and not one of the shipped recipes: "
                      f"{', '.join(shipped) or 'none'})")


def load_yaml_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read a YAML recipe (a file, or a shipped recipe's name) into `cls`, applying `key.sub=value` overrides
    (values parsed as YAML)."""
    path = find_recipe(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML{_yaml_error_summary(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = _unshared(data)
    for item in overrides or []:
        try:
            apply_override(data, item)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return from_dict(cls, data, where=str(path))


def _unshared(node):
    """A copy in which every mapping and list is its own object: a YAML alias (`distill: *distill`) loads as the
    anchor's very object, so without this an override of one stage's aliased key would change every stage's."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def _yaml_error_summary(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: ' at line L, column C: problem'."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"


def apply_override(data: dict, item: str) -> None:
    """Set data['a']['b'] = yaml(value) for 'a.b=value'; list items by index ('stages.0.lr=0.1')."""
    key, sep, raw = item.partition("=")
    if not sep or not key or "" in key.split("."):
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: invalid YAML value{_yaml_error_summary(e)}") from None
    parts = key.split(".")
    node: Any = data
    for depth, p in enumerate(parts):
        path = ".".join(parts[:depth]) or "the recipe"
        if isinstance(node, list):
            if not p.lstrip("-").isdigit():
                raise ConfigError(f"override {item!r}: {path} is a list; index it by number (0..{len(node) - 1})")
            i = int(p)
            if not 0 <= i < len(node):
                raise ConfigError(f"override {item!r}: {path} has {len(node)} item(s), so {p} is out of range "
                                  f"(0..{len(node) - 1})")
            if depth == len(parts) - 1:
                node[i] = value
            else:
                node = node[i]
        elif isinstance(node, dict):
            if depth == len(parts) - 1:
                node[p] = value
            else:
                node = node.setdefault(p, {})
        else:
            raise ConfigError(f"override {item!r}: {path} is {node!r}, not a mapping or list")


def to_dict(obj) -> dict:
    """Dataclass -> plain dict (Paths as strings) for writing the resolved recipe."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return conv(obj)
