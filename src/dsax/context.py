"""Context parallelism: each layer's attention per shard of the positions,
with the latent keys all-gathered (docs/context_parallel.md).

Under a mesh whose ``sequence`` axis has n > 1 devices, a row of T tokens is
cut into 2n blocks of c = T / (2n) and laid out zig-zag: shard i holds the
natural blocks i and 2n - 1 - i, so every shard has the same causal work
(block i sees i + 1 key blocks, block 2n - 1 - i sees 2n - i: 2n + 1 in all).
``layout_batch`` applies this permutation to a host batch before it is
placed on the mesh (``dsax.train.place_batch``); everything per token
(embedding, RoPE from the positions, MLP, MoE, the LM loss, which is a mean)
is indifferent to the order, and only the attention undoes it.

``attend`` (in place of ``dsa.attend`` when ``model.forward(...,
context_parallel=True)``) runs ``dsa.attend`` in a ``jax.shard_map`` over
``sequence`` (the batch axes stay automatic):
  - queries stay local; the MLA latent [c_kv ; k_rope] and the indexer key
    k_I of the local tokens are concatenated and all-gathered once
    (``all_gather`` over ``sequence``; its transpose, the backward, is a
    reduce-scatter), then put in natural order by a local permutation;
  - each local query knows its index among the S = T keys (``q_index_T``
    from the shard index): the causal mask is key index <= that index, in
    the same segment (the keys' segment ids are gathered once per forward,
    ``key_segments``), never the local array order;
  - dense attention (pretraining, the warm-up target and KL) runs
    ``causal_blocks`` over the local query blocks against every key with
    the causal skip (query block at natural block c sees key blocks <= c);
  - the indexer's top-k sees each local query's whole row of scores: no
    cross-device merge (the local window needs no scores); sparse attention
    gathers its k rows from the gathered latent (the indices are natural
    key indices);
  - per-layer scalars (the indexer KL) are averaged over the shards.
Modes this does not cover (recall, the oracle and given selections)
run on the whole rows: the inputs are put back in natural order, the plain
``dsa.attend`` runs under GSPMD, and its outputs are laid out again.
The dense path here is the jnp one (``causal_blocks``, the reference top-k)
whatever ``mode.impl``; sparse attention keeps ``mode.impl``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from dsax import dsa, sharding
from dsax.attention import AttentionMode, LayerAux, Projections, QueryShard
from dsax.config import ConfigError

AXIS = "sequence"


# ------------------------------------------------------------------- layout


def shards() -> int:
  """The size of the ``sequence`` axis of the mesh being traced under (1
  without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else mesh.shape.get(AXIS, 1)


def zigzag(t: int, n: int) -> np.ndarray:
  """The layout of a row of t tokens over n shards: position j of the laid
  out row holds natural token ``zigzag(t, n)[j]``; shard i's T / n
  positions hold the natural blocks i and 2n - 1 - i of c = t / (2n)."""
  if t % (2 * n):
    raise ConfigError(f"data.seq_len={t} must divide by 2 x mesh.sequence = "
                      f"{2 * n} (the zig-zag layout of context parallelism)")
  c = t // (2 * n)
  blocks = [blk for i in range(n) for blk in (i, 2 * n - 1 - i)]
  return np.concatenate([np.arange(blk * c, (blk + 1) * c) for blk in blocks])


def _take(x, index: np.ndarray, axis: int):
  return x[(slice(None),) * axis + (index,)]


def to_layout(x, n: int, axis: int = 1):
  """A natural-order array (numpy or jax) in the zig-zag layout."""
  return _take(x, zigzag(x.shape[axis], n), axis)


def from_layout(x, n: int, axis: int = 1):
  """The inverse of ``to_layout``: a laid-out array in natural order."""
  return _take(x, np.argsort(zigzag(x.shape[axis], n)), axis)


def layout_batch(batch: dict[str, np.ndarray], n: int) -> dict[str, Any]:
  """Every [B, T] array of a host batch in the zig-zag layout of n shards
  (the identity when n = 1)."""
  if n == 1:
    return batch
  return {k: to_layout(v, n) for k, v in batch.items()}


def shard_index(d: jax.Array, n: int, t_local: int) -> jax.Array:
  """int32 [T / n]: the natural index of each of shard d's tokens."""
  c = t_local // 2
  ar = jnp.arange(c, dtype=jnp.int32)
  return jnp.concatenate([d * c + ar, (2 * n - 1 - d) * c + ar])


# ------------------------------------------------------------- the layer


def supported(mode: AttentionMode) -> bool:
  """Whether ``attend`` runs ``mode`` per shard (else on whole rows)."""
  return not mode.recall and (not mode.sparse
                              or mode.selection in ("indexer", "local"))


def _spec(*axes):
  return PartitionSpec(*axes)


def _batch_axes() -> tuple[str, ...]:
  """The mesh axes that split the batch rows (``sharding.RULES``)."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(a for a in sharding.RULES["batch"] if mesh.shape.get(a, 1) > 1)


def key_segments(segment_ids_BT: jax.Array | None) -> jax.Array | None:
  """The keys' segment ids in natural order, whole on every shard (one
  all-gather per forward; None without segment ids)."""
  n = shards()
  if segment_ids_BT is None or n == 1:
    return segment_ids_BT

  def gather(seg_BT):
    seg_BS = jax.lax.all_gather(seg_BT, AXIS, axis=1, tiled=True)
    return from_layout(seg_BS, n)

  rows_axes = _batch_axes()
  return jax.shard_map(gather, in_specs=_spec(rows_axes or None, AXIS),
                       out_specs=_spec(rows_axes or None),
                       axis_names=set(rows_axes) | {AXIS},
                       check_vma=False)(segment_ids_BT)


def _gather_keys(n: int, parts: list[jax.Array]) -> list[jax.Array]:
  """Every shard's per-token arrays [B, T/n, ...], concatenated into one
  all-gather over ``sequence``, in natural order [B, T, ...]."""
  dtype = jnp.result_type(*parts)
  flat = [x.reshape(x.shape[:2] + (-1,)).astype(dtype) for x in parts]
  sizes = np.cumsum([f.shape[-1] for f in flat])[:-1]
  all_BS_ = from_layout(jax.lax.all_gather(
      jnp.concatenate(flat, axis=-1), AXIS, axis=1, tiled=True), n)
  return [y.reshape(y.shape[:2] + x.shape[2:]).astype(x.dtype)
          for y, x in zip(jnp.split(all_BS_, sizes, axis=-1), parts)]


def _aux_specs(mode: AttentionMode, tok: PartitionSpec) -> LayerAux:
  """out_specs of the layer's LayerAux: scalars whole, per token sharded."""
  return LayerAux(
      indexer_kl=_spec() if mode.indexer_loss else None,
      idx=tok if mode.indices else None, valid=tok if mode.indices else None,
      index_k=tok if mode.indexer_keys else None,
      cache=(tok, tok) if mode.cache else None)


def attend(p: dict[str, Any], h_BTD: jax.Array, proj: Projections,
           mode: AttentionMode, cfg, segment_ids_BT: jax.Array | None = None,
           ang_i_BTR: jax.Array | None = None,
           given: tuple[jax.Array, jax.Array] | None = None,
           key_segment_ids_BS: jax.Array | None = None):
  """``dsa.attend`` of laid-out rows (see the module docstring); the
  selected indices in ``LayerAux.idx`` are natural key indices, laid out
  along T like the queries. ``key_segment_ids_BS``: ``key_segments`` of
  ``segment_ids_BT`` (computed here when None)."""
  n = shards()
  if n == 1:
    return dsa.attend(p, h_BTD, proj, mode, cfg, segment_ids_BT, ang_i_BTR,
                      given)
  if not supported(mode):
    return _whole_rows(n, p, h_BTD, proj, mode, cfg, segment_ids_BT,
                       ang_i_BTR, given)
  b, t = h_BTD.shape[:2]
  c = t // (2 * n)
  if t % (2 * n):
    raise ConfigError(f"data.seq_len={t} must divide by 2 x mesh.sequence = "
                      f"{2 * n} (the zig-zag layout of context parallelism)")
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros((b, t), jnp.int32)
    key_segment_ids_BS = None
  if key_segment_ids_BS is None:
    key_segment_ids_BS = key_segments(segment_ids_BT)
  block = math.gcd(cfg.attn_q_chunk, c)
  layer = {k: p[k] for k in ("attn", "indexer") if k in p}
  rows_axes = _batch_axes()
  manual = set(rows_axes) | {AXIS}

  def body(layer, h_BTD, proj, seg_BT, ang_i_BTR, seg_k_BS):
    q_index_T = shard_index(jax.lax.axis_index(AXIS), n, h_BTD.shape[1])

    def keys(rows, k_i_BTJ):
      parts = list(rows) + ([] if k_i_BTJ is None else [k_i_BTJ])
      out = _gather_keys(n, parts)
      k_i_BSJ = None if k_i_BTJ is None else out[-1]
      return tuple(out[:2]), k_i_BSJ, QueryShard(q_index_T, seg_k_BS, block)

    o_BTNE, aux = dsa.attend(layer, h_BTD, proj, mode, cfg, seg_BT, ang_i_BTR,
                             None, keys)
    if aux.indexer_kl is not None:  # equal shards: the mean of means
      aux = dataclasses.replace(
          aux, indexer_kl=jax.lax.pmean(aux.indexer_kl, tuple(manual)))
    return o_BTNE, aux

  # The batch axes are manual too: XLA would otherwise gather the rows.
  tok = _spec(rows_axes or None, AXIS)
  fn = jax.shard_map(
      body, in_specs=(_spec(), tok, tok, tok, tok, _spec(rows_axes or None)),
      out_specs=(tok, _aux_specs(mode, tok)), axis_names=manual,
      check_vma=False)
  return fn(layer, h_BTD, proj, segment_ids_BT, ang_i_BTR, key_segment_ids_BS)


def _whole_rows(n, p, h_BTD, proj, mode, cfg, segment_ids_BT, ang_i_BTR,
                given):
  """``dsa.attend`` on the rows in natural order (GSPMD), laid out again."""
  nat = lambda x: None if x is None else from_layout(x, n)  # noqa: E731
  o_BTNE, aux = dsa.attend(
      p, nat(h_BTD), jax.tree.map(nat, proj), mode, cfg, nat(segment_ids_BT),
      nat(ang_i_BTR), jax.tree.map(nat, given))
  per_token = {k: jax.tree.map(lambda x: to_layout(x, n), getattr(aux, k))
               for k in ("idx", "valid", "index_k", "cache")
               if getattr(aux, k) is not None}
  return to_layout(o_BTNE, n), dataclasses.replace(aux, **per_token)
