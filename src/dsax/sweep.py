"""Named configs, sweep files and the summary table (stdlib only: no jax).

A named config is ``configs/NAME.py`` in the repository (next to launch.py)
defining ``get_config(arg) -> ExperimentConfig``; ``load_config("NAME:ARG")``
calls it with ``"ARG"`` (``None`` without a colon). A config file elsewhere is
given by its path: ``load_config("experiments/smollm2_dsa.py:cpu")``.

A sweep file ``experiments/X.py`` defines::

  CONFIG = "main"                       # NAME[:ARG] or PATH.py[:ARG]
  GRID = {"model.indexer.topk": [64, 128],   # cartesian product, or
          "phases.sparse.optim.lr": [1e-4, 3e-4]}
  ZIP = {...}                           # equal-length lists taken together
  BASE = {"phases.sparse.steps": 500}   # optional: applied to every run
  SUMMARY = ["sparse/val_loss"]         # optional: summary.json keys to show

Exactly one of GRID and ZIP. Each run is named from its swept values:
``model.indexer.topk=64, phases.sparse.optim.lr=1e-4`` ->
``topk-64_sparse.optim.lr-0.0001`` (the shortest dotted suffix that tells the
swept keys apart; a phase field keeps its phase name and its group:
``sparse.optim.lr`` and ``sparse.indexer_optim.lr`` are different knobs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import itertools
import math
import os
import re
import sys
from typing import Any, Sequence

from dsax.config import ConfigError, ExperimentConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

_NAME_MAX = 120  # characters in a run name before it is shortened with a hash


# ------------------------------------------------------------ named configs


def configs_dir(root: str | None = None) -> str:
  """The configs/ folder: under ``root``, else the repository's, else cwd's."""
  for base in ([root] if root else [REPO_ROOT, os.getcwd()]):
    path = os.path.join(base, "configs")
    if os.path.isdir(path):
      return path
  return os.path.join(root or REPO_ROOT, "configs")


def available_configs(root: str | None = None) -> list[str]:
  """Names of the configs/*.py files that define ``get_config``."""
  folder = configs_dir(root)
  names = []
  if os.path.isdir(folder):
    for entry in sorted(os.listdir(folder)):
      stem, ext = os.path.splitext(entry)
      if ext != ".py" or stem.startswith("_"):
        continue
      with open(os.path.join(folder, entry), encoding="utf-8") as f:
        if re.search(r"^def get_config\(", f.read(), re.MULTILINE):
          names.append(stem)
  return names


def load_config(spec: str, root: str | None = None) -> ExperimentConfig:
  """``"NAME[:ARG]"`` -> ``configs/NAME.py``'s ``get_config(ARG or None)``;
  ``"PATH.py[:ARG]"`` (e.g. experiments/smollm2_dsa.py) -> that file's."""
  name, _, arg = spec.partition(":")
  if name.endswith(".py"):
    return _file_config(name, arg, root)
  folder = configs_dir(root)
  if not name.isidentifier() or not os.path.isfile(
      os.path.join(folder, name + ".py")):
    known = ", ".join(available_configs(root)) or "none"
    raise ConfigError(f"unknown config {name!r}: no {folder}/{name}.py "
                      f"(available: {known})")
  base = os.path.dirname(folder)
  if base not in sys.path:
    sys.path.insert(0, base)
  module = importlib.import_module(f"configs.{name}")
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    known = ", ".join(available_configs(root)) or "none"
    raise ConfigError(f"config {name!r}: configs/{name}.py defines no "
                      f"get_config(arg) (available: {known})")
  return _checked(get_config(arg or None), f"config {name!r}")


def _file_config(path: str, arg: str, root: str | None) -> ExperimentConfig:
  """A config file's get_config(ARG); a relative path is looked up from the
  working directory, then from the repository (configs/' parent)."""
  base = os.path.dirname(configs_dir(root))
  if not os.path.isfile(path) and os.path.isfile(os.path.join(base, path)):
    path = os.path.join(base, path)
  if base not in sys.path:  # so the file can import configs/ and experiments/
    sys.path.insert(0, base)
  module = _read_module(path, "config file")
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"config file {path!r} defines no get_config(arg)")
  return _checked(get_config(arg or None), path)


def _checked(cfg: Any, what: str) -> ExperimentConfig:
  if not isinstance(cfg, ExperimentConfig):
    raise ConfigError(f"{what}: get_config returned {type(cfg).__name__}, "
                      "not an ExperimentConfig")
  return cfg


# ------------------------------------------------------------------ sweeps


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A parsed sweep file: the config it starts from and its runs in order."""
  path: str
  config: str
  runs: tuple[tuple[str, dict[str, Any]], ...]
  swept: tuple[str, ...] = ()          # the GRID or ZIP keys
  summary_keys: tuple[str, ...] = ()

  @property
  def stem(self) -> str:
    return os.path.splitext(os.path.basename(self.path))[0]


def _read_module(path: str, what: str = "sweep file") -> Any:
  if not os.path.isfile(path):
    raise ConfigError(f"{what} {path!r} does not exist")
  mod_name = "_dsax_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(mod_name, path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"{what} {path!r} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _axes(table: Any, what: str, path: str) -> dict[str, list[Any]]:
  if not isinstance(table, dict) or not table:
    raise ConfigError(f"{path}: {what} must be a non-empty dict "
                      "{'dotted.key': [values]}")
  axes = {}
  for key, values in table.items():
    if not isinstance(key, str) or not key:
      raise ConfigError(f"{path}: {what} keys must be dotted strings, "
                        f"got {key!r}")
    if isinstance(values, (str, bytes)) or not isinstance(
        values, Sequence) or not values:
      raise ConfigError(f"{path}: {what}[{key!r}] must be a non-empty list, "
                        f"got {values!r}")
    axes[key] = list(values)
  return axes


def load_sweep(path: str) -> Sweep:
  """Reads a sweep file (see the module docstring) into a ``Sweep``."""
  module = _read_module(path)
  config = getattr(module, "CONFIG", None)
  if not isinstance(config, str) or not config:
    raise ConfigError(f"{path}: CONFIG must be a string 'name[:arg]', "
                      f"got {config!r}")
  grid, zipped = getattr(module, "GRID", None), getattr(module, "ZIP", None)
  if (grid is None) == (zipped is None):
    raise ConfigError(f"{path}: define exactly one of GRID and ZIP")
  base = getattr(module, "BASE", None) or {}
  if not isinstance(base, dict) or not all(isinstance(k, str) for k in base):
    raise ConfigError(f"{path}: BASE must be a dict {{'dotted.key': value}}")
  if grid is not None:
    axes = _axes(grid, "GRID", path)
    points = [dict(zip(axes, combo))
              for combo in itertools.product(*axes.values())]
  else:
    axes = _axes(zipped, "ZIP", path)
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) != 1:
      raise ConfigError(f"{path}: ZIP lists must have equal lengths, "
                        f"got {lengths}")
    points = [dict(zip(axes, combo)) for combo in zip(*axes.values())]
  clash = sorted(set(base) & set(axes))
  if clash:
    raise ConfigError(f"{path}: BASE sets swept keys {clash}")
  summary = getattr(module, "SUMMARY", ()) or ()
  if isinstance(summary, str) or not all(isinstance(k, str) for k in summary):
    raise ConfigError(f"{path}: SUMMARY must be a list of summary keys")
  names = run_names(points)
  runs = tuple((n, {**base, **p}) for n, p in zip(names, points))
  return Sweep(path=path, config=config, runs=runs, swept=tuple(axes),
               summary_keys=tuple(summary))


def expand_sweep(path: str) -> list[tuple[str, dict[str, Any]]]:
  """``[(run_name, overrides), ...]``: BASE plus each point of the sweep."""
  return list(load_sweep(path).runs)


# --------------------------------------------------------------- run names


def short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each dotted key's shortest suffix that no other key shares.

  ``phases.<phase>.<field>`` keeps at least ``<phase>.<field>`` (a dotted
  field: ``sparse.optim.lr``): the same field of two phases, or of two
  groups of a phase, is a different knob.
  """
  parts = {k: k.split(".") for k in keys}

  def minimum(key: str) -> int:
    p = parts[key]
    return len(p) - 1 if p[0] == "phases" and len(p) >= 3 else 1

  depth = {k: minimum(k) for k in keys}
  while True:
    short = {k: ".".join(parts[k][-depth[k]:]) for k in keys}
    seen: dict[str, list[str]] = {}
    for k, s in short.items():
      seen.setdefault(s, []).append(k)
    grow = [k for group in seen.values() if len(group) > 1 for k in group
            if depth[k] < len(parts[k])]
    if not grow:
      return short
    for k in grow:
      depth[k] += 1


def format_value(value: Any) -> str:
  """A value as it appears in a run name (``1e-4`` -> ``0.0001``)."""
  if isinstance(value, bool):
    text = "true" if value else "false"
  elif isinstance(value, float):
    text = repr(value) if math.isfinite(value) else str(value)
  elif isinstance(value, (list, tuple)):
    text = "+".join(format_value(v) for v in value)
  else:
    text = str(value)
  return text


def _safe(text: str) -> str:
  text = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("._")
  return text or "_"


def run_names(points: Sequence[dict[str, Any]]) -> list[str]:
  """Filesystem-safe, unique names for sweep points (dicts key -> value)."""
  keys = list(dict.fromkeys(k for p in points for k in p))
  short = short_keys(keys)
  names, used = [], set()
  for point in points:
    name = "_".join(f"{_safe(short[k])}-{_safe(format_value(v))}"
                    for k, v in point.items()) or "run"
    if len(name) > _NAME_MAX:
      digest = hashlib.sha1(name.encode()).hexdigest()[:8]
      name = f"{name[:_NAME_MAX - 9]}-{digest}"
    unique, i = name, 2
    while unique in used:
      unique, i = f"{name}-{i}", i + 1
    used.add(unique)
    names.append(unique)
  return names


# ----------------------------------------------------------- summary table


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def summary_table(rows: list[dict[str, Any]],
                  keys: Sequence[str] | None = None,
                  name_key: str = "run") -> str:
  """A plain aligned text table: one line per row, its name then ``keys``.

  ``keys`` defaults to every key of every row, in first-seen order. Missing
  values print ``-``; floats print with 4 significant digits. Text columns
  align left, number columns right.
  """
  if keys is None:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k != name_key]
  columns = [name_key, *keys]
  cells = [[_cell(r.get(c)) for c in columns] for r in rows]
  numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None
                 for r in rows) and c != name_key for c in columns]
  widths = [max([len(c)] + [len(line[i]) for line in cells])
            for i, c in enumerate(columns)]

  def line(values: list[str]) -> str:
    out = [v.rjust(w) if num else v.ljust(w)
           for v, w, num in zip(values, widths, numeric)]
    return "  ".join(out).rstrip()

  header = line(list(columns))
  rule = "  ".join("-" * w for w in widths)
  return "\n".join([header, rule] + [line(c) for c in cells])
