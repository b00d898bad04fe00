"""Checkpoints with orbax's CheckpointManager, verified on restore.

A run directory holds
  ckpt/<global step>/{state, data, meta}   train state, data iterator state and
                                           run bookkeeping (resolved config too)
  ckpt/<step>.damaged                      a step that failed verification,
                                           moved aside (never deleted)
  phases/<name>/                           the parameters each phase ended with
  cache/jax/                               JAX's persistent compilation cache
                                           (``compilation_cache``)

Verification. Orbax commits a step atomically (it writes a temporary
directory and renames it when every process is done); after that commit,
process 0 writes ``dsax_manifest.json`` into the step: the size and sha256 of
every file orbax wrote (``write_manifest``). Opening a run directory checks
the steps newest first (``damage``: a missing or empty step, a missing
manifest, a missing, truncated or changed file) down to the first intact one;
each damaged step is logged in one line naming the step and the file, moved
to ``ckpt/<step>.damaged`` (so neither retention nor a new save of that step
touches it), and the run resumes from the newest intact step. A step killed
between orbax's commit and its manifest is incomplete the same way, and the
one before it is still there: retention runs only after the manifest. Steps
written before manifests existed (older than every step that has one) are
restored unverified, with orbax's own checks only. Phase parameters
(``save_params``) carry the same manifest, checked by ``load_params`` when
present.

The newest ``keep`` (at least 1) steps are kept, never deleting the step just
written. A state is saved only when every parameter is finite, so a
non-finite loss never replaces a good checkpoint; saving a step that is
already saved intact is a no-op (a resumed run reaching a step that an
interrupted one saved).

Arrays are saved sharded, each process writing its shards (orbax coordinates
several processes). A restore target whose ShapeDtypeStructs carry shardings
(``train.abstract_state(cfg, phase, mesh)``) restores straight onto them, so a
checkpoint saved on one mesh restores onto a mesh of another shape; a target
without shardings restores onto this process's first device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger("dsax")

MANIFEST = "dsax_manifest.json"


class CheckpointError(RuntimeError):
  """A checkpoint or a phase's parameters cannot be used (one-line message
  naming the step or directory and the file)."""


class UnwritablePath(OSError):
  """The work directory cannot be written (one-line message)."""


@jax.jit
def _finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


@jax.jit
def _finite_each(leaves: list[jax.Array]) -> list[jax.Array]:
  # Scalars, hence replicated: readable on every process.
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def _float_leaves(tree: Any) -> list[tuple[str, jax.Array]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [("/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                    for k in path), x) for path, x in flat
          if jnp.issubdtype(x.dtype, jnp.floating)]


def all_finite(tree: Any) -> bool:
  """Whether every float leaf is finite (one replicated scalar, so it also
  works on arrays sharded over several processes)."""
  leaves = [x for _, x in _float_leaves(tree)]
  return bool(_finite(leaves)) if leaves else True


def non_finite(tree: Any) -> tuple[list[str], int]:
  """(paths of the float leaves holding a NaN or inf, number of float
  leaves); paths as ``train.flatten`` writes them."""
  leaves = _float_leaves(tree)
  if not leaves:
    return [], 0
  ok = _finite_each([x for _, x in leaves])
  return [p for (p, _), good in zip(leaves, ok) if not bool(good)], len(leaves)


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` and a file in it, or raises UnwritablePath."""
  try:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise NotADirectoryError(0, "it is a file")
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UnwritablePath(
        f"work directory {workdir} cannot be written ({e.strerror or e}); "
        "choose another --workdir or make it writable") from None


# --------------------------------------------------------------- manifests


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def write_manifest(directory: str) -> None:
  """Writes ``directory/MANIFEST``: {relative path: [size, sha256]} of every
  file under ``directory`` (atomically: a reader sees all of it or none)."""
  files = {}
  for root, _, names in os.walk(directory):
    for n in names:
      path = os.path.join(root, n)
      rel = os.path.relpath(path, directory)
      if not rel.startswith(MANIFEST):
        files[rel] = [os.path.getsize(path), _sha256(path)]
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": dict(sorted(files.items()))}, f, indent=0)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, MANIFEST))


def damage(directory: str, legacy: bool = False) -> str | None:
  """None when ``directory`` holds what its manifest lists, byte for byte;
  else why not, naming the file. ``legacy``: a missing manifest is not
  damage (written before manifests existed)."""
  if not os.path.isdir(directory):
    return "the directory is missing"
  if not os.listdir(directory):
    return "the directory is empty"
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None if legacy else f"{MANIFEST} is missing"
  try:
    with open(path) as f:
      files = json.load(f)["files"]
    files = {rel: (int(size), str(digest))
             for rel, (size, digest) in files.items()}
  except (OSError, ValueError, KeyError, TypeError):
    return f"{MANIFEST} is unreadable"
  for rel, (size, _) in files.items():
    full = os.path.join(directory, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    if os.path.getsize(full) != size:
      return f"{rel} has {os.path.getsize(full)} bytes, not {size}"
  for rel, (_, digest) in files.items():
    if _sha256(os.path.join(directory, rel)) != digest:
      return f"{rel} does not match its checksum"
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    # pylint: disable-next=import-outside-toplevel
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _targets(abstract: Any) -> Any:
  """Restore targets: leaves without a sharding go to the first local device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda a: a if getattr(a, "sharding", None) is not None else
      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


class RunCheckpoints:
  """Train state + data iterator state + metadata, keyed by global step;
  the damaged newest steps are set aside when the directory is opened (see
  the module docstring)."""

  def __init__(self, workdir: str, keep: int = 2):
    self.dir = os.path.abspath(os.path.join(workdir, "ckpt"))
    self.phase_dir = os.path.abspath(os.path.join(workdir, "phases"))
    self.keep = max(1, keep)
    self.first_checked: int | None = None  # the oldest step with a manifest
    self.damaged = self._set_aside_damaged()
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=False))

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.dir, str(step))

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step to ``<step>.damaged`` (process 0); its path."""
    n, name = 1, f"{step}.damaged"
    while os.path.exists(os.path.join(self.dir, name)):
      n, name = n + 1, f"{step}.damaged{n + 1}"
    if jax.process_index() == 0:
      os.rename(self._step_dir(step), os.path.join(self.dir, name))
    return os.path.join(self.dir, name)

  def _legacy(self, step: int) -> bool:
    """Whether ``step`` was written before manifests (older than any step
    that has one)."""
    return self.first_checked is None or step < self.first_checked

  def _set_aside_damaged(self) -> list[str]:
    """Checks the steps newest first down to an intact one; sets the
    damaged ones aside and logs one line for each. Their messages."""
    names = os.listdir(self.dir) if os.path.isdir(self.dir) else []
    steps = sorted((int(d) for d in names if d.isdigit()), reverse=True)
    self.first_checked = min(
        (s for s in steps
         if os.path.exists(os.path.join(self._step_dir(s), MANIFEST))),
        default=None)
    found, intact = [], None
    for step in steps:
      reason = damage(self._step_dir(step), self._legacy(step))
      if reason is None:
        intact = step
        break
      found.append((step, reason, self._set_aside(step)))
    _sync("dsax_ckpt_verified")
    if intact is not None and self._legacy(intact):
      log.warning("checkpoint step %d has no %s (written before checksums): "
                  "restoring it unverified", intact, MANIFEST)
    then = (f"resuming from step {intact}" if intact is not None else
            "no intact checkpoint is left: starting from the beginning")
    messages = [f"checkpoint step {step} is damaged ({reason}); kept as "
                f"{moved}; {then}" for step, reason, moved in found]
    for m in messages:
      log.warning("%s", m)
    return messages

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def kept(self, phases: list[str]) -> str:
    """What the run keeps, for a message: "checkpoint step 30 and
    phases/pretrain, phases/warmup"."""
    step = self.latest_step()
    ckpt = f"checkpoint step {step}" if step is not None else ""
    dirs = ", ".join(f"phases/{name}" for name in phases)
    if ckpt and dirs:
      return f"{ckpt} and {dirs}"
    return ckpt or (f"{dirs} (no checkpoint)" if dirs else
                    "nothing (no checkpoint was saved yet)")

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> bool:
    """Saves unless the state holds a non-finite value; returns whether the
    step is saved. A step already saved intact is kept as it is; a damaged
    one is set aside first."""
    if not all_finite(state):
      return False
    if step in self.manager.all_steps():
      reason = damage(self._step_dir(step), self._legacy(step))
      if reason is None:
        log.info("checkpoint step %d is already saved", step)
        return True
      log.warning("checkpoint step %d is damaged (%s); kept as %s; saving it "
                  "again", step, reason, self._set_aside(step))
      _sync("dsax_ckpt_set_aside")
      self.manager.reload()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      write_manifest(self._step_dir(step))
    if self.first_checked is None:
      self.first_checked = step
    # Retention only now, so a kill before the manifest leaves older steps.
    for old in sorted(self.manager.all_steps())[:-self.keep]:
      if old != step:
        self.manager.delete(old)
    return True

  def _restore(self, step: int, **items) -> dict:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax and tensorstore raise many types
      raise CheckpointError(
          f"checkpoint step {step} in {self.dir} cannot be restored "
          f"({_first_line(e)}); it does not fit this run's config"
          + (" or is damaged" if self._legacy(step) else "")) from e

  def restore_meta(self, step: int) -> tuple[dict, dict]:
    out = self._restore(step, data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore())
    return out["meta"], out["data"]

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    return self._restore(step, state=ocp.args.StandardRestore(
        _targets(abstract_state)))["state"]

  def save_phase_params(self, name: str, params: Any) -> str:
    """Writes phases/<name>; refuses non-finite parameters."""
    bad, total = non_finite(params)
    if bad:
      raise ValueError(f"phases/{name}: {len(bad)} of {total} parameter "
                       f"leaves are non-finite ({bad[0]}, ...); not written")
    path = os.path.join(self.phase_dir, name)
    save_params(path, params)
    return path

  def phase_params_path(self, name: str) -> str:
    return os.path.join(self.phase_dir, name)

  def close(self) -> None:
    self.manager.close()


def save_params(path: str, params: Any) -> None:
  """Writes a parameter tree to ``path`` (replacing what is there), with
  its manifest."""
  path = os.path.abspath(path)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, params, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    write_manifest(path)


def load_params(path: str, abstract_params: Any) -> Any:
  """Reads a parameter tree written by ``save_params`` into the given
  structure (shapes and dtypes must match; shardings as in the module
  docstring)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no parameter checkpoint at {path}")
  reason = damage(path, legacy=True)
  if reason is not None:
    raise CheckpointError(f"the parameters in {path} are damaged ({reason}); "
                          "restore them from a copy")
  local = all(getattr(a, "sharding", None) is None
              for a in jax.tree.leaves(abstract_params))
  options = ocp.options.MultiprocessingOptions()
  if local and jax.process_count() > 1:
    # A local target (process 0's end-of-run evaluation): read alone,
    # without waiting for the other processes at orbax's barriers.
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me},
        barrier_sync_key_prefix=f"local{me}")
  return ocp.StandardCheckpointer(multiprocessing_options=options).restore(
      path, _targets(abstract_params))


# Programs that compile faster than this are not written to the persistent
# cache: eager ops (tens of ms each) would only fill the directory; a step
# takes seconds (on 2 cores: tiny_run's 4-10 s, SmolLM2's at T = 2048 8-11 s).
COMPILE_CACHE_MIN_S = 1.0


def compile_cache_dir(workdir: str) -> str:
  """Where a run keeps its compiled programs: ``<workdir>/cache/jax``."""
  return os.path.join(workdir, "cache", "jax")


@contextlib.contextmanager
def compilation_cache(path: str):
  """JAX's persistent compilation cache in ``path`` while the block runs: a
  second launch of the same run (a resume, a rerun, the same shapes in a
  copy of the run directory) loads each step's executable instead of
  compiling it again. The previous setting is restored after. A cache the
  user configured (``JAX_COMPILATION_CACHE_DIR``) is left as it is."""
  if jax.config.jax_compilation_cache_dir:
    yield jax.config.jax_compilation_cache_dir
    return
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache as cc
  saved = {k: getattr(jax.config, k) for k in (
      "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_enable_xla_caches")}
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    COMPILE_CACHE_MIN_S)
  if jax.default_backend() == "cpu":
    # XLA's GPU autotune cache, on by default, writes its directory (inside
    # ``path``) into every key: a copied or moved run would miss.
    jax.config.update("jax_persistent_cache_enable_xla_caches", "")
  cc.reset_cache()  # the cache opens its directory once: reopen it here
  try:
    yield path
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    for k, v in saved.items():
      jax.config.update(k, v)
    cc.reset_cache()
