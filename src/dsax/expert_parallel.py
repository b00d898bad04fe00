"""Expert parallelism for the MoE layer: the grouped dispatch with the routed
experts sharded over the ``expert`` mesh axis and the tokens exchanged with
all-to-all (``jax.shard_map``). ``moe.moe_forward`` takes this path when
``dispatch="grouped"`` runs under a mesh (``jax.set_mesh``, as the train
step traces) whose ``expert`` axis is > 1; it equals the one-device grouped
dispatch up to rounding (tests/test_expert_parallel.py).

Axes as in dsax.moe (U local tokens, K chosen experts per token, M = U*K
assignments, R rows of an expert-sorted buffer), plus: E the shards of the
``expert`` axis, X_l = X / E the experts each shard holds (shard j holds
experts [j X_l, (j+1) X_l)), C the rows each shard sends to each other
shard, S = E*C the rows of an exchange buffer.

The exchange. The manual axes of the shard_map are every mesh axis that
splits tokens (the batch axes, ``expert`` among them, and ``sequence``), so
each device holds its own tokens, exactly as the rest of the model splits
them; ``tensor`` stays automatic (an expert's F columns may be split over
it). Each device:
  1. routes its tokens (``moe.route``; forced experts replace the top-k), so
     routing needs the whole router [D, X] (small) on every device;
  2. sorts its M assignments by expert (``exchange_layout``): the ones bound
     for shard j, in expert order, fill slot j of a send buffer [E, C, D]
     (zero rows after them), and their local expert ids (X_l on the unused
     rows) slot j of an int buffer [E, C];
  3. all-to-all over ``expert``: slot j goes to shard j, which receives
     [E, C, D], slot i from shard i, and the ids;
  4. sorts what it received by local expert (``moe.expert_layout`` with
     ``spare``: the unused rows sort last, past every block that runs) and
     runs the three grouped matmuls with its X_l experts only;
  5. un-sorts the outputs into the received order and sends them back with
     the same all-to-all (slot i back to shard i);
  6. scales each returned row by its gate weight and sums each token's K
     rows (gathers, as in dsax.moe: no scatter-add).
The backward is the same in reverse (the transpose of an all-to-all is the
reverse all-to-all); expert-weight gradients stay on their shard. Routing
statistics (load, balance loss) are computed outside, from the returned
choices and scores, as on one device. The rest of the model sees ``expert``
as one more data axis; only the embedding lookup changes (``lookup_table``),
so that tokens reach the first MoE layer split by rows.

No token is dropped, and there is no capacity factor: C is the worst case.
XLA:CPU cannot run ``ragged_all_to_all`` (jax 0.10.2: "UNIMPLEMENTED"), so
the exchange is a fixed-size all-to-all and C must hold everything one shard
can send another: a token picks K distinct experts (top-k), at most
min(K, X_l) of them on one shard, so C = U min(K, X_l); forced experts may
repeat, so then C = U K. Memory bound per device, for U local tokens: the
send, receive and return buffers are each E C rows of D, and the sorted
buffer E C + (X_l + 1)(block - 1) rows of D and of F (its activations), so
O(E U min(K, X_l) (D + F)), against O(U K (D + F)) for the same U tokens
through the one-device grouped dispatch: E times larger when X_l >= K, i.e.
each device holds buffers as large as one device running all E U tokens of
its expert group would. Each all-to-all moves E C D values per device, most
of them zero rows. (Measured, X 64, K 6, D 256, F 64, 4096 tokens, f32,
forward+backward: one device 211 MiB of temporaries; 8 expert shards 187
MiB each.) The matmuls run only on received rows (blocks past the used
ones are skipped), so the work is the real assignments plus block padding;
gathers and copies touch the whole buffers. A ragged all-to-all (GPU/TPU)
or a capacity with an exact fallback would cut the traffic; neither is
here. Expert weights never leave their shard: each device holds 1/E of
every routed-expert tensor, and the only gathers of expert weights are those
the ``fsdp`` axis makes of a shard's own experts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dsax import moe
from dsax import sharding as S
from dsax.config import ConfigError, ModelConfig

AXIS = "expert"
ROUTER = ("router", "router_bias")
EXPERTS = ("w_gate", "w_up", "w_down")


def expert_shards() -> int:
  """E: the ``expert`` axis of the mesh being traced under (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else mesh.shape.get(AXIS, 1)


class Exchange(NamedTuple):
  """Where the assignments go in the send buffer of S = E*C rows: slot j
  (rows [j C, (j+1) C)) holds those bound for shard j, sorted by expert."""
  token_R: jax.Array   # the token of each row; U on unused rows
  src_R: jax.Array     # the assignment (u*K + k) of each row; M on unused
  dest_UK: jax.Array   # the row of each assignment
  local_R: jax.Array   # the expert of each row on its shard; X_l on unused


def exchange_layout(idx_UK: jax.Array, n_experts: int, n_shards: int,
                    cap: int) -> Exchange:
  """The send layout: assignments sorted by expert (stably), shard j's in
  rows j*cap onwards. ``cap`` must be at least the most assignments one
  token set can send to one shard (the caller's worst case); nothing is
  dropped then."""
  u, k = idx_UK.shape
  m = u * k
  per = n_experts // n_shards
  e_M = idx_UK.reshape(m).astype(jnp.int32)
  order_M = jnp.argsort(e_M, stable=True)
  e_sorted = e_M[order_M]
  shard_sorted = e_sorted // per
  count_J = jnp.zeros(n_shards, jnp.int32).at[shard_sorted].add(1)
  start_J = jnp.cumsum(count_J) - count_J
  dest_sorted = shard_sorted * cap + (
      jnp.arange(m, dtype=jnp.int32) - start_J[shard_sorted])
  dest_M = jnp.zeros(m, jnp.int32).at[order_M].set(dest_sorted)
  src_R = jnp.full(n_shards * cap, m, jnp.int32).at[dest_sorted].set(
      order_M.astype(jnp.int32))
  used_R = src_R < m
  token_R = jnp.where(used_R, src_R // k, u)
  e_ext = jnp.concatenate([e_M, jnp.zeros((1,), jnp.int32)])
  local_R = jnp.where(used_R, e_ext[src_R] % per, per)
  return Exchange(token_R, src_R, dest_M.reshape(u, k), local_R)


def _exchange(a_S_: jax.Array, n_shards: int) -> jax.Array:
  """All-to-all over ``expert``: slot j of [S, ...] goes to shard j, which
  gets slot i from shard i (the same call sends results back)."""
  a = a_S_.reshape((n_shards, -1) + a_S_.shape[1:])
  return jax.lax.all_to_all(a, AXIS, 0, 0).reshape(a_S_.shape)


def _local_experts(p: dict[str, Any], x_BTD: jax.Array, cfg: ModelConfig,
                   experts_BTK: jax.Array | None, n_shards: int, impl: str,
                   block: int):
  """The shard_map body: one device's tokens and X_l experts (module
  docstring, steps 1-6); returns (y_BTD, idx_BTK, s_BTX) of its tokens."""
  cdt = jnp.dtype(cfg.compute_dtype)
  n_experts = cfg.moe.n_routed_experts
  per = n_experts // n_shards
  w_BTK, idx_BTK, s_BTX = moe.route(p, x_BTD, cfg, experts_BTK)
  b, t, d = x_BTD.shape
  k = idx_BTK.shape[-1]
  u = b * t
  cap = u * (k if experts_BTK is not None else min(k, per))
  ex = exchange_layout(idx_BTK.reshape(u, k), n_experts, n_shards, cap)
  x_SD = moe.gather_rows(x_BTD.reshape(u, d).astype(cdt), ex.token_R,
                         ex.dest_UK)
  got_SD = _exchange(x_SD, n_shards)
  local_S = _exchange(ex.local_R, n_shards)
  lay = moe.expert_layout(local_S[:, None], per,
                          1 if impl == "ragged" else block, spare=True)
  x_RD = moe.gather_rows(got_SD, lay.token_R, lay.dest_UK)
  y_RD = moe.swiglu_rows(p, x_RD, lay, impl, cdt)
  back_SD = _exchange(moe.sum_rows(y_RD, lay.token_R, lay.dest_UK), n_shards)
  w_M = w_BTK.reshape(u * k)
  w_S = jnp.concatenate([w_M, jnp.zeros((1,), w_M.dtype)])[ex.src_R]
  y_UD = moe.sum_rows(back_SD * w_S[:, None].astype(cdt), ex.token_R,
                      ex.dest_UK)
  return y_UD.reshape(b, t, d), idx_BTK, s_BTX


def lookup_table(table_VD: jax.Array) -> jax.Array:
  """The embedding table as ``model.embed`` reads it. Under expert
  parallelism (and so only then) its fsdp split of D is gathered first, as
  FSDP gathers any weight it uses: the looked-up rows then come out split
  by rows, as the exchange wants them. Left split on D, they reach the
  first MoE layer split on D, and XLA reshards D -> rows (and back in the
  backward) over fsdp x expert only by replicating the activations
  ("involuntary full rematerialization")."""
  if expert_shards() == 1:
    return table_VD
  mesh = jax.sharding.get_abstract_mesh()
  vocab = S.logical_spec(("vocab",), table_VD.shape[:1], mesh)
  return jax.lax.with_sharding_constraint(table_VD,
                                          PartitionSpec(*vocab, None))


def routed_experts(p: dict[str, Any], x_BTD: jax.Array, cfg: ModelConfig,
                   experts_BTK: jax.Array | None = None, impl: str = "auto",
                   block: int = moe.BLOCK):
  """The routed part of the layer with expert parallelism, under the mesh
  being traced: (y_BTD, idx_BTK, s_BTX) as ``moe.route`` and
  ``moe.grouped_experts`` give them on one device."""
  mesh = jax.sharding.get_abstract_mesh()
  n_shards = mesh.shape[AXIS]
  n_experts = cfg.moe.n_routed_experts
  if n_experts % n_shards:
    raise ConfigError(f"model.moe.n_routed_experts={n_experts} does not "
                      f"divide by mesh.expert={n_shards}; choose an expert "
                      "axis that divides the experts")
  split = {name: tuple(a for a in S.RULES[name] if mesh.shape.get(a, 1) > 1)
           for name in S.BATCH_AXES}
  assert AXIS in split["batch"], "RULES['batch'] must hold the expert axis"
  for dim, name in zip(x_BTD.shape, S.BATCH_AXES):
    size = 1
    for a in split[name]:
      size *= mesh.shape[a]
    if dim % size:
      raise ValueError(f"expert parallel MoE: {name} size {dim} does not "
                       f"divide by the {size} devices of mesh axes "
                       f"{split[name]}")
  tok = PartitionSpec(split["batch"] or None, split["sequence"] or None, None)
  router = {k: p[k] for k in ROUTER if k in p}
  experts = {k: p[k] for k in EXPERTS}
  forced = () if experts_BTK is None else (experts_BTK,)
  impl = moe.resolve_impl(impl)

  def body(router, experts, x_BTD, *forced):
    return _local_experts({**router, **experts}, x_BTD, cfg,
                          forced[0] if forced else None, n_shards, impl,
                          block)

  # Tokens enter split by rows, as the batch is (see lookup_table).
  x_BTD = jax.lax.with_sharding_constraint(x_BTD, tok)
  return jax.shard_map(
      body, in_specs=(PartitionSpec(), PartitionSpec(AXIS), tok)
      + (tok,) * len(forced), out_specs=(tok, tok, tok),
      axis_names=set(split["batch"]) | set(split["sequence"]),
      check_vma=False)(router, experts, x_BTD, *forced)
