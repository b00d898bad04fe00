"""Device mesh, the one logical-axis -> mesh-axis table, and the shardings of
parameters, optimizer state and batches (JAX SPMD: Mesh, NamedSharding, jit).

Mesh axes, outermost first (``MeshConfig``; -1 takes the remaining devices):

  data      replicas that see different rows of the batch
  fsdp      rows of the batch too, and parameters sharded on ``embed``
  expert    expert parallelism: the routed MoE experts are split over it
            (``expert``), and, like data, rows of the batch, so each device
            has its own tokens; the MoE layer exchanges them with all-to-all
            (dsax.expert_parallel). Without MoE it is one more data axis.
  sequence  context parallelism: query positions of each row (docs/
            context_parallel.md)
  tensor    heads, MLP width and vocabulary (innermost: the fastest links)

Every parameter is declared once with logical axis names (``dsax.params``);
``RULES`` maps each name to mesh axes. A dimension keeps a mesh axis only when
its size divides by the axis size and the axis is not used by an earlier
dimension of the same array; otherwise it is replicated (a small model on a
big mesh still runs). Optimizer states mirror the parameters: a state leaf
found under a parameter's path with the parameter's shape gets its sharding,
everything else (step counters) is replicated.

The lightning indexer is sharded by its heads (``idx_heads``) only: its keys
(one per token, shared by all heads) and the key axis S of its scores are never
named here, so each query's top-k sees the whole row; GSPMD keeps the result
equal to one device's (tests/test_sharding.py checks the indices).

Multi-process: ``init_distributed`` starts ``jax.distributed``; each process
reads its own share of the documents and feeds the rows its devices hold
(``dsax.multihost``, which also agrees on stops). ``global_batch`` assembles
a global array from a batch every process holds whole (tests, tools).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dsax.config import ConfigError, MeshConfig, ModelConfig

log = logging.getLogger("dsax")

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")

# Logical axis -> mesh axes, the only place where the two meet.
RULES: dict[str, tuple[str, ...]] = {
    # parameters (dsax.params)
    "layers": (),            # the forward scans over layers: keep them whole
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),  # GQA
    "head_dim": (),
    "qk_dim": (),
    "v_dim": (),
    "q_lora": (),            # latents are small and feed every head
    "kv_lora": (),
    "kv_rope": (),
    "norm": (),
    "idx_heads": ("tensor",),
    "idx_dim": (),
    "expert": ("expert",),   # MoE routed experts (dsax.expert_parallel)
    # activations
    "batch": ("data", "fsdp", "expert"),
    "sequence": ("sequence",),
}

BATCH_AXES = ("batch", "sequence")


# --------------------------------------------------------------------- mesh


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
  """Resolved sizes of ``MESH_AXES``; ConfigError names the bad value."""
  sizes = {a: getattr(cfg, a) for a in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis} must be >= 1 or -1, got {size}")
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ConfigError(f"only one mesh axis may be -1, got {rest}")
  known = math.prod(s for s in sizes.values() if s != -1)
  text = " x ".join(f"mesh.{a}={s}" for a, s in sizes.items())
  if rest:
    if n_devices % known:
      raise ConfigError(f"{text}: the fixed axes ({known}) do not divide the "
                        f"{n_devices} devices")
    sizes[rest[0]] = n_devices // known
  elif known != n_devices:
    raise ConfigError(f"{text} = {known} devices, but there are {n_devices}")
  return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
  """The device mesh of ``cfg`` over ``devices`` (default: all of them)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------- specs


def logical_spec(axes: tuple[str, ...], shape: tuple[int, ...],
                 mesh: Mesh) -> PartitionSpec:
  """The PartitionSpec of an array with these logical axes (see RULES)."""
  used: set[str] = set()
  out: list[Any] = []
  for name, dim in zip(axes, shape):
    if name not in RULES:
      raise KeyError(f"logical axis {name!r} has no rule in "
                     "dsax.sharding.RULES; add one there")
    mesh_axes = tuple(a for a in RULES[name]
                      if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or dim % size:
      out.append(None)
      continue
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*out)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
  """A NamedSharding per parameter, in the tree of ``params.param_specs``."""
  from dsax import params as P  # pylint: disable=import-outside-toplevel
  return jax.tree.map(
      lambda s: NamedSharding(mesh, logical_spec(s.axes, s.shape, mesh)),
      P.param_specs(cfg), is_leaf=lambda x: isinstance(x, P.ParamSpec))


def opt_shardings(abstract_opt: Any, flat_params: dict[str, Any],
                  mesh: Mesh) -> Any:
  """Shardings of an optax state tree (chains, ``multi_transform`` partitions,
  masked states) whose per-parameter leaves sit under a dict key equal to a
  parameter path; ``flat_params``: path -> (shape, NamedSharding)."""
  def leaf(path, x):
    for k in reversed(path):
      key = getattr(k, "key", None)
      if key in flat_params and tuple(x.shape) == flat_params[key][0]:
        return flat_params[key][1]
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(leaf, abstract_opt)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their target sharding (orbax restores
  straight onto it, whatever mesh the checkpoint was saved from)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def put_global(tree: Any, shardings: Any) -> Any:
  """Arrays that every process holds whole (same values) onto shardings that
  may span processes; each process copies only its devices' shards."""
  def put(x, sharding):
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda idx: host[idx])
  return jax.tree.map(put, tree, shardings)


# ------------------------------------------------------------------ batches


def batch_sharding(mesh: Mesh, batch_size: int, seq_len: int) -> NamedSharding:
  """Rows over (data, fsdp, expert), positions over ``sequence``; [B, T]
  arrays."""
  spec = []
  for name, dim, key in zip(BATCH_AXES, (batch_size, seq_len),
                            ("data.batch_size", "data.seq_len")):
    axes = tuple(a for a in RULES[name] if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if dim % size:
      raise ConfigError(f"{key}={dim} does not divide by the {size} devices "
                        f"of mesh axes {axes}")
    spec.append(axes or None)
  return NamedSharding(mesh, PartitionSpec(*spec))


def process_slices(sharding: NamedSharding,
                   global_shape: tuple[int, ...]) -> tuple[slice, ...]:
  """The block of a global array that this process's devices hold."""
  index_map = sharding.addressable_devices_indices_map(global_shape)
  out = []
  for d, n in enumerate(global_shape):
    starts = [idx[d].indices(n)[0] for idx in index_map.values()]
    stops = [idx[d].indices(n)[1] for idx in index_map.values()]
    out.append(slice(min(starts), max(stops)))
  return tuple(out)


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding,
                 global_shape: tuple[int, ...] | None = None
                 ) -> dict[str, jax.Array]:
  """Global arrays from a host batch that every process holds whole (each
  process hands over only the block its devices hold), or with
  ``global_shape``, from this process's block alone (multihost.TrainStream)."""
  out = {}
  for k, v in batch.items():
    shape = v.shape if global_shape is None else global_shape
    block = v[process_slices(sharding, v.shape)] if global_shape is None else v
    out[k] = jax.make_array_from_process_local_data(sharding, block, shape)
  return out


def batch_local(fn):
  """``fn`` run on each shard of the batch rows (the leading axis of every
  argument and output), under the mesh that ``train`` traces in. For ops
  that XLA cannot split by rows: ``lax.top_k`` inside the indexer's query
  loop is otherwise all-gathered over the batch and repeated on every device.
  Without a mesh, or with unsplit rows, it is ``fn`` itself."""
  def wrapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(
        a for a in RULES["batch"] if mesh.shape.get(a, 1) > 1
        and a not in mesh.manual_axes)  # already per shard (dsax.context)
    if not axes:
      return fn(*args)
    spec = PartitionSpec(axes)
    return jax.shard_map(fn, in_specs=spec, out_specs=spec,
                         axis_names=set(axes), check_vma=False)(*args)
  return wrapped


# ------------------------------------------------------------ multi-process


def init_distributed(coordinator: str | None = None,
                     num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Starts ``jax.distributed`` from the arguments or DSAX_COORDINATOR,
  DSAX_NUM_PROCESSES, DSAX_PROCESS_ID; returns whether it did (nothing to do
  without a coordinator, or with one process)."""
  env = os.environ
  coordinator = coordinator or env.get("DSAX_COORDINATOR") or None
  if num_processes is None and env.get("DSAX_NUM_PROCESSES"):
    num_processes = int(env["DSAX_NUM_PROCESSES"])
  if process_id is None and env.get("DSAX_PROCESS_ID"):
    process_id = int(env["DSAX_PROCESS_ID"])
  if not coordinator:
    if num_processes not in (None, 1):
      raise ConfigError(f"--num-processes={num_processes} needs "
                        "--coordinator HOST:PORT (or DSAX_COORDINATOR)")
    return False
  if num_processes is None or process_id is None:
    raise ConfigError(f"--coordinator={coordinator!r} needs --num-processes "
                      "and --process-id (or DSAX_NUM_PROCESSES and "
                      "DSAX_PROCESS_ID)")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"--process-id={process_id} must be in "
                      f"[0, {num_processes})")
  jax.distributed.initialize(coordinator, num_processes, process_id)
  log.info("process %d of %d, %d local / %d global devices", process_id,
           num_processes, jax.local_device_count(), jax.device_count())
  return True


def host_tree(tree: Any) -> Any:
  """A tree every process can read whole (for work local to one process);
  all processes must call it. One process: the tree itself."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(tree, tiled=True)


def is_primary() -> bool:
  """Process 0 writes logs, metrics, summaries and reports."""
  return jax.process_index() == 0
