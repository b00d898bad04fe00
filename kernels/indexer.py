"""Lightning-indexer top-k selection with a Pallas scores kernel.

Same signature and semantics as ``reference.indexer_topk_reference``:
  I[t, s] = sum_i w[t, i] * relu(q[t, i] . k[s])          (f32)
masked to s <= t in t's segment (-inf elsewhere), then the top K = min(topk,
S) keys per query (ties to the lower index). Entries beyond the visible keys
are invalid and point at the query itself.

Two stages, mapped over query chunks of ``q_chunk`` so that memory is
O(B * q_chunk * S), never T x S (nor anything x I):
  1. kernel, grid (B, q_chunk / block_t, S / block_s): one [block_t, block_s]
     tile of fused scores per program; the I heads are reduced inside the
     kernel (a fori_loop of [block_t, J] x [J, block_s] matmuls, relu, weight,
     accumulate), so T x S x I never exists. Tiles entirely above the causal
     diagonal skip the head loop (its trip count is 0) and write -inf.
  2. lax.top_k over the [B, q_chunk, S] scores of the chunk, then the
     reference's post-processing (invalid -> the query's own index).
Scores are formed in a different summation order than the reference (heads
one by one), so near-ties (|diff| ~ 1e-7 relative) may order differently;
exact ties still go to the lower index.

T == S is assumed when ``segment_ids_BT`` is given (self-attention, as in the
reference, which indexes keys' segments with the same array).

``indexer_logits`` (same maths as ``reference.indexer_logits``, unmasked
[B, T, S] f32) is the differentiable piece for the indexer's KL losses: a
custom VJP with a dq/dw kernel and a dk kernel, so that neither direction
holds the [T, I, S] dots that the jnp version and its autodiff keep.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsax.kernels.tiling import (check_blocks, pad_axis, pow2,
                                 resolve_interpret, round_up)


@dataclasses.dataclass(frozen=True)
class IndexerBlocks:
  """Tile sizes (powers of two >= 16, clipped to the problem)."""
  block_t: int = 64       # queries per tile
  block_s: int = 64       # keys per tile
  q_chunk: int = 512      # queries per top-k step: scores [B, q_chunk, S] f32
  num_warps: int = 4
  num_stages: int = 2


def _scores_kernel(qpos_ref, qseg_ref, kseg_ref, q_ref, w_ref, k_ref, o_ref,
                   *, n_heads, s_real):
  """One tile: o[t, s] = sum_i w[i, t] relu(q[i, t] . k[s]), masked."""
  bt, bs = o_ref.shape
  qpos = qpos_ref[...]
  kpos = pl.program_id(2) * bs + jax.lax.broadcasted_iota(jnp.int32, (bs,), 0)
  mask = ((kpos[None, :] <= qpos[:, None]) & (kpos < s_real)[None, :]
          & (qseg_ref[...][:, None] == kseg_ref[...][None, :]))
  k = k_ref[...]

  def head(i, acc):
    dots = jax.lax.dot_general(q_ref[i], k, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
    return acc + w_ref[i][:, None] * jnp.maximum(dots, 0.0)

  # A tile wholly above the diagonal has nothing visible: skip its heads.
  live = pl.program_id(2) * bs <= jnp.max(qpos)
  trips = jnp.where(live, jnp.int32(n_heads), jnp.int32(0))
  acc = jax.lax.fori_loop(jnp.int32(0), trips, head,
                          jnp.zeros((bt, bs), jnp.float32))
  o_ref[...] = jnp.where(mask, acc, -jnp.inf)


def indexer_scores(q_BITJ, k_BSJ, w_BIT, qpos_T, qseg_BT, kseg_BS, s_real,
                   *, block: IndexerBlocks, interpret: bool):
  """Masked fused scores [B, T, S] of a (padded) query chunk.

  Shapes are already padded: T a multiple of block_t, S of block_s, J a
  power of two; ``s_real`` keys are real (the rest are masked)."""
  b, n_heads, t, jp = q_BITJ.shape
  s = k_BSJ.shape[1]
  bt, bs = min(block.block_t, t), min(block.block_s, s)
  kernel = functools.partial(_scores_kernel, n_heads=n_heads, s_real=s_real)
  return pl.pallas_call(
      kernel,
      grid=(b, t // bt, s // bs),
      in_specs=[
          pl.BlockSpec((bt,), lambda b, i, j: (i,)),
          pl.BlockSpec((None, bt), lambda b, i, j: (b, i)),
          pl.BlockSpec((None, bs), lambda b, i, j: (b, j)),
          pl.BlockSpec((None, n_heads, bt, jp), lambda b, i, j: (b, 0, i, 0)),
          pl.BlockSpec((None, n_heads, bt), lambda b, i, j: (b, 0, i)),
          pl.BlockSpec((None, bs, jp), lambda b, i, j: (b, j, 0)),
      ],
      out_specs=pl.BlockSpec((None, bt, bs), lambda b, i, j: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct((b, t, s), jnp.float32),
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=block.num_warps,
                                           num_stages=block.num_stages),
      name="indexer_scores",
  )(qpos_T, qseg_BT, kseg_BS, q_BITJ, w_BIT, k_BSJ)


def check_inputs(q_BTIJ, k_BSJ, w_BTI, topk, segment_ids_BT,
                 block: IndexerBlocks):
  if q_BTIJ.ndim != 4:
    raise ValueError(f"q_BTIJ must be [B,T,I,J], got shape {q_BTIJ.shape}")
  if k_BSJ.ndim != 3:
    raise ValueError(f"k_BSJ must be [B,S,J], got shape {k_BSJ.shape}")
  b, t, n_heads, j = q_BTIJ.shape
  if k_BSJ.shape[0] != b or k_BSJ.shape[2] != j:
    raise ValueError(f"k_BSJ shape {k_BSJ.shape} does not match q_BTIJ shape "
                     f"{q_BTIJ.shape} (need B={b}, J={j})")
  if w_BTI.shape != (b, t, n_heads):
    raise ValueError(f"w_BTI shape {w_BTI.shape} != (B, T, I) = "
                     f"{(b, t, n_heads)} from q_BTIJ")
  if not isinstance(topk, int) or topk < 1:
    raise ValueError(f"topk must be a positive int, got {topk!r}")
  if segment_ids_BT is not None:
    if k_BSJ.shape[1] != t:
      raise ValueError(f"segment_ids_BT needs T == S, got T={t}, "
                       f"S={k_BSJ.shape[1]}")
    if segment_ids_BT.shape != (b, t):
      raise ValueError(f"segment_ids_BT shape {segment_ids_BT.shape} != "
                       f"(B, T) = {(b, t)}")
    if not jnp.issubdtype(segment_ids_BT.dtype, jnp.integer):
      raise TypeError(f"segment_ids_BT must be integer, got "
                      f"{segment_ids_BT.dtype}")
  check_blocks(block, ("block_t", "block_s", "q_chunk"))


def indexer_topk(q_BTIJ: jax.Array, k_BSJ: jax.Array, w_BTI: jax.Array,
                 topk: int, segment_ids_BT: jax.Array | None = None, *,
                 block: IndexerBlocks = IndexerBlocks(),
                 interpret: bool | None = None):
  """Causal, in-segment top-k keys of the indexer scores.

  Returns (idx_BTK int32, valid_BTK bool), K = min(topk, S); invalid entries
  point at the query itself. Not differentiable (integer outputs).
  """
  check_inputs(q_BTIJ, k_BSJ, w_BTI, topk, segment_ids_BT, block)
  interpret = resolve_interpret(interpret)
  # The outputs are integers: no gradient flows, and without this a caller
  # differentiating through q, k, w would ask Pallas to JVP the kernel.
  q_BTIJ, k_BSJ, w_BTI = (jax.lax.stop_gradient(x)
                          for x in (q_BTIJ, k_BSJ, w_BTI))
  b, t, n_heads, j = q_BTIJ.shape
  s = k_BSJ.shape[1]
  kk = min(topk, s)
  jp = pow2(j)
  bt = min(pow2(block.block_t), pow2(t))
  chunk = round_up(min(block.q_chunk, round_up(t, bt)), bt)
  n_chunks = -(-t // chunk)
  tp = n_chunks * chunk
  bs = min(pow2(block.block_s), pow2(s))
  sp = round_up(s, bs)
  blk = dataclasses.replace(block, block_t=bt, block_s=bs)

  if segment_ids_BT is None:
    qseg = jnp.zeros((b, t), jnp.int32)
    kseg = jnp.zeros((b, s), jnp.int32)
  else:
    qseg = kseg = segment_ids_BT.astype(jnp.int32)
  kseg = pad_axis(kseg, 1, sp, value=-1)
  k = pad_axis(pad_axis(k_BSJ, 2, jp), 1, sp)
  # Heads-major so that each head's [block_t, J] tile is one load.
  q = pad_axis(pad_axis(jnp.swapaxes(q_BTIJ, 1, 2), 3, jp), 2, tp)
  w = pad_axis(jnp.swapaxes(w_BTI.astype(jnp.float32), 1, 2), 2, tp)
  qseg = pad_axis(qseg, 1, tp, value=-2)
  qpos = jnp.arange(tp, dtype=jnp.int32)

  def chunk_fn(c):
    start = c * chunk
    sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis)
    scores = indexer_scores(sl(q, 2), k, sl(w, 2), sl(qpos, 0), sl(qseg, 1),
                            kseg, s, block=blk, interpret=interpret)
    vals, idx = jax.lax.top_k(scores[:, :, :s], kk)
    # Re-apply the mask after selection: with fewer than K visible keys the
    # top-k also returns masked keys; masked scores are exactly -inf.
    valid = vals > -jnp.inf
    idx = jnp.where(valid, idx, sl(qpos, 0)[None, :, None])
    return idx.astype(jnp.int32), valid

  if n_chunks == 1:
    idx, valid = chunk_fn(0)
  else:
    idx, valid = jax.lax.map(chunk_fn, jnp.arange(n_chunks))
    join = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, tp, kk))
    idx, valid = join(idx), join(valid)
  return idx[:, :t], valid[:, :t]


# ------------------------------------------------------ logits with a VJP


@dataclasses.dataclass(frozen=True)
class LogitsBlocks:
  """Tile sizes of ``indexer_logits`` (powers of two >= 16)."""
  block_t: int = 64
  block_s: int = 64
  num_warps: int = 4
  num_stages: int = 2


def _logits_fwd_kernel(q_ref, w_ref, k_ref, o_ref, *, n_heads):
  """One [block_t, block_s] tile of sum_i w[i, t] relu(q[i, t] . k[s])."""
  k = k_ref[...]

  def head(i, acc):
    dots = jax.lax.dot_general(q_ref[i], k, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
    return acc + w_ref[i][:, None] * jnp.maximum(dots, 0.0)

  o_ref[...] = jax.lax.fori_loop(jnp.int32(0), jnp.int32(n_heads), head,
                                 jnp.zeros(o_ref.shape, jnp.float32))


def _logits_dqw_kernel(q_ref, w_ref, k_ref, g_ref, dq_ref, dw_ref, *, bs):
  """One head and query block: loops over key blocks.
  dw[t] = sum_s g relu(q.k),  dq[t] = w[t] sum_s g 1[q.k > 0] k[s]."""
  q = q_ref[...]

  def body(j, carry):
    dq, dw = carry
    keys = pl.ds(j * bs, bs)
    k = k_ref[keys, :]
    g = g_ref[:, keys]
    dots = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
    dw = dw + jnp.sum(g * jnp.maximum(dots, 0.0), axis=1)
    gm = jnp.where(dots > 0, g, 0.0).astype(k.dtype)
    dq = dq + jax.lax.dot_general(gm, k, (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    return dq, dw

  n_blocks = k_ref.shape[0] // bs
  dq, dw = jax.lax.fori_loop(
      jnp.int32(0), jnp.int32(n_blocks), body,
      (jnp.zeros(q.shape, jnp.float32), jnp.zeros(q.shape[:1], jnp.float32)))
  dq_ref[...] = (dq * w_ref[...][:, None]).astype(dq_ref.dtype)
  dw_ref[...] = dw


def _logits_dk_kernel(q_ref, w_ref, k_ref, g_ref, dk_ref, *, bt, n_heads):
  """One key block: loops over query blocks and heads.
  dk[s] = sum_t sum_i g w[i, t] 1[q[i, t].k > 0] q[i, t]."""
  k = k_ref[...]

  def t_body(tb, dk):
    rows = pl.ds(tb * bt, bt)
    g = g_ref[rows, :]

    def h_body(i, dk):
      q = q_ref[i, rows, :]
      dots = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
      gm = jnp.where(dots > 0, g * w_ref[i, rows][:, None], 0.0)
      return dk + jax.lax.dot_general(gm.astype(q.dtype), q,
                                      (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(n_heads), h_body, dk)

  n_tblocks = g_ref.shape[0] // bt
  dk = jax.lax.fori_loop(jnp.int32(0), jnp.int32(n_tblocks), t_body,
                         jnp.zeros(k.shape, jnp.float32))
  dk_ref[...] = dk.astype(dk_ref.dtype)


def _logits_layout(q_BTIJ, k_BSJ, block: LogitsBlocks):
  b, t, n_heads, j = q_BTIJ.shape
  s = k_BSJ.shape[1]
  bt = min(pow2(block.block_t), pow2(t))
  bs = min(pow2(block.block_s), pow2(s))
  return b, t, s, n_heads, j, pow2(j), bt, bs, round_up(t, bt), round_up(s, bs)


def _logits_prepare(q_BTIJ, k_BSJ, w_BTI, block):
  b, t, s, n_heads, j, jp, bt, bs, tp, sp = _logits_layout(q_BTIJ, k_BSJ,
                                                           block)
  q = pad_axis(pad_axis(jnp.swapaxes(q_BTIJ, 1, 2), 3, jp), 2, tp)
  w = pad_axis(jnp.swapaxes(w_BTI.astype(jnp.float32), 1, 2), 2, tp)
  k = pad_axis(pad_axis(k_BSJ, 2, jp), 1, sp)
  return q, w, k


def _logits_forward(q_BTIJ, k_BSJ, w_BTI, block, interpret):
  b, t, s, n_heads, j, jp, bt, bs, tp, sp = _logits_layout(q_BTIJ, k_BSJ,
                                                           block)
  q, w, k = _logits_prepare(q_BTIJ, k_BSJ, w_BTI, block)
  out = pl.pallas_call(
      functools.partial(_logits_fwd_kernel, n_heads=n_heads),
      grid=(b, tp // bt, sp // bs),
      in_specs=[
          pl.BlockSpec((None, n_heads, bt, jp), lambda b, i, j: (b, 0, i, 0)),
          pl.BlockSpec((None, n_heads, bt), lambda b, i, j: (b, 0, i)),
          pl.BlockSpec((None, bs, jp), lambda b, i, j: (b, j, 0)),
      ],
      out_specs=pl.BlockSpec((None, bt, bs), lambda b, i, j: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct((b, tp, sp), jnp.float32),
      interpret=interpret, name="indexer_logits_fwd",
      compiler_params=plgpu.CompilerParams(num_warps=block.num_warps,
                                           num_stages=block.num_stages),
  )(q, w, k)
  return out[:, :t, :s]


def _logits_backward(block, interpret, res, g_BTS):
  q_BTIJ, k_BSJ, w_BTI = res
  b, t, s, n_heads, j, jp, bt, bs, tp, sp = _logits_layout(q_BTIJ, k_BSJ,
                                                           block)
  q, w, k = _logits_prepare(q_BTIJ, k_BSJ, w_BTI, block)
  # Padded rows and columns of g are zero: padding contributes nothing.
  g = pad_axis(pad_axis(g_BTS.astype(jnp.float32), 1, tp), 2, sp)
  params = plgpu.CompilerParams(num_warps=block.num_warps,
                                num_stages=block.num_stages)
  dq, dw = pl.pallas_call(
      functools.partial(_logits_dqw_kernel, bs=bs),
      grid=(b, tp // bt, n_heads),
      in_specs=[
          pl.BlockSpec((None, None, bt, jp), lambda b, i, h: (b, h, i, 0)),
          pl.BlockSpec((None, None, bt), lambda b, i, h: (b, h, i)),
          pl.BlockSpec((None, sp, jp), lambda b, i, h: (b, 0, 0)),
          pl.BlockSpec((None, bt, sp), lambda b, i, h: (b, i, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, bt, jp), lambda b, i, h: (b, h, i, 0)),
          pl.BlockSpec((None, None, bt), lambda b, i, h: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(w.shape, jnp.float32)],
      interpret=interpret, compiler_params=params, name="indexer_logits_dqw",
  )(q, w, k, g)
  dk = pl.pallas_call(
      functools.partial(_logits_dk_kernel, bt=bt, n_heads=n_heads),
      grid=(b, sp // bs),
      in_specs=[
          pl.BlockSpec((None, n_heads, tp, jp), lambda b, j: (b, 0, 0, 0)),
          pl.BlockSpec((None, n_heads, tp), lambda b, j: (b, 0, 0)),
          pl.BlockSpec((None, bs, jp), lambda b, j: (b, j, 0)),
          pl.BlockSpec((None, tp, bs), lambda b, j: (b, 0, j)),
      ],
      out_specs=pl.BlockSpec((None, bs, jp), lambda b, j: (b, j, 0)),
      out_shape=jax.ShapeDtypeStruct(k.shape, k.dtype),
      interpret=interpret, compiler_params=params, name="indexer_logits_dk",
  )(q, w, k, g)
  dq = jnp.swapaxes(dq[:, :, :t, :j], 1, 2)
  dw = jnp.swapaxes(dw[:, :, :t], 1, 2).astype(w_BTI.dtype)
  return dq, dk[:, :s, :j], dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _indexer_logits(q, k, w, block, interpret):
  return _logits_forward(q, k, w, block, interpret)


_indexer_logits.defvjp(
    lambda q, k, w, block, interpret: (
        _logits_forward(q, k, w, block, interpret), (q, k, w)),
    _logits_backward)


def indexer_logits(q_BTIJ: jax.Array, k_BSJ: jax.Array, w_BTI: jax.Array, *,
                   block: LogitsBlocks = LogitsBlocks(),
                   interpret: bool | None = None) -> jax.Array:
  """I[b, t, s] = sum_i w[b, t, i] relu(q[b, t, i] . k[b, s]), f32 [B,T,S],
  unmasked, as ``reference.indexer_logits``; differentiable in q, k, w.

  Neither direction forms the [T, I, S] dots the jnp version (and its
  autodiff) holds: the forward reduces heads per tile, the backward runs a
  dq/dw kernel (grid B x T-blocks x I, loop over key blocks) and a dk kernel
  (grid B x S-blocks, loops over query blocks and heads), no atomics. The
  relu derivative at 0 is 0, as in jax. Callers map it over query chunks
  (the output is [B, T, S]); every key block is visited (no causal skip).
  """
  check_inputs(q_BTIJ, k_BSJ, w_BTI, 1, None, IndexerBlocks(
      block_t=block.block_t, block_s=block.block_s))
  return _indexer_logits(q_BTIJ, k_BSJ, w_BTI, block,
                         resolve_interpret(interpret))
