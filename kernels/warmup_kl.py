"""The DSA dense warm-up KL target as Pallas kernels, fed by the attention's
lse.

During the warm-up the indexer learns to match the dense attention: with
q [B,T,N,P], k [B,S,N,P] the attention's queries and keys (P = H + R for
MLA, the head dim for GQA), lse [B,T,N] each head's final logsumexp (the
second output of ``mla_flash``) and I the indexer logits,
  s[n,t,s] = scale * q[t,n] . k[s,n]
  p[t,s]   = (1/N) sum_n exp(s[n,t,s] - lse[t,n])     (softmax per head, mean)
  I[t,s]   = sum_i w[t,i] relu(q_I[t,i] . k_I[s])
  KL[t]    = sum_s p~ (log p~ - log_softmax_s I[t,s]),   p~ = p / sum_s p
           = sum_s p~ (log p~ - I[t,s]) + logsumexp_s I[t,s]
over the causal in-segment keys (self-attention, T == S). Query chunks of
``chunk`` rows; per chunk the chunk's logits [B, chunk, S] (the
indexer_logits kernel), then
  warmup_kl  grid (B, chunk / block_q): loops over key blocks up to the
             diagonal and over the N heads inside; keeps only row scalars
             Z = sum p, sum p (log p - I) and an online logsumexp of I.
  KL[t] = sum p (log p - I) / Z - log Z + lse_I[t]. No T x S x N, no T x S.
The target is detached (zero cotangent for q, k, lse). dKL/dI[t,s] =
softmax(I[t])[s] - p~[t,s]; its kernel (grid B x chunk-blocks x S-blocks)
recomputes p per tile from the saved row scalars and feeds the indexer_logits
backward; the logits are recomputed there, so a chunk keeps only its inputs
and two [chunk] vectors between the passes.

``kl_from_logits`` is the KL kernel and its backward alone, for a query slab
at any position whose logits are given. ``warmup_kl_reference`` and
``kl_from_logits_reference`` are the jnp twins (same positional arguments;
the chunked reference takes ``q_chunk`` where the kernel takes ``chunk``,
``block`` and ``interpret``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsax.kernels import reference
from dsax.kernels.indexer import IndexerBlocks, LogitsBlocks
from dsax.kernels.indexer import check_inputs as check_indexer_inputs
from dsax.kernels.indexer import indexer_logits
from dsax.kernels.query_chunks import causal_segment_mask, map_query_chunks
from dsax.kernels.reference import kl_divergence
from dsax.kernels.tiling import (NEG_INF, check_blocks, dot_nt, pad_axis,
                                 pieces, pow2, resolve_interpret, round_up,
                                 split_pieces, take, tile_mask)


@dataclasses.dataclass(frozen=True)
class WarmupKLBlocks:
  """Tile sizes of the KL and dlogits kernels (powers of two >= 16, clipped
  to the problem); the chunk's logits use the indexer's LogitsBlocks."""
  block_q: int = 64         # 64 x 64 spills at N 128, P 192 with 4 warps
  block_k: int = 32         # (sm_90)
  num_warps: int = 4
  num_stages: int = 2


# -------------------------------------------------------------- reference


def kl_from_logits_reference(q_BTNP: jax.Array, k_BSNP: jax.Array,
                             lse_BTN: jax.Array, logits_BTS: jax.Array,
                             scale: float, q_seg_BT: jax.Array | None = None,
                             k_seg_BS: jax.Array | None = None,
                             q_start=0) -> jax.Array:
  """jnp twin of ``kl_from_logits``: queries at positions q_start + [0, T)
  against keys [0, S), probabilities from the given per-head lse. KL_BT f32;
  the gradient reaches only the logits."""
  q_BTNP, k_BSNP, lse_BTN = jax.lax.stop_gradient((q_BTNP, k_BSNP, lse_BTN))
  t, s_len = q_BTNP.shape[1], k_BSNP.shape[1]
  mask_BTS = causal_segment_mask(q_start + jnp.arange(t), jnp.arange(s_len),
                                 q_seg_BT, k_seg_BS)
  s_BNTS = jnp.einsum("btnp,bsnp->bnts", q_BTNP, k_BSNP,
                      preferred_element_type=jnp.float32) * scale
  # Masked logits as in the attention (exp(NEG_INF - lse) = 0).
  s_BNTS = jnp.where(mask_BTS[:, None], s_BNTS, NEG_INF)
  prob_BNTS = jnp.exp(s_BNTS - jnp.swapaxes(lse_BTN, 1, 2)[..., None])
  p_BTS = jnp.mean(prob_BNTS, axis=1)
  p_BTS = p_BTS / jnp.maximum(jnp.sum(p_BTS, axis=-1, keepdims=True), 1e-30)
  return kl_divergence(p_BTS, logits_BTS, mask_BTS)


def warmup_kl_reference(q_BTNP: jax.Array, k_BSNP: jax.Array,
                        lse_BTN: jax.Array, q_I_BTIJ: jax.Array,
                        k_I_BSJ: jax.Array, w_BTI: jax.Array, scale: float,
                        segment_ids_BT: jax.Array | None = None,
                        q_chunk: int = 512) -> jax.Array:
  """The warm-up KL_BT (f32) in jnp over query chunks of ``q_chunk``: per
  chunk the indexer logits, then ``kl_from_logits_reference``. Gradients
  reach q_I, k_I, w only; memory O(chunk * S * N)."""
  q_BTNP, k_BSNP, lse_BTN = jax.lax.stop_gradient((q_BTNP, k_BSNP, lse_BTN))
  b, s_len = k_BSNP.shape[:2]
  seg_BS = (jnp.zeros((b, s_len), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  seg_BT = (jnp.zeros(q_BTNP.shape[:2], jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)

  def chunk_fn(start, q_BTNP, lse_BTN, q_I_BTIJ, w_BTI, seg_BT):
    logits_BTS = reference.indexer_logits(q_I_BTIJ, k_I_BSJ, w_BTI)
    return kl_from_logits_reference(q_BTNP, k_BSNP, lse_BTN, logits_BTS,
                                    scale, seg_BT, seg_BS, start)

  return map_query_chunks(chunk_fn, q_chunk, q_BTNP, lse_BTN, q_I_BTIJ,
                          w_BTI, seg_BT)


# ---------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Layout:
  b: int
  t: int
  s: int
  n: int
  parts: tuple            # pieces of the qk dim P
  bq: int
  bk: int
  tp: int
  sp: int
  has_seg: bool

  @property
  def widths(self):
    return [padded for _, _, padded in self.parts]


def _layout(q, k, has_seg, block: WarmupKLBlocks) -> _Layout:
  b, t, n, p = q.shape
  s = k.shape[1]
  bq = min(pow2(block.block_q), pow2(t))
  bk = min(pow2(block.block_k), pow2(s))
  return _Layout(b=b, t=t, s=s, n=n, parts=tuple(pieces(p)), bq=bq, bk=bk,
                 tp=round_up(t, bq), sp=round_up(s, bk), has_seg=has_seg)


def _params(block):
  return plgpu.CompilerParams(num_warps=block.num_warps,
                              num_stages=block.num_stages)


# ---------------------------------------------------------------- kernels


def _head_mean_probs(q_refs, k_refs, lse_ref, keys, mask, *, n_heads, scale,
                     trips):
  """p[t, s] = (1/N) sum_n exp(scale q[t,n].k[s,n] - lse[n,t]) on ``mask``,
  the first ``trips`` heads (N, or 0 to skip a tile with nothing visible)."""
  def head(n, p):
    s = dot_nt(q_refs[0][:, n, :], k_refs[0][keys, n, :])
    for q_ref, k_ref in zip(q_refs[1:], k_refs[1:]):
      s = s + dot_nt(q_ref[:, n, :], k_ref[keys, n, :])
    return p + jnp.where(mask, jnp.exp(s * scale - lse_ref[n, :][:, None]),
                         0.0)

  p = jax.lax.fori_loop(jnp.int32(0), trips, head,
                        jnp.zeros(mask.shape, jnp.float32))
  return p * (1.0 / n_heads)


def _kl_fwd_kernel(*refs, n_parts, n_heads, has_seg, scale, bk, s_real,
                   n_kblocks):
  it = iter(refs)
  qpos_ref = next(it)
  seg_q_ref, seg_k_ref = take(it, 2) if has_seg else (None, None)
  q_refs, k_refs = take(it, n_parts), take(it, n_parts)
  lse_ref, logit_ref, kl_ref, lse_i_ref, z_ref = take(it, 5)
  qpos = qpos_ref[...]
  seg_q = seg_q_ref[...] if has_seg else None
  rows = qpos.shape[0]

  def body(j, carry):
    z, cross, m, l = carry
    keys = pl.ds(j * bk, bk)
    kpos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
    mask = tile_mask(qpos, kpos, seg_q,
                     seg_k_ref[keys] if has_seg else None, s_real)
    p = _head_mean_probs(q_refs, k_refs, lse_ref, keys, mask,
                         n_heads=n_heads, scale=scale, trips=n_heads)
    logit = jnp.where(mask, logit_ref[:, keys], NEG_INF)
    z = z + jnp.sum(p, axis=1)
    # p > 0 only on mask; there logit is the real one.
    terms = jnp.where(p > 0, p * (jnp.log(p) - logit), 0.0)
    cross = cross + jnp.sum(terms, axis=1)
    m_new = jnp.maximum(m, jnp.max(logit, axis=1))
    l = l * jnp.exp(m - m_new) + jnp.sum(
        jnp.where(mask, jnp.exp(logit - m_new[:, None]), 0.0), axis=1)
    return z, cross, m_new, l

  # Causal: key blocks up to the one holding the block's last query.
  upper = jnp.minimum(jax.lax.div(jnp.max(qpos) + bk, bk), n_kblocks)
  zeros = jnp.zeros((rows,), jnp.float32)
  z, cross, m, l = jax.lax.fori_loop(
      jnp.int32(0), upper, body,
      (zeros, zeros, jnp.full((rows,), NEG_INF, jnp.float32), zeros))
  # Rows with no visible key (padding only) get finite junk, dropped later.
  z = jnp.maximum(z, 1e-30)
  lse_i = m + jnp.log(jnp.maximum(l, 1e-30))
  kl_ref[...] = cross / z - jnp.log(z) + lse_i
  lse_i_ref[...] = lse_i
  z_ref[...] = z


def _kl_dlogits_kernel(*refs, n_parts, n_heads, has_seg, scale, s_real):
  """One [block_q, block_k] tile of g[t] (softmax(I[t])[s] - p[t,s] / Z[t])."""
  it = iter(refs)
  qpos_ref = next(it)
  seg_q_ref, seg_k_ref = take(it, 2) if has_seg else (None, None)
  q_refs, k_refs = take(it, n_parts), take(it, n_parts)
  lse_ref, logit_ref, lse_i_ref, z_ref, g_ref, dl_ref = take(it, 6)
  bk = dl_ref.shape[1]
  qpos = qpos_ref[...]
  kpos = pl.program_id(2) * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
  mask = tile_mask(qpos, kpos, seg_q_ref[...] if has_seg else None,
                   seg_k_ref[...] if has_seg else None, s_real)
  # A tile wholly above the diagonal has nothing visible: skip its heads.
  live = pl.program_id(2) * bk <= jnp.max(qpos)
  p = _head_mean_probs(q_refs, k_refs, lse_ref, slice(None), mask,
                       n_heads=n_heads, scale=scale,
                       trips=jnp.where(live, jnp.int32(n_heads), jnp.int32(0)))
  soft = jnp.exp(logit_ref[...] - lse_i_ref[...][:, None])
  dl = g_ref[...][:, None] * (soft - p / z_ref[...][:, None])
  dl_ref[...] = jnp.where(mask, dl, 0.0)


def _operands(q, k, lse, logits, q_seg, k_seg, q_start, lay):
  qs = split_pieces(q, lay.tp, lay.parts)
  ks = split_pieces(k, lay.sp, lay.parts)
  lse_p = pad_axis(jnp.swapaxes(lse, 1, 2), 2, lay.tp)
  logits_p = pad_axis(pad_axis(logits.astype(jnp.float32), 1, lay.tp), 2,
                      lay.sp)
  qpos = jnp.asarray(q_start, jnp.int32) + jnp.arange(lay.tp, dtype=jnp.int32)
  segs = ([] if not lay.has_seg else
          [pad_axis(q_seg.astype(jnp.int32), 1, lay.tp, value=-1),
           pad_axis(k_seg.astype(jnp.int32), 1, lay.sp, value=-2)])
  return [qpos] + segs + qs + ks + [lse_p, logits_p]


def _kl_forward(q, k, lse, logits, q_seg, k_seg, q_start, scale, block,
                interpret):
  lay = _layout(q, k, q_seg is not None, block)
  row = pl.BlockSpec((None, lay.bq), lambda b, i: (b, i))
  in_specs = ([pl.BlockSpec((lay.bq,), lambda b, i: (i,))]
              + ([row, pl.BlockSpec((None, lay.sp), lambda b, i: (b, 0))]
                 if lay.has_seg else [])
              + [pl.BlockSpec((None, lay.bq, lay.n, w),
                              lambda b, i: (b, i, 0, 0)) for w in lay.widths]
              + [pl.BlockSpec((None, lay.sp, lay.n, w),
                              lambda b, i: (b, 0, 0, 0)) for w in lay.widths]
              + [pl.BlockSpec((None, lay.n, lay.bq), lambda b, i: (b, 0, i)),
                 pl.BlockSpec((None, lay.bq, lay.sp), lambda b, i: (b, i, 0))])
  kernel = functools.partial(
      _kl_fwd_kernel, n_parts=len(lay.parts), n_heads=lay.n,
      has_seg=lay.has_seg, scale=scale, bk=lay.bk, s_real=lay.s,
      n_kblocks=lay.sp // lay.bk)
  kl, lse_i, z = pl.pallas_call(
      kernel, grid=(lay.b, lay.tp // lay.bq), in_specs=in_specs,
      out_specs=[row] * 3,
      out_shape=[jax.ShapeDtypeStruct((lay.b, lay.tp), jnp.float32)] * 3,
      interpret=interpret, compiler_params=_params(block),
      name="warmup_kl",
  )(*_operands(q, k, lse, logits, q_seg, k_seg, q_start, lay))
  return kl[:, :lay.t], lse_i, z


def _kl_dlogits(q, k, lse, logits, q_seg, k_seg, q_start, lse_i, z, g, scale,
                block, interpret):
  lay = _layout(q, k, q_seg is not None, block)
  row = pl.BlockSpec((None, lay.bq), lambda b, i, j: (b, i))
  tile = pl.BlockSpec((None, lay.bq, lay.bk), lambda b, i, j: (b, i, j))
  in_specs = ([pl.BlockSpec((lay.bq,), lambda b, i, j: (i,))]
              + ([row, pl.BlockSpec((None, lay.bk), lambda b, i, j: (b, j))]
                 if lay.has_seg else [])
              + [pl.BlockSpec((None, lay.bq, lay.n, w),
                              lambda b, i, j: (b, i, 0, 0))
                 for w in lay.widths]
              + [pl.BlockSpec((None, lay.bk, lay.n, w),
                              lambda b, i, j: (b, j, 0, 0))
                 for w in lay.widths]
              + [pl.BlockSpec((None, lay.n, lay.bq),
                              lambda b, i, j: (b, 0, i)), tile, row, row, row])
  kernel = functools.partial(
      _kl_dlogits_kernel, n_parts=len(lay.parts), n_heads=lay.n,
      has_seg=lay.has_seg, scale=scale, s_real=lay.s)
  g_p = pad_axis(g.astype(jnp.float32), 1, lay.tp)   # padded rows: g = 0
  dl = pl.pallas_call(
      kernel, grid=(lay.b, lay.tp // lay.bq, lay.sp // lay.bk),
      in_specs=in_specs, out_specs=tile,
      out_shape=jax.ShapeDtypeStruct((lay.b, lay.tp, lay.sp), jnp.float32),
      interpret=interpret, compiler_params=_params(block),
      name="warmup_kl_dlogits",
  )(*_operands(q, k, lse, logits, q_seg, k_seg, q_start, lay), lse_i, z,
    g_p)
  return dl[:, :lay.t, :lay.s].astype(logits.dtype)


# ---------------------------------------------------- KL given the logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _kl_from_logits(q, k, lse, logits, q_seg, k_seg, q_start, scale, block,
                    interpret):
  return _kl_forward(q, k, lse, logits, q_seg, k_seg, q_start, scale, block,
                     interpret)[0]


def _kl_from_logits_fwd(q, k, lse, logits, q_seg, k_seg, q_start, scale,
                        block, interpret):
  kl, lse_i, z = _kl_forward(q, k, lse, logits, q_seg, k_seg, q_start, scale,
                             block, interpret)
  return kl, (q, k, lse, logits, q_seg, k_seg, q_start, lse_i, z)


def _kl_from_logits_bwd(scale, block, interpret, res, g):
  q, k, lse, logits, q_seg, k_seg, q_start, lse_i, z = res
  dl = _kl_dlogits(q, k, lse, logits, q_seg, k_seg, q_start, lse_i, z, g,
                   scale, block, interpret)
  # The target side is detached: no cotangent for q, k, lse.
  return (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(lse), dl,
          None, None, None)


_kl_from_logits.defvjp(_kl_from_logits_fwd, _kl_from_logits_bwd)


def kl_from_logits(q_BTNP: jax.Array, k_BSNP: jax.Array, lse_BTN: jax.Array,
                   logits_BTS: jax.Array, scale: float,
                   q_seg_BT: jax.Array | None = None,
                   k_seg_BS: jax.Array | None = None, q_start=0, *,
                   block: WarmupKLBlocks = WarmupKLBlocks(),
                   interpret: bool | None = None) -> jax.Array:
  """The warm-up KL per query [B, T] f32 for queries at positions q_start +
  [0, T) (``q_start`` may be traced) against keys [0, S), from each head's
  final ``lse_BTN`` and the indexer logits; differentiable in the logits only
  (q, k, lse are the detached target)."""
  if lse_BTN.shape != q_BTNP.shape[:3]:
    raise ValueError(f"lse_BTN shape {lse_BTN.shape} != (B, T, N) = "
                     f"{q_BTNP.shape[:3]} from q_BTNP")
  want = q_BTNP.shape[:2] + k_BSNP.shape[1:2]
  if logits_BTS.shape != want:
    raise ValueError(f"logits_BTS shape {logits_BTS.shape} != (B, T, S) = "
                     f"{want}")
  if (q_seg_BT is None) != (k_seg_BS is None):
    raise ValueError("q_seg_BT and k_seg_BS must be given together")
  if q_seg_BT is not None and (q_seg_BT.shape != want[:2]
                               or k_seg_BS.shape != k_BSNP.shape[:2]):
    raise ValueError(f"segment shapes {q_seg_BT.shape}, {k_seg_BS.shape} != "
                     f"(B, T) {want[:2]}, (B, S) {k_BSNP.shape[:2]}")
  check_blocks(block, ("block_q", "block_k"))
  q_BTNP, k_BSNP, lse_BTN = jax.lax.stop_gradient((q_BTNP, k_BSNP, lse_BTN))
  return _kl_from_logits(q_BTNP, k_BSNP, lse_BTN, logits_BTS, q_seg_BT,
                         k_seg_BS, q_start, float(scale), block,
                         resolve_interpret(interpret))


# ------------------------------------------------- KL per query chunk


def _chunk_logits(q_i, k_i, w_i, interpret):
  return indexer_logits(q_i, k_i, w_i, block=LogitsBlocks(),
                        interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _chunk_kl(q, k, lse, q_i, k_i, w_i, q_seg, k_seg, q_start, scale, block,
              interpret):
  logits = _chunk_logits(q_i, k_i, w_i, interpret)
  return _kl_forward(q, k, lse, logits, q_seg, k_seg, q_start, scale, block,
                     interpret)[0]


def _chunk_kl_fwd(q, k, lse, q_i, k_i, w_i, q_seg, k_seg, q_start, scale,
                  block, interpret):
  logits = _chunk_logits(q_i, k_i, w_i, interpret)
  kl, lse_i, z = _kl_forward(q, k, lse, logits, q_seg, k_seg, q_start, scale,
                             block, interpret)
  # Row scalars only: the [chunk, S] logits are recomputed in the backward.
  return kl, (q, k, lse, q_i, k_i, w_i, q_seg, k_seg, q_start, lse_i, z)


def _chunk_kl_bwd(scale, block, interpret, res, g):
  q, k, lse, q_i, k_i, w_i, q_seg, k_seg, q_start, lse_i, z = res
  logits, logits_vjp = jax.vjp(
      lambda *a: _chunk_logits(*a, interpret), q_i, k_i, w_i)
  dl = _kl_dlogits(q, k, lse, logits, q_seg, k_seg, q_start, lse_i, z, g,
                   scale, block, interpret)
  return ((jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(lse))
          + tuple(logits_vjp(dl)) + (None, None, None))


_chunk_kl.defvjp(_chunk_kl_fwd, _chunk_kl_bwd)


# ----------------------------------------------------------------- public


def check_inputs(q_BTNP, k_BSNP, lse_BTN, q_I_BTIJ, k_I_BSJ, w_BTI, scale,
                 segment_ids_BT, chunk, block: WarmupKLBlocks):
  """Raises ValueError/TypeError naming the offending values."""
  for name, x in (("q_BTNP", q_BTNP), ("k_BSNP", k_BSNP)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have 4 axes, got shape {x.shape}")
  b, t, n, p = q_BTNP.shape
  if k_BSNP.shape[0] != b or k_BSNP.shape[2:] != (n, p):
    raise ValueError(f"k_BSNP shape {k_BSNP.shape} does not match q_BTNP "
                     f"shape {q_BTNP.shape} (need B={b}, N={n}, P={p})")
  if k_BSNP.shape[1] != t:
    raise ValueError(f"warmup_kl is causal self-attention: needs T == S, "
                     f"got T={t}, S={k_BSNP.shape[1]}")
  if q_BTNP.dtype != k_BSNP.dtype:
    raise TypeError(f"q_BTNP dtype {q_BTNP.dtype} != k_BSNP dtype "
                    f"{k_BSNP.dtype}")
  if not jnp.issubdtype(q_BTNP.dtype, jnp.floating):
    raise TypeError(f"q_BTNP must be floating, got {q_BTNP.dtype}")
  if lse_BTN.shape != (b, t, n):
    raise ValueError(f"lse_BTN shape {lse_BTN.shape} != (B, T, N) = "
                     f"{(b, t, n)} from q_BTNP")
  check_indexer_inputs(q_I_BTIJ, k_I_BSJ, w_BTI, 1, segment_ids_BT,
                       IndexerBlocks())
  if q_I_BTIJ.shape[:2] != (b, t) or k_I_BSJ.shape[1] != t:
    raise ValueError(f"indexer shapes q_I_BTIJ {q_I_BTIJ.shape}, k_I_BSJ "
                     f"{k_I_BSJ.shape} do not match q_BTNP {q_BTNP.shape}, "
                     f"k_BSNP {k_BSNP.shape} in (B, T) and S")
  if not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a static Python number, got {scale!r}")
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk must be a positive int, got {chunk!r}")
  check_blocks(block, ("block_q", "block_k"))


def warmup_kl(q_BTNP: jax.Array, k_BSNP: jax.Array, lse_BTN: jax.Array,
              q_I_BTIJ: jax.Array, k_I_BSJ: jax.Array, w_BTI: jax.Array,
              scale: float, segment_ids_BT: jax.Array | None = None, *,
              chunk: int = 512, block: WarmupKLBlocks = WarmupKLBlocks(),
              interpret: bool | None = None) -> jax.Array:
  """The warm-up KL_BT (f32) of causal self-attention (q, k and the final
  ``lse_BTN`` of ``mla_flash``) against the indexer logits of (q_I, k_I, w),
  over query chunks of ``chunk``: per chunk the indexer_logits kernel, then
  the KL kernel. q, k, lse are detached: gradients reach q_I, k_I, w only. A
  chunk keeps its inputs and two row vectors for the backward, which
  recomputes its logits, so memory stays O(chunk * S). Every chunk reads all
  S keys (the KL kernel stops at the diagonal; the logits kernel does not,
  at most twice the causal work). ``interpret=None`` interprets on CPU and
  compiles (Triton) elsewhere."""
  check_inputs(q_BTNP, k_BSNP, lse_BTN, q_I_BTIJ, k_I_BSJ, w_BTI, scale,
               segment_ids_BT, chunk, block)
  interpret = resolve_interpret(interpret)
  seg_BS = segment_ids_BT
  q_BTNP, k_BSNP, lse_BTN = jax.lax.stop_gradient((q_BTNP, k_BSNP, lse_BTN))

  def chunk_fn(start, q_BTNP, lse_BTN, q_I_BTIJ, w_BTI, *seg_BT):
    return _chunk_kl(q_BTNP, k_BSNP, lse_BTN, q_I_BTIJ, k_I_BSJ, w_BTI,
                     seg_BT[0] if seg_BT else None, seg_BS, start,
                     float(scale), block, interpret)

  rows = ((q_BTNP, lse_BTN, q_I_BTIJ, w_BTI)
          + (() if segment_ids_BT is None else (segment_ids_BT,)))
  return map_query_chunks(chunk_fn, chunk, *rows, remat=False)
