"""Checkpoints with orbax's CheckpointManager.

A run directory holds
  ckpt/<global step>/{state, data, meta}   train state, data iterator state and
                                           run bookkeeping (resolved config too)
  phases/<name>/                           the parameters each phase ended with
  cache/jax/                               JAX's persistent compilation cache
                                           (``compilation_cache``)
The manager keeps the last ``keep`` steps. A state is saved only when every
parameter is finite, so a non-finite loss never replaces a good checkpoint.

Arrays are saved sharded, each process writing its shards (orbax coordinates
several processes). A restore target whose ShapeDtypeStructs carry shardings
(``train.abstract_state(cfg, phase, mesh)``) restores straight onto them, so a
checkpoint saved on one mesh restores onto a mesh of another shape; a target
without shardings restores onto this process's first device.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


@jax.jit
def _finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
  """Whether every float leaf is finite (one replicated scalar, so it also
  works on arrays sharded over several processes)."""
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(_finite(leaves)) if leaves else True


def _targets(abstract: Any) -> Any:
  """Restore targets: leaves without a sharding go to the first local device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda a: a if getattr(a, "sharding", None) is not None else
      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


class RunCheckpoints:
  """Train state + data iterator state + metadata, keyed by global step."""

  def __init__(self, workdir: str, keep: int = 2):
    self.dir = os.path.abspath(os.path.join(workdir, "ckpt"))
    self.phase_dir = os.path.abspath(os.path.join(workdir, "phases"))
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> bool:
    """Saves unless the state holds a non-finite value; returns whether saved."""
    if not all_finite(state):
      return False
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()
    return True

  def restore_meta(self, step: int) -> tuple[dict, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return out["meta"], out["data"]

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_targets(abstract_state))))
    return out["state"]

  def save_phase_params(self, name: str, params: Any) -> str:
    path = os.path.join(self.phase_dir, name)
    save_params(path, params)
    return path

  def phase_params_path(self, name: str) -> str:
    return os.path.join(self.phase_dir, name)

  def close(self) -> None:
    self.manager.close()


def save_params(path: str, params: Any) -> None:
  """Writes a parameter tree to ``path`` (replacing what is there)."""
  path = os.path.abspath(path)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, params, force=True)
  ckptr.wait_until_finished()


def load_params(path: str, abstract_params: Any) -> Any:
  """Reads a parameter tree written by ``save_params`` into the given
  structure (shapes and dtypes must match; shardings as in the module
  docstring)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no parameter checkpoint at {path}")
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
