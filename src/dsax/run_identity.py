"""A run's identity: what must hold before a run directory is written to.

launch.py, before it writes anything:

1. validates the resolved config completely: every field (``config.validate``,
   at override time), then what needs the outside world: the work directory
   and ``data.cache_dir`` can be written (``check_paths``), the data sources
   exist, read and hold enough documents for the held-out split
   (``check_data``), the mesh fits the devices and divides the batch
   (``check_mesh``), and a warm-up trains only indexer parameters
   (``check_trainable``);
2. compares it with the config of the run already in the directory
   (``check_resume``). A change that alters the computation of steps already
   taken is refused with the list of differing keys (``ResumeRefused``): the
   model, the data, the seed, the names, kinds and order of the phases that
   have started, any setting of a finished phase, and any setting of the
   current phase but its step count (which may grow, or shrink down to the
   step reached). A change that only affects the future is allowed and
   logged: more steps, a later phase's settings, phases added at the end,
   logging, checkpoint cadence, eval settings, the mesh (a checkpoint restores
   onto any mesh) and the implementation keys in ``FUTURE_KEYS`` (kernels,
   chunking, rematerialisation: the same maths);
3. then (``record``) writes ``config.json`` and appends an entry to
   ``config_history.jsonl`` (time, host, pid, command, event, global step,
   the changes and the whole config).

``--force-new`` starts over in place: ``supersede`` moves the previous run's
entries (``RUN_ENTRIES``: config, logs, metrics, checkpoints, phase
parameters, eval outputs) into ``superseded/<time>/`` inside the work
directory. Nothing is deleted, so a checkpoint dsax did not write is never
lost; files dsax does not know are left where they are (the run never reads
them), and the content-keyed caches (``cache/``: compiled programs, trained
tokenizers) are kept.

Progress is read from the directory alone, conservatively: the newest
``ckpt/<global step>`` (a damaged newest step counts: a resume falls back,
never forward) and the ``phases/<name>`` directories of finished phases,
placed against the phase lengths of the old config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any, NamedTuple

from dsax.config import (ConfigError, DataError, ExperimentConfig, PhaseConfig,
                         from_dict, to_dict)

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
SUPERSEDED = "superseded"
# What a run writes at the top of its directory (moved aside by --force-new).
RUN_ENTRIES = ("config.json", HISTORY_FILE, "log.txt", "metrics.jsonl",
               "summary.json", "comparison.txt", "ckpt", "phases", "eval",
               "tb")
# Keys whose change only affects the future (a trailing dot: a group).
FUTURE_KEYS = ("name", "workdir", "log_every", "save_every",
               "keep_checkpoints", "control", "compare", "report", "eval.",
               "mesh.", "data.cache_dir", "model.kernel_impl", "model.remat",
               "model.scan_unroll", "model.attn_q_chunk",
               "model.lm_loss_chunk", "model.indexer.q_chunk")


class ResumeRefused(ConfigError):
  """The run directory holds a run this config would corrupt; launch.py
  exits 2. ``remedy``: what to do instead."""

  def __init__(self, message: str, remedy: str = ""):
    super().__init__(message)
    self.remedy = remedy


class PathError(OSError):
  """A path the run must write is a file or not writable; launch.py exits 6."""


class Change(NamedTuple):
  key: str
  old: Any
  new: Any
  why: str = ""

  def __str__(self) -> str:
    text = f"{self.key} ({_show(self.old)} -> {_show(self.new)})"
    return f"{text}: {self.why}" if self.why else text


_ABSENT = "(absent)"


def _show(value: Any) -> str:
  return value if value == _ABSENT else repr(value)


# ---------------------------------------------------------------- validation


def _writable(path: str, what: str) -> None:
  full = os.path.abspath(path)
  if os.path.exists(full) and not os.path.isdir(full):
    raise PathError(f"{what}={path} is a file, not a directory; choose "
                    "another")
  probe = full
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise PathError(f"{what}={path} cannot be made: {probe} is a file")
  try:
    fd, tmp = tempfile.mkstemp(dir=probe, prefix=".dsax-write-test-")
    os.close(fd)
    os.remove(tmp)
  except OSError as e:
    raise PathError(f"{what}={path} is not writable ({e.strerror} in "
                    f"{probe}); choose another") from None


def check_paths(cfg: ExperimentConfig) -> None:
  """The work directory (and ``data.cache_dir``) can be made and written;
  a probe file is created and removed, nothing else is written."""
  _writable(cfg.workdir, "workdir")
  if cfg.data.cache_dir:
    _writable(cfg.data.cache_dir, "data.cache_dir")


def check_data(cfg: ExperimentConfig) -> None:
  """The data sources are found, read and hold at least two non-empty
  documents, so that both splits are non-empty; a ``file:`` tokenizer loads
  and fits ``model.vocab_size``. A bad ``data.*`` value is a ConfigError; a
  missing, empty, unreadable or malformed source a DataError naming it.
  Lists the documents without reading their text (file sizes and read
  permission; JSONL files are parsed); an HF dataset only for its first
  rows."""
  from dsax import data, tokenizer  # pylint: disable=import-outside-toplevel
  dc = cfg.data
  data.check_config(dc)
  if dc.source == "files" and not dc.paths:
    raise ConfigError("data.paths is empty; data.source='files' needs globs")
  if dc.source == "hf" and not dc.hf_name:
    raise ConfigError("data.hf_name is empty; data.source='hf' needs a "
                      "dataset")
  probe = dc
  if dc.source == "hf":
    probe = dataclasses.replace(dc, max_docs=min(dc.max_docs or 2, 2))
  where = f"data.source={dc.source!r}" + (
      f" data.paths={list(dc.paths)}" if dc.paths else "")
  try:
    docs = data.load_documents(probe)
  except ConfigError as e:
    raise DataError(str(e)) from None
  except (ValueError, OSError) as e:
    raise DataError(f"{where}: {e}") from None
  if not docs:
    raise DataError(f"{where} gave no non-empty documents")
  train, val = data.split_documents(docs, dc.val_fraction, dc.seed)
  if not val or not train:
    raise DataError(
        f"{where} gave {len(docs)} non-empty document(s): a run needs at "
        "least 2, one to hold out for the held-out evaluation "
        f"(data.val_fraction={dc.val_fraction}) and one to train on; add "
        "documents (data.paths, data.max_docs)")
  if dc.tokenizer.startswith("file:"):
    tok = tokenizer.load_file(dc.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
      raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller "
                        f"than data.tokenizer's vocabulary ({tok.vocab_size})")


def check_mesh(cfg: ExperimentConfig) -> None:
  """The mesh fits the devices and its batch axes divide data.batch_size
  (imports jax)."""
  from dsax import sharding as S  # pylint: disable=import-outside-toplevel
  S.batch_sharding(S.make_mesh(cfg.mesh), cfg.data.batch_size,
                   cfg.data.seq_len)


def check_trainable(cfg: ExperimentConfig, paths: list[str]) -> None:
  """A warm-up trains the indexer alone (every other parameter stays
  bit-identical): its ``indexer_trainable`` may match only parameters that
  the default regex calls indexer parameters."""
  import re  # pylint: disable=import-outside-toplevel
  indexer = PhaseConfig().indexer_trainable
  for p in cfg.phases:
    if p.kind != "warmup":
      continue
    other = [q for q in paths if re.search(p.indexer_trainable, q)
             and not re.search(indexer, q)]
    if other:
      raise ConfigError(
          f"phases.{p.name}.indexer_trainable={p.indexer_trainable!r} "
          f"matches {len(other)} non-indexer parameter(s) ({other[0]!r}, "
          f"...): a warm-up trains only the indexer ({indexer!r})")


# ----------------------------------------------------------------- progress


def _global_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "ckpt")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.isdir(os.path.join(folder, n)))


def _saved_phases(workdir: str) -> set[str]:
  folder = os.path.join(workdir, "phases")
  if not os.path.isdir(folder):
    return set()
  return {n for n in os.listdir(folder)
          if os.path.isdir(os.path.join(folder, n))}


class Progress(NamedTuple):
  step: int | None          # the newest checkpoint's global step
  status: dict[str, str]    # phase name -> "finished" | "current" | "future"
  reached: dict[str, int]   # the current phase -> its step

  @property
  def any(self) -> bool:
    return any(s != "future" for s in self.status.values())

  def __str__(self) -> str:
    done = [n for n, s in self.status.items() if s == "finished"]
    text = f"global step {self.step or 0}"
    if done:
      text += f", finished {', '.join(done)}"
    for name, step in self.reached.items():
      text += f", phase {name} at step {step}"
    return text


def progress(workdir: str, phases: list[dict[str, Any]]) -> Progress:
  """Where the run in ``workdir`` stands, for the phases of its config."""
  steps = _global_steps(workdir)
  latest = steps[-1] if steps else None
  saved = _saved_phases(workdir)
  status, reached, base = {}, {}, 0
  for p in phases:
    name, end = str(p.get("name")), base + int(p.get("steps", 0))
    if name in saved or (latest is not None and end <= latest):
      status[name] = "finished"
    elif latest is not None and base < latest:
      status[name], reached[name] = "current", latest - base
    else:
      status[name] = "future"
    base = end
  return Progress(latest, status, reached)


# --------------------------------------------------------------- comparison


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Leaves of a config dict by dotted key; lists of dicts (the phases) by
  each entry's name."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    elif (isinstance(value, list) and value
          and all(isinstance(v, dict) for v in value)):
      for i, v in enumerate(value):
        out.update(_flat(v, f"{prefix}{key}.{v.get('name', i)}."))
    else:
      out[prefix + key] = value
  return out


def _normalised(old: dict[str, Any]) -> dict[str, Any]:
  """An old config.json as today's config would write it (defaults of keys
  added since filled in); as it is when today's code cannot read it."""
  try:
    return json.loads(json.dumps(to_dict(from_dict(ExperimentConfig, old))))
  except (ConfigError, TypeError, ValueError):
    return old


def _future_only(key: str) -> bool:
  return any(key == k or (k.endswith(".") and key.startswith(k))
             for k in FUTURE_KEYS)


def compare(old: dict[str, Any], cfg: ExperimentConfig,
            where: Progress) -> tuple[list[Change], list[Change]]:
  """(refused, allowed) changes from the ``old`` config dict to ``cfg`` for a
  run that stands at ``where`` (see the module docstring)."""
  old = _normalised(old)
  new = json.loads(json.dumps(to_dict(cfg)))
  refused, allowed = [], []
  old_phases, new_phases = old.get("phases") or [], new.get("phases") or []
  top_old = _flat({k: v for k, v in old.items() if k != "phases"})
  top_new = _flat({k: v for k, v in new.items() if k != "phases"})
  for key in sorted(set(top_old) | set(top_new)):
    a, b = top_old.get(key, _ABSENT), top_new.get(key, _ABSENT)
    if a != b:
      keep = allowed if not where.any or _future_only(key) else refused
      keep.append(Change(key, a, b))
  for i in range(max(len(old_phases), len(new_phases))):
    po = old_phases[i] if i < len(old_phases) else None
    pn = new_phases[i] if i < len(new_phases) else None
    name = str((po or pn).get("name", i))
    status = where.status.get(name, "future") if po else "future"
    if po is None or pn is None:
      change = Change(f"phases.{name}", "(present)" if po else _ABSENT,
                      "(present)" if pn else "(removed)")
      (refused if status != "future" else allowed).append(change)
      continue
    fo, fn = _flat(po), _flat(pn)
    for field in sorted(set(fo) | set(fn)):
      a, b = fo.get(field, _ABSENT), fn.get(field, _ABSENT)
      if a == b:
        continue
      change = Change(f"phases.{name}.{field}", a, b)
      if status == "future":
        allowed.append(change)
      elif status == "current" and field == "steps" and isinstance(
          b, int) and b >= where.reached[name]:
        allowed.append(change)
      elif status == "current" and field == "steps":
        refused.append(change._replace(
            why=f"the run reached step {where.reached[name]}"))
      else:
        refused.append(change._replace(
            why=f"phase {name} is {status}"))
  return refused, allowed


def _listing(changes: list[Change], limit: int = 8) -> str:
  shown = "; ".join(map(str, changes[:limit]))
  if len(changes) > limit:
    rest = ", ".join(c.key for c in changes[limit:])
    shown += f"; and {len(changes) - limit} more: {rest}"
  return shown


def read_config(workdir: str) -> dict[str, Any] | None:
  """The run directory's config.json as a dict (None: there is none);
  ResumeRefused when it cannot be read."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if not isinstance(old, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise ResumeRefused(
        f"{path} cannot be read ({e}): which config this run had is unknown",
        "restore it, choose another --workdir, or add --force-new to start "
        "over (the old files are moved aside, not deleted)") from None
  return old


def check_resume(cfg: ExperimentConfig, workdir: str
                 ) -> tuple[Progress | None, list[Change]]:
  """(progress, allowed changes) of launching ``cfg`` in ``workdir``; raises
  ResumeRefused when the change would alter steps already taken. Reads
  only."""
  old = read_config(workdir)
  if old is None:
    if _global_steps(workdir) or _saved_phases(workdir):
      raise ResumeRefused(
          f"{os.path.abspath(workdir)} holds checkpoints (ckpt/ or phases/) "
          "but no config.json: which config made them is unknown",
          "choose another --workdir, or add --force-new to start over "
          "(the old files are moved aside, not deleted)")
    return None, []
  where = progress(workdir, old.get("phases") or [])
  refused, allowed = compare(old, cfg, where)
  if refused:
    raise ResumeRefused(
        f"{os.path.abspath(workdir)} holds a run ({where}) and this config "
        f"changes what made those steps: {_listing(refused)}",
        "launch with the run's own config (its config.json), choose another "
        "--workdir, or add --force-new to start over in place (the old "
        f"run's files move to {SUPERSEDED}/<time>/, nothing is deleted)")
  return where, allowed


def describe_changes(where: Progress | None, allowed: list[Change]) -> str:
  """One line for the log about a resume's allowed changes ('' if none)."""
  if not allowed:
    return ""
  if where is None or not where.any:
    head = "config changed before any step was kept"
  else:
    head = f"config changes for the future (the run is at {where})"
  return f"{head}: {_listing(allowed, limit=20)}"


# ------------------------------------------------------- writing, moving


def supersede(workdir: str) -> tuple[str | None, list[str]]:
  """Moves the previous run's entries (``RUN_ENTRIES``) into
  ``<workdir>/superseded/<time>/``; returns (that folder or None when there
  was nothing to move, the unknown entries left in place)."""
  if not os.path.isdir(workdir):
    return None, []
  names = sorted(os.listdir(workdir))
  moving = [n for n in names if n in RUN_ENTRIES]
  kept = ("cache", SUPERSEDED, "run.lock")
  unknown = [n for n in names if n not in RUN_ENTRIES and n not in kept]
  if not moving:
    return None, unknown
  stamp = time.strftime("%Y%m%d-%H%M%S")
  dest = os.path.join(workdir, SUPERSEDED, stamp)
  n = 1
  while os.path.exists(dest):
    n += 1
    dest = os.path.join(workdir, SUPERSEDED, f"{stamp}-{n}")
  os.makedirs(dest)
  for name in moving:
    os.rename(os.path.join(workdir, name), os.path.join(dest, name))
  return dest, unknown


def record(cfg: ExperimentConfig, workdir: str, event: str,
           where: Progress | None = None,
           changes: list[Change] = ()) -> None:
  """Writes ``config.json`` (atomically) and appends the launch to
  ``config_history.jsonl``: event ("new", "resume", "force_new"), time,
  host, pid, command, global step, the changes and the whole config."""
  os.makedirs(workdir, exist_ok=True)
  text = json.dumps(to_dict(cfg), indent=2) + "\n"
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  entry = {"event": event,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "host": socket.gethostname(), "pid": os.getpid(),
           "command": " ".join(sys.argv),
           "step": where.step if where else None,
           "changes": {c.key: [c.old, c.new] for c in changes},
           "config": to_dict(cfg)}
  with open(os.path.join(workdir, HISTORY_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(entry) + "\n")


def read_history(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, HISTORY_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
