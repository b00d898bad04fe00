"""Strict dotted overrides over nested frozen dataclasses, and their JSON form.

Generic machinery; it knows no dsax config (those, with their validation, are
in ``dsax.config``, which builds ``override`` and ``from_dict`` on this).

- ``parse(value, typ, key)``: a command-line string (or a Python value) into a
  field's type (bool, int, float, str, Optional, tuple of those).
- ``apply(cfg, "a.b.c", value)``: a new config with one dotted key replaced.
  Tuples of dataclasses that carry a ``name`` field (the phases of a run) are
  addressed by that name or by index: ``phases.warmup.steps`` or
  ``phases.1.steps``. An unknown key, a group set as a whole, or a value of the
  wrong type raises ``ConfigError`` naming the key.
- ``renamed``: a table ``{class name: {old key: new key}}`` (keys dotted below
  the class) of replaced keys; ``apply`` and ``from_dict`` refuse an old key
  with an error naming its replacement.
- ``to_dict`` / ``from_dict`` / ``dumps``: the JSON-ready view and its strict
  inverse; ``leaves``: a dataclass's leaf values by dotted name.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Mapping

# Replaced keys: class name -> {old key: new key}, dotted below the class.
Renamed = Mapping[str, Mapping[str, str]]


class ConfigError(ValueError):
  """A configuration key or value is invalid; the message names the key."""


def parse(value: Any, typ: Any, key: str) -> Any:
  """Parses a command-line string (or passes a Python value) into ``typ``."""
  origin = typing.get_origin(typ)
  if origin is typing.Union:
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if value is None or (isinstance(value, str) and value.lower() == "none"):
      return None
    return parse(value, args[0], key)
  if typ is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
      return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"{key}: expected a bool, got {value!r}")
  if typ is int:
    if isinstance(value, bool):
      raise ConfigError(f"{key}: expected an int, got {value!r}")
    if isinstance(value, int):
      return value
    try:
      return int(str(value).replace("_", ""))
    except ValueError:
      raise ConfigError(f"{key}: expected an int, got {value!r}") from None
  if typ is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    try:
      return float(value)
    except ValueError:
      raise ConfigError(f"{key}: expected a float, got {value!r}") from None
  if typ is str:
    if not isinstance(value, str):
      raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value
  if origin is tuple:
    if isinstance(value, str):
      value = [v for v in value.split(",") if v.strip()]
    args = typing.get_args(typ)
    elem = args[0] if args else str
    return tuple(parse(v.strip() if isinstance(v, str) else v, elem, key)
                 for v in value)
  raise ConfigError(f"{key}: cannot override a field of type {typ}")


def _field_types(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def entry(items: tuple, head: str, full: str) -> int:
  """The index of the entry ``head`` (a name or an index) of a tuple."""
  index = None
  if head.isdigit():
    index = int(head)
  else:
    for i, item in enumerate(items):
      if getattr(item, "name", None) == head:
        index = i
  if index is None or index >= len(items):
    names = [getattr(o, "name", str(i)) for i, o in enumerate(items)]
    raise ConfigError(f"unknown key {full!r}: no entry {head!r} in {names}")
  return index


def _set(obj: Any, parts: list[str], value: Any, full: str,
         renamed: Renamed) -> Any:
  if isinstance(obj, tuple):
    index = entry(obj, parts[0], full)
    if len(parts) == 1:
      raise ConfigError(f"{full}: cannot replace a whole entry")
    items = list(obj)
    items[index] = _set(items[index], parts[1:], value, full, renamed)
    return tuple(items)
  if not dataclasses.is_dataclass(obj):
    raise ConfigError(f"unknown key {full!r}")
  head = parts[0]
  types = _field_types(type(obj))
  if head not in types:
    new = renamed.get(type(obj).__name__, {}).get(head)
    if new:
      prefix = full.split(".")[:len(full.split(".")) - len(parts)]
      raise ConfigError(f"unknown key {full!r}: replaced by "
                        f"{'.'.join(prefix + [new] + parts[1:])!r}")
    known = ", ".join(sorted(types))
    raise ConfigError(f"unknown key {full!r} ({head!r} is not one of: {known})")
  current = getattr(obj, head)
  if len(parts) == 1:
    if dataclasses.is_dataclass(current):
      raise ConfigError(f"{full}: is a group; set one of its fields")
    new = parse(value, types[head], full)
  else:
    new = _set(current, parts[1:], value, full, renamed)
  return dataclasses.replace(obj, **{head: new})


def apply(cfg: Any, key: str, value: Any, renamed: Renamed | None = None
          ) -> Any:
  """``cfg`` with the dotted ``key`` set to ``value`` (parsed into the
  field's type); no validation beyond the key and the type."""
  return _set(cfg, key.split("."), value, key, renamed or {})


def pairs(overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
  """Overrides as ``{key: value}``, from a dict or ``["a.b=v", ...]``."""
  if not isinstance(overrides, (list, tuple)):
    return overrides
  out = {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like key=value")
    k, v = item.split("=", 1)
    out[k.strip()] = v
  return out


def to_dict(cfg: Any) -> Any:
  """A JSON-ready view of a config (nested dicts and lists)."""
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)}
  if isinstance(cfg, (list, tuple)):
    return [to_dict(v) for v in cfg]
  return cfg


def from_dict(cls: type, data: dict[str, Any], prefix: str = "",
              renamed: Renamed | None = None) -> Any:
  """Inverse of ``to_dict`` for a dataclass type; unknown keys are errors
  (a replaced key's names its replacement, from ``renamed``). ``prefix``: the
  dotted key of ``data`` in the whole config, for the messages."""
  renamed = renamed or {}
  types = _field_types(cls)
  kwargs = {}
  for key, value in data.items():
    if key not in types:
      new = renamed.get(cls.__name__, {}).get(key)
      if new:
        raise ConfigError(f"unknown key {prefix + key!r} for {cls.__name__}: "
                          f"replaced by {prefix + new!r}")
      raise ConfigError(f"unknown key {prefix + key!r} for {cls.__name__}")
    typ = types[key]
    if dataclasses.is_dataclass(typ):
      kwargs[key] = from_dict(typ, value, f"{prefix}{key}.", renamed)
    elif typing.get_origin(typ) is tuple:
      elem = typing.get_args(typ)[0]
      kwargs[key] = tuple(
          from_dict(elem, v, f"{prefix}{key}.{v.get('name', i)}.", renamed)
          if dataclasses.is_dataclass(elem) else v
          for i, v in enumerate(value))
    else:
      kwargs[key] = value
  return cls(**kwargs)


def dumps(cfg: Any) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
  """A dataclass's leaf values by dotted field name; a tuple of dataclasses
  (the phases of a run) is entered by each entry's name, else its index:
  ``phases.sparse.optim.lr``."""
  out = {}
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      out.update(leaves(value, f"{prefix}{f.name}."))
    elif (isinstance(value, tuple) and value
          and all(dataclasses.is_dataclass(v) for v in value)):
      for i, v in enumerate(value):
        out.update(leaves(v, f"{prefix}{f.name}.{getattr(v, 'name', i)}."))
    else:
      out[prefix + f.name] = value
  return out
