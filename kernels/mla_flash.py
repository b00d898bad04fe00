"""Causal dense attention for expanded ("MHA" form) MLA as Pallas kernels.

  q [B,T,N,K], k [B,S,N,K], v [B,S,N,E], K = H + R (the qk head dim)
  s[n,t,s] = scale * q[t,n] . k[s,n],  masked to s <= t (same segment)
  lse[t,n] = logsumexp_s s,  o[t,n] = sum_s exp(s - lse) v[s,n]
Backward (flash attention 2): p recomputed from lse, delta = sum(o * do),
  dv = p^T do,  ds = p * (do v^T - delta + dlse),
  dq = scale * ds k,  dk = scale * ds^T q.

Kernels (Triton style: BlockSpecs, ref indexing, fori_loop over blocks with
causal trip counts, no atomics; each program owns its output block):
  forward  grid (B, T / block_q, N): online softmax over key blocks up to the
           diagonal; writes o and lse.
  dkv      grid (B, S / block_k_bwd, N): loops over the query blocks at or
           below the diagonal; writes dk, dv of its key block.
  dq       grid (B, T / block_q_bwd, N): loops over key blocks; writes dq.

Layout. K is split into power-of-two pieces (192 = 128 + 64, 72 = 64 + 8->16)
and E padded to a power of two >= 16, so every tile is a legal Triton block
without padding K = 192 to 256. T and S are padded to whole blocks; padded
keys are masked, padded queries are dropped (their do is zero).

Warm-up target (``target=(q_I, k_I, w)``), the DSA dense warm-up KL per token
  p[t,s] = (1/N) sum_n exp(s[n,t,s] - lse[t,n])     (softmax per head, mean)
  KL[t]  = sum_s p~ (log p~ - I[t,s]) + logsumexp_s I[t,s],  p~ = p / sum_s p
over causal in-segment keys, I the indexer logits. After the attention forward
(every head's final lse known), query chunks of ``target_chunk`` rows: the
chunk's logits [B, chunk, S] (the indexer_logits kernel), then
  warmup_kl  grid (B, chunk / block_q_kl): loops over key blocks up to the
             diagonal and over the N heads inside; keeps only row scalars
             Z = sum p, sum p (log p - I) and an online logsumexp of I.
  KL[t] = sum p (log p - I) / Z - log Z + lse_I[t]. No T x S x N, no T x S.
The target is detached (zero cotangent for q, k, lse). dKL/dI[t,s] =
softmax(I[t])[s] - p~[t,s]; its kernel (grid B x chunk-blocks x S-blocks)
recomputes p per tile from the saved row scalars and feeds the indexer_logits
backward; the logits are recomputed there, so a chunk keeps only its inputs
and two [chunk] vectors between the passes.

``mla_flash_reference`` (same signature) is the chunked dense jnp version;
``warmup_kl_reference`` the jnp twin of ``warmup_kl``.
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
from dsax.kernels.tiling import (check_blocks, pad_axis, pow2,
                                 resolve_interpret, round_up)

NEG_INF = -1e30   # masked logit, as in the model's dense path


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
  """Tile sizes (powers of two >= 16, clipped to the problem)."""
  block_q: int = 64         # forward
  block_k: int = 64
  block_q_bwd: int = 32     # dq and dkv kernels
  block_k_bwd: int = 32
  block_q_kl: int = 64      # warm-up target (KL, dlogits); 64 x 64 spills
  block_k_kl: int = 32      # at N 128, K 192 with 4 warps (sm_90)
  num_warps: int = 4
  num_stages: int = 2


def pieces(d: int, least: int = 16) -> list[tuple[int, int, int]]:
  """(start, size, padded size): power-of-two pieces of d, largest first;
  a remainder under ``least`` becomes one padded piece."""
  out, start = [], 0
  while start < d:
    rest = d - start
    size = rest if rest < least else 1 << (rest.bit_length() - 1)
    out.append((start, size, pow2(size, least)))
    start += size
  return out


def dot_nt(a, b):
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def dot_nn(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def dot_tn(a, b):
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


# -------------------------------------------------------------- reference


def target_kl_rows(prob_BNTS: jax.Array, logits_BTS: jax.Array,
                   mask_BTS: jax.Array) -> jax.Array:
  """KL(p_t || softmax(I_t)) per query [B, T] over ``mask``: p the detached
  head mean of the per-head probabilities, L1-normalised."""
  p = jax.lax.stop_gradient(jnp.mean(prob_BNTS, axis=1))
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  logq = jax.nn.log_softmax(jnp.where(mask_BTS, logits_BTS, NEG_INF), axis=-1)
  terms = jax.scipy.special.xlogy(p, p) - p * logq
  return jnp.sum(jnp.where(mask_BTS, terms, 0.0), axis=-1)


def mla_flash_reference(q_BTNK: jax.Array, k_BSNK: jax.Array,
                        v_BSNE: jax.Array, scale: float,
                        segment_ids_BT: jax.Array | None = None, *,
                        target: tuple | None = None, q_chunk: int = 256,
                        **unused):
  """Causal dense attention over query chunks (jnp). Returns (o_BTNE in q's
  dtype, lse_BTN f32), and the warm-up KL_BT (f32) when ``target = (q_I_BTIJ,
  k_I_BSJ, w_BTI)`` is given. Extra keyword arguments (block, interpret,
  target_chunk) are accepted and ignored so that it shares the kernel's call
  signature."""
  del unused
  b, s_len = k_BSNK.shape[:2]
  k_index = jnp.arange(s_len)
  seg_BS = (jnp.zeros((b, s_len), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  seg_BT = (jnp.zeros(q_BTNK.shape[:2], jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  q_i, k_i, w_i = (None, None, None) if target is None else target

  def chunk_fn(start, q, seg, *target_rows):
    s = jnp.einsum("btnk,bsnk->bnts", q, k_BSNK,
                   preferred_element_type=jnp.float32) * scale
    mask = causal_segment_mask(start + jnp.arange(q.shape[1]), k_index, seg,
                               seg_BS)
    s = jnp.where(mask[:, None], s, NEG_INF)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    o = jnp.einsum("bnts,bsne->btne", p.astype(v_BSNE.dtype), v_BSNE,
                   preferred_element_type=jnp.float32)
    out = (o.astype(q.dtype), jnp.swapaxes(lse, 1, 2))
    if not target_rows:
      return out
    logits = reference.indexer_logits(target_rows[0], k_i, target_rows[1])
    return out + (target_kl_rows(p, logits, mask),)

  rows = () if target is None else (q_i, w_i)
  return map_query_chunks(chunk_fn, q_chunk, q_BTNK, seg_BT, *rows)


def warmup_kl_reference(q_BTNK: jax.Array, k_BSNK: jax.Array,
                        lse_BTN: jax.Array, logits_BTS: jax.Array,
                        scale: float, q_seg_BT: jax.Array | None = None,
                        k_seg_BS: jax.Array | None = None, q_start=0,
                        **unused) -> jax.Array:
  """jnp twin of ``warmup_kl``: queries at positions q_start + [0, T) against
  keys [0, S); probabilities from the given per-head lse. KL_BT f32."""
  del unused
  t, s_len = q_BTNK.shape[1], k_BSNK.shape[1]
  mask = causal_segment_mask(q_start + jnp.arange(t), jnp.arange(s_len),
                             q_seg_BT, k_seg_BS)
  s = jnp.einsum("btnk,bsnk->bnts", q_BTNK, k_BSNK,
                 preferred_element_type=jnp.float32) * scale
  lse = jnp.swapaxes(lse_BTN, 1, 2)[..., None]
  prob = jnp.where(mask[:, None], jnp.exp(s - lse), 0.0)
  return target_kl_rows(prob, logits_BTS, mask)


# ---------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Layout:
  b: int
  t: int
  s: int
  n: int
  dk: int
  e: int
  parts: tuple            # pieces of the qk dim
  ep: int
  bq: int
  bk: int
  bqb: int
  bkb: int
  tp: int
  sp: int
  has_seg: bool

  @property
  def widths(self):
    return [p[2] for p in self.parts]


def _layout(q, k, v, has_seg, block: FlashBlocks) -> _Layout:
  b, t, n, dk = q.shape
  s, e = k.shape[1], v.shape[3]
  bq, bqb = (min(pow2(x), pow2(t)) for x in (block.block_q, block.block_q_bwd))
  bk, bkb = (min(pow2(x), pow2(s)) for x in (block.block_k, block.block_k_bwd))
  return _Layout(b=b, t=t, s=s, n=n, dk=dk, e=e, parts=tuple(pieces(dk)),
                 ep=pow2(e), bq=bq, bk=bk, bqb=bqb, bkb=bkb,
                 tp=round_up(t, max(bq, bqb)), sp=round_up(s, max(bk, bkb)),
                 has_seg=has_seg)


def _split(x_BTNK, length, lay: _Layout):
  x = pad_axis(x_BTNK, 1, length)
  return [pad_axis(x[..., a:a + size], 3, padded)
          for a, size, padded in lay.parts]


def _join(parts, lay: _Layout):
  return jnp.concatenate([p[:, :, :, :size] for p, (_, size, _) in
                          zip(parts, lay.parts)], axis=-1)


def _segs(segment_ids_BT, lay: _Layout):
  """(q segments [B,Tp], k segments [B,Sp]); padding never matches."""
  if not lay.has_seg:
    return []
  seg = segment_ids_BT.astype(jnp.int32)
  return [pad_axis(seg, 1, lay.tp, value=-1), pad_axis(seg, 1, lay.sp,
                                                       value=-2)]


def _mask(qpos, kpos, seg_q, seg_k, s_real):
  m = (kpos[None, :] <= qpos[:, None]) & (kpos < s_real)[None, :]
  if seg_q is not None:
    m = m & (seg_q[:, None] == seg_k[None, :])
  return m


def _take(it, n):
  return [next(it) for _ in range(n)]


def _params(block):
  return plgpu.CompilerParams(num_warps=block.num_warps,
                              num_stages=block.num_stages)


# ---------------------------------------------------------------- forward


def _fwd_kernel(*refs, n_parts, has_seg, scale, bq, bk, s_real, n_kblocks):
  it = iter(refs)
  seg_q_ref, seg_k_ref = _take(it, 2) if has_seg else (None, None)
  q_refs, k_refs = _take(it, n_parts), _take(it, n_parts)
  v_ref, o_ref, lse_ref = _take(it, 3)
  i = pl.program_id(1)
  qpos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq,), 0)
  qs = [r[...] for r in q_refs]
  seg_q = seg_q_ref[...] if has_seg else None

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * bk, bk)
    s = dot_nt(qs[0], k_refs[0][keys, :])
    for q, k_ref in zip(qs[1:], k_refs[1:]):
      s = s + dot_nt(q, k_ref[keys, :])
    kpos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
    mask = _mask(qpos, kpos, seg_q, seg_k_ref[keys] if has_seg else None,
                 s_real)
    s = jnp.where(mask, s * scale, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = corr * l + jnp.sum(p, axis=1)
    v = v_ref[keys, :]
    acc = corr[:, None] * acc + dot_nn(p.astype(v.dtype), v)
    return acc, m_new, l

  # Causal: key blocks up to the one holding this block's last query.
  upper = jnp.minimum(jax.lax.div((i + 1) * bq + bk - 1, bk), n_kblocks)
  acc = jnp.zeros((bq, v_ref.shape[1]), jnp.float32)
  m = jnp.full((bq,), NEG_INF, jnp.float32)
  l = jnp.zeros((bq,), jnp.float32)
  acc, m, l = jax.lax.fori_loop(0, upper, body, (acc, m, l))
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _forward(q, k, v, segment_ids, scale, block, interpret):
  lay = _layout(q, k, v, segment_ids is not None, block)
  qs, ks = _split(q, lay.tp, lay), _split(k, lay.sp, lay)
  v_p = pad_axis(pad_axis(v, 1, lay.sp), 3, lay.ep)
  qblk = lambda w: pl.BlockSpec((None, lay.bq, None, w),
                                lambda b, i, h: (b, i, h, 0))
  kfull = lambda w: pl.BlockSpec((None, lay.sp, None, w),
                                 lambda b, i, h: (b, 0, h, 0))
  seg_specs = [pl.BlockSpec((None, lay.bq), lambda b, i, h: (b, i)),
               pl.BlockSpec((None, lay.sp), lambda b, i, h: (b, 0))]
  in_specs = ((seg_specs if lay.has_seg else [])
              + [qblk(w) for w in lay.widths] + [kfull(w) for w in lay.widths]
              + [kfull(lay.ep)])
  out_specs = [qblk(lay.ep),
               pl.BlockSpec((None, None, lay.bq), lambda b, i, h: (b, h, i))]
  out_shape = [jax.ShapeDtypeStruct((lay.b, lay.tp, lay.n, lay.ep), q.dtype),
               jax.ShapeDtypeStruct((lay.b, lay.n, lay.tp), jnp.float32)]
  kernel = functools.partial(
      _fwd_kernel, n_parts=len(lay.parts), has_seg=lay.has_seg, scale=scale,
      bq=lay.bq, bk=lay.bk, s_real=lay.s, n_kblocks=lay.sp // lay.bk)
  o, lse = pl.pallas_call(
      kernel, grid=(lay.b, lay.tp // lay.bq, lay.n), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, interpret=interpret,
      compiler_params=_params(block), name="mla_flash_fwd",
  )(*_segs(segment_ids, lay), *qs, *ks, v_p)
  return o[:, :lay.t, :, :lay.e], jnp.swapaxes(lse, 1, 2)[:, :lay.t]


# --------------------------------------------------------------- backward


def _dkv_kernel(*refs, n_parts, has_seg, scale, bq, bk, s_real, n_qblocks):
  it = iter(refs)
  seg_q_ref, seg_k_ref = _take(it, 2) if has_seg else (None, None)
  q_refs, k_refs = _take(it, n_parts), _take(it, n_parts)
  v_ref, do_ref, lse_ref, delta_ref = _take(it, 4)
  dk_refs = _take(it, n_parts)
  dv_ref = next(it)
  j = pl.program_id(1)
  kpos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
  ks = [r[...] for r in k_refs]
  v = v_ref[...]
  seg_k = seg_k_ref[...] if has_seg else None

  def body(i, carry):
    dks, dv = carry
    rows = pl.ds(i * bq, bq)
    qs = [r[rows, :] for r in q_refs]
    s = dot_nt(qs[0], ks[0])
    for q, k in zip(qs[1:], ks[1:]):
      s = s + dot_nt(q, k)
    qpos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq,), 0)
    mask = _mask(qpos, kpos, seg_q_ref[rows] if has_seg else None, seg_k,
                 s_real)
    s = jnp.where(mask, s * scale, NEG_INF)
    p = jnp.exp(s - lse_ref[rows][:, None])
    do = do_ref[rows, :]
    dv = dv + dot_tn(p.astype(do.dtype), do)
    dp = dot_nt(do, v)
    ds = (p * (dp - delta_ref[rows][:, None])).astype(qs[0].dtype)
    dks = [dk + dot_tn(ds, q) for dk, q in zip(dks, qs)]
    return dks, dv

  # Causal: query blocks from the one holding this block's first key.
  lower = jax.lax.div(j * bk, bq)
  dks = [jnp.zeros(k.shape, jnp.float32) for k in ks]
  dv = jnp.zeros(v.shape, jnp.float32)
  dks, dv = jax.lax.fori_loop(lower, n_qblocks, body, (dks, dv))
  for ref, dk in zip(dk_refs, dks):
    ref[...] = (dk * scale).astype(ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, n_parts, has_seg, scale, bq, bk, s_real, n_kblocks):
  it = iter(refs)
  seg_q_ref, seg_k_ref = _take(it, 2) if has_seg else (None, None)
  q_refs, k_refs = _take(it, n_parts), _take(it, n_parts)
  v_ref, do_ref, lse_ref, delta_ref = _take(it, 4)
  dq_refs = _take(it, n_parts)
  i = pl.program_id(1)
  qpos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq,), 0)
  qs = [r[...] for r in q_refs]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  seg_q = seg_q_ref[...] if has_seg else None

  def body(j, dqs):
    keys = pl.ds(j * bk, bk)
    ks = [r[keys, :] for r in k_refs]
    s = dot_nt(qs[0], ks[0])
    for q, k in zip(qs[1:], ks[1:]):
      s = s + dot_nt(q, k)
    kpos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
    mask = _mask(qpos, kpos, seg_q, seg_k_ref[keys] if has_seg else None,
                 s_real)
    s = jnp.where(mask, s * scale, NEG_INF)
    p = jnp.exp(s - lse[:, None])
    dp = dot_nt(do, v_ref[keys, :])
    ds = (p * (dp - delta[:, None])).astype(ks[0].dtype)
    return [dq + dot_nn(ds, k) for dq, k in zip(dqs, ks)]

  upper = jnp.minimum(jax.lax.div((i + 1) * bq + bk - 1, bk), n_kblocks)
  dqs = [jnp.zeros(q.shape, jnp.float32) for q in qs]
  dqs = jax.lax.fori_loop(0, upper, body, dqs)
  for ref, dq in zip(dq_refs, dqs):
    ref[...] = (dq * scale).astype(ref.dtype)


def _backward(scale, block, interpret, res, cotangents):
  q, k, v, segment_ids, o, lse = res
  do, dlse = cotangents
  lay = _layout(q, k, v, segment_ids is not None, block)
  do = do.astype(q.dtype)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = delta - dlse.astype(jnp.float32)           # [B, T, N]
  to_bnt = lambda x: pad_axis(jnp.swapaxes(x, 1, 2), 2, lay.tp)
  lse_p, delta_p = to_bnt(lse), to_bnt(delta)
  qs, ks = _split(q, lay.tp, lay), _split(k, lay.sp, lay)
  v_p = pad_axis(pad_axis(v, 1, lay.sp), 3, lay.ep)
  do_p = pad_axis(pad_axis(do, 1, lay.tp), 3, lay.ep)
  segs = _segs(segment_ids, lay)
  n_parts = len(lay.parts)
  common = dict(n_parts=n_parts, has_seg=lay.has_seg, scale=scale,
                bq=lay.bqb, bk=lay.bkb, s_real=lay.s)

  # dk, dv: one key block per program, all queries at or below it.
  qfull = lambda w: pl.BlockSpec((None, lay.tp, None, w),
                                 lambda b, j, h: (b, 0, h, 0))
  kblk = lambda w: pl.BlockSpec((None, lay.bkb, None, w),
                                lambda b, j, h: (b, j, h, 0))
  vec = pl.BlockSpec((None, None, lay.tp), lambda b, j, h: (b, h, 0))
  seg_specs = [pl.BlockSpec((None, lay.tp), lambda b, j, h: (b, 0)),
               pl.BlockSpec((None, lay.bkb), lambda b, j, h: (b, j))]
  in_specs = ((seg_specs if lay.has_seg else [])
              + [qfull(w) for w in lay.widths] + [kblk(w) for w in lay.widths]
              + [kblk(lay.ep), qfull(lay.ep), vec, vec])
  out_shape = ([jax.ShapeDtypeStruct((lay.b, lay.sp, lay.n, w), k.dtype)
                for w in lay.widths]
               + [jax.ShapeDtypeStruct((lay.b, lay.sp, lay.n, lay.ep),
                                       v.dtype)])
  *dks, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, n_qblocks=lay.tp // lay.bqb, **common),
      grid=(lay.b, lay.sp // lay.bkb, lay.n), in_specs=in_specs,
      out_specs=[kblk(w) for w in lay.widths] + [kblk(lay.ep)],
      out_shape=out_shape, interpret=interpret,
      compiler_params=_params(block), name="mla_flash_dkv",
  )(*segs, *qs, *ks, v_p, do_p, lse_p, delta_p)

  # dq: one query block per program, key blocks up to the diagonal.
  qblk = lambda w: pl.BlockSpec((None, lay.bqb, None, w),
                                lambda b, i, h: (b, i, h, 0))
  kfull = lambda w: pl.BlockSpec((None, lay.sp, None, w),
                                 lambda b, i, h: (b, 0, h, 0))
  vec = pl.BlockSpec((None, None, lay.bqb), lambda b, i, h: (b, h, i))
  seg_specs = [pl.BlockSpec((None, lay.bqb), lambda b, i, h: (b, i)),
               pl.BlockSpec((None, lay.sp), lambda b, i, h: (b, 0))]
  in_specs = ((seg_specs if lay.has_seg else [])
              + [qblk(w) for w in lay.widths] + [kfull(w) for w in lay.widths]
              + [kfull(lay.ep), qblk(lay.ep), vec, vec])
  dqs = pl.pallas_call(
      functools.partial(_dq_kernel, n_kblocks=lay.sp // lay.bkb, **common),
      grid=(lay.b, lay.tp // lay.bqb, lay.n), in_specs=in_specs,
      out_specs=[qblk(w) for w in lay.widths],
      out_shape=[jax.ShapeDtypeStruct((lay.b, lay.tp, lay.n, w), q.dtype)
                 for w in lay.widths],
      interpret=interpret, compiler_params=_params(block),
      name="mla_flash_dq",
  )(*segs, *qs, *ks, v_p, do_p, lse_p, delta_p)

  dq = _join(dqs, lay)[:, :lay.t]
  dk = _join(dks, lay)[:, :lay.s]
  dv = dv[:, :lay.s, :, :lay.e]
  return dq, dk, dv, None


# ---------------------------------------------------------- warm-up target


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
  seg_q_ref, seg_k_ref = _take(it, 2) if has_seg else (None, None)
  q_refs, k_refs = _take(it, n_parts), _take(it, n_parts)
  lse_ref, logit_ref, kl_ref, lse_i_ref, z_ref = _take(it, 5)
  qpos = qpos_ref[...]
  seg_q = seg_q_ref[...] if has_seg else None
  rows = qpos.shape[0]

  def body(j, carry):
    z, cross, m, l = carry
    keys = pl.ds(j * bk, bk)
    kpos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
    mask = _mask(qpos, kpos, seg_q, seg_k_ref[keys] if has_seg else None,
                 s_real)
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
  seg_q_ref, seg_k_ref = _take(it, 2) if has_seg else (None, None)
  q_refs, k_refs = _take(it, n_parts), _take(it, n_parts)
  lse_ref, logit_ref, lse_i_ref, z_ref, g_ref, dl_ref = _take(it, 6)
  bk = dl_ref.shape[1]
  qpos = qpos_ref[...]
  kpos = pl.program_id(2) * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
  mask = _mask(qpos, kpos, seg_q_ref[...] if has_seg else None,
               seg_k_ref[...] if has_seg else None, s_real)
  # A tile wholly above the diagonal has nothing visible: skip its heads.
  live = pl.program_id(2) * bk <= jnp.max(qpos)
  p = _head_mean_probs(q_refs, k_refs, lse_ref, slice(None), mask,
                       n_heads=n_heads, scale=scale,
                       trips=jnp.where(live, jnp.int32(n_heads), jnp.int32(0)))
  soft = jnp.exp(logit_ref[...] - lse_i_ref[...][:, None])
  dl = g_ref[...][:, None] * (soft - p / z_ref[...][:, None])
  dl_ref[...] = jnp.where(mask, dl, 0.0)


def _kl_layout(q, k, has_seg, block):
  """The attention layout with the warm-up tiles as its blocks."""
  kl = dict(block_q=block.block_q_kl, block_q_bwd=block.block_q_kl,
            block_k=block.block_k_kl, block_k_bwd=block.block_k_kl)
  return _layout(q, k, k, has_seg, dataclasses.replace(block, **kl))


def _kl_operands(q, k, lse, logits, q_seg, k_seg, q_start, lay):
  qs, ks = _split(q, lay.tp, lay), _split(k, lay.sp, lay)
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
  lay = _kl_layout(q, k, q_seg is not None, block)
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
      name="mla_flash_warmup_kl",
  )(*_kl_operands(q, k, lse, logits, q_seg, k_seg, q_start, lay))
  return kl[:, :lay.t], lse_i, z


def _kl_dlogits(q, k, lse, logits, q_seg, k_seg, q_start, lse_i, z, g, scale,
                block, interpret):
  lay = _kl_layout(q, k, q_seg is not None, block)
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
      name="mla_flash_warmup_dlogits",
  )(*_kl_operands(q, k, lse, logits, q_seg, k_seg, q_start, lay), lse_i, z,
    g_p)
  return dl[:, :lay.t, :lay.s].astype(logits.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _warmup_kl(q, k, lse, logits, q_seg, k_seg, q_start, scale, block,
               interpret):
  return _kl_forward(q, k, lse, logits, q_seg, k_seg, q_start, scale, block,
                     interpret)[0]


def _warmup_kl_fwd(q, k, lse, logits, q_seg, k_seg, q_start, scale, block,
                   interpret):
  kl, lse_i, z = _kl_forward(q, k, lse, logits, q_seg, k_seg, q_start, scale,
                             block, interpret)
  return kl, (q, k, lse, logits, q_seg, k_seg, q_start, lse_i, z)


def _warmup_kl_bwd(scale, block, interpret, res, g):
  q, k, lse, logits, q_seg, k_seg, q_start, lse_i, z = res
  dl = _kl_dlogits(q, k, lse, logits, q_seg, k_seg, q_start, lse_i, z, g,
                   scale, block, interpret)
  # The target side is detached: no cotangent for q, k, lse.
  return (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(lse), dl,
          None, None, None)


_warmup_kl.defvjp(_warmup_kl_fwd, _warmup_kl_bwd)


def warmup_kl(q_BTNK: jax.Array, k_BSNK: jax.Array, lse_BTN: jax.Array,
              logits_BTS: jax.Array, scale: float,
              q_seg_BT: jax.Array | None = None,
              k_seg_BS: jax.Array | None = None, q_start=0, *,
              block: FlashBlocks = FlashBlocks(),
              interpret: bool | None = None) -> jax.Array:
  """The warm-up KL per query [B, T] f32 for queries at positions q_start +
  [0, T) (``q_start`` may be traced) against keys [0, S), from each head's
  final ``lse_BTN`` and the indexer logits; differentiable in the logits only
  (q, k, lse are the detached target)."""
  if lse_BTN.shape != q_BTNK.shape[:3]:
    raise ValueError(f"lse_BTN shape {lse_BTN.shape} != (B, T, N) = "
                     f"{q_BTNK.shape[:3]} from q_BTNK")
  want = q_BTNK.shape[:2] + k_BSNK.shape[1:2]
  if logits_BTS.shape != want:
    raise ValueError(f"logits_BTS shape {logits_BTS.shape} != (B, T, S) = "
                     f"{want}")
  if (q_seg_BT is None) != (k_seg_BS is None):
    raise ValueError("q_seg_BT and k_seg_BS must be given together")
  if q_seg_BT is not None and (q_seg_BT.shape != want[:2]
                               or k_seg_BS.shape != k_BSNK.shape[:2]):
    raise ValueError(f"segment shapes {q_seg_BT.shape}, {k_seg_BS.shape} != "
                     f"(B, T) {want[:2]}, (B, S) {k_BSNK.shape[:2]}")
  check_blocks(block, ("block_q_kl", "block_k_kl"))
  q_BTNK, k_BSNK, lse_BTN = jax.lax.stop_gradient((q_BTNK, k_BSNK, lse_BTN))
  return _warmup_kl(q_BTNK, k_BSNK, lse_BTN, logits_BTS, q_seg_BT, k_seg_BS,
                    q_start, float(scale), block, resolve_interpret(interpret))


def _chunk_logits(q_i, k_i, w_i, interpret):
  return indexer_logits(q_i, k_i, w_i, block=LogitsBlocks(),
                        interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _target_chunk(q, k, lse, q_i, k_i, w_i, q_seg, k_seg, q_start, scale,
                  block, interpret):
  logits = _chunk_logits(q_i, k_i, w_i, interpret)
  return _kl_forward(q, k, lse, logits, q_seg, k_seg, q_start, scale, block,
                     interpret)[0]


def _target_chunk_fwd(q, k, lse, q_i, k_i, w_i, q_seg, k_seg, q_start, scale,
                      block, interpret):
  logits = _chunk_logits(q_i, k_i, w_i, interpret)
  kl, lse_i, z = _kl_forward(q, k, lse, logits, q_seg, k_seg, q_start, scale,
                             block, interpret)
  # Row scalars only: the [chunk, S] logits are recomputed in the backward.
  return kl, (q, k, lse, q_i, k_i, w_i, q_seg, k_seg, q_start, lse_i, z)


def _target_chunk_bwd(scale, block, interpret, res, g):
  q, k, lse, q_i, k_i, w_i, q_seg, k_seg, q_start, lse_i, z = res
  logits, logits_vjp = jax.vjp(
      lambda *a: _chunk_logits(*a, interpret), q_i, k_i, w_i)
  dl = _kl_dlogits(q, k, lse, logits, q_seg, k_seg, q_start, lse_i, z, g,
                   scale, block, interpret)
  return ((jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(lse))
          + tuple(logits_vjp(dl)) + (None, None, None))


_target_chunk.defvjp(_target_chunk_fwd, _target_chunk_bwd)


def warmup_target(q_BTNK: jax.Array, k_BSNK: jax.Array, lse_BTN: jax.Array,
                  target: tuple, scale: float,
                  segment_ids_BT: jax.Array | None = None, *,
                  chunk: int = 512, block: FlashBlocks = FlashBlocks(),
                  interpret: bool | None = None) -> jax.Array:
  """The warm-up KL_BT of causal self-attention against the indexer logits
  of ``target = (q_I_BTIJ, k_I_BSJ, w_BTI)``, over query chunks of
  ``chunk``: per chunk the indexer_logits kernel, then the warm-up KL kernel.
  Gradients reach q_I, k_I, w only. A chunk keeps its inputs and two row
  vectors for the backward, which recomputes its logits, so memory stays
  O(chunk * S). Every chunk reads all S keys (the KL kernel stops at the
  diagonal; the logits kernel does not, at most twice the causal work)."""
  q_i, k_i, w_i = target
  check_indexer_inputs(q_i, k_i, w_i, 1, segment_ids_BT, IndexerBlocks())
  if q_i.shape[:2] != q_BTNK.shape[:2] or k_i.shape[1] != k_BSNK.shape[1]:
    raise ValueError(f"target shapes q_I {q_i.shape}, k_I {k_i.shape} do not "
                     f"match q_BTNK {q_BTNK.shape}, k_BSNK {k_BSNK.shape} "
                     f"in (B, T) and S")
  if lse_BTN.shape != q_BTNK.shape[:3]:
    raise ValueError(f"lse_BTN shape {lse_BTN.shape} != (B, T, N) = "
                     f"{q_BTNK.shape[:3]} from q_BTNK")
  check_blocks(block, ("block_q_kl", "block_k_kl"))
  interpret = resolve_interpret(interpret)
  seg = segment_ids_BT
  q_BTNK, k_BSNK, lse_BTN = jax.lax.stop_gradient((q_BTNK, k_BSNK, lse_BTN))

  def chunk_fn(start, q, lse, qi, wi, *seg_q):
    return _target_chunk(q, k_BSNK, lse, qi, k_i, wi,
                         seg_q[0] if seg_q else None, seg, start,
                         float(scale), block, interpret)

  rows = (q_BTNK, lse_BTN, q_i, w_i) + (() if seg is None else (seg,))
  return map_query_chunks(chunk_fn, chunk, *rows, remat=False)


# ----------------------------------------------------------------- public


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _mla_flash(q, k, v, segment_ids, scale, block, interpret):
  return _forward(q, k, v, segment_ids, scale, block, interpret)


def _mla_flash_fwd(q, k, v, segment_ids, scale, block, interpret):
  o, lse = _forward(q, k, v, segment_ids, scale, block, interpret)
  return (o, lse), (q, k, v, segment_ids, o, lse)


_mla_flash.defvjp(_mla_flash_fwd, _backward)


def check_inputs(q_BTNK, k_BSNK, v_BSNE, scale, segment_ids_BT, block):
  for name, x in (("q_BTNK", q_BTNK), ("k_BSNK", k_BSNK), ("v_BSNE", v_BSNE)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have 4 axes, got shape {x.shape}")
  b, t, n, dk = q_BTNK.shape
  if k_BSNK.shape[0] != b or k_BSNK.shape[2:] != (n, dk):
    raise ValueError(f"k_BSNK shape {k_BSNK.shape} does not match q_BTNK "
                     f"shape {q_BTNK.shape} (need B={b}, N={n}, K={dk})")
  if v_BSNE.shape[:3] != k_BSNK.shape[:3]:
    raise ValueError(f"v_BSNE shape {v_BSNE.shape} does not match k_BSNK "
                     f"shape {k_BSNK.shape} in (B, S, N)")
  if not (q_BTNK.dtype == k_BSNK.dtype == v_BSNE.dtype):
    raise TypeError(f"q, k, v dtypes differ: {q_BTNK.dtype}, {k_BSNK.dtype}, "
                    f"{v_BSNE.dtype}")
  if not jnp.issubdtype(q_BTNK.dtype, jnp.floating):
    raise TypeError(f"q_BTNK must be floating, got {q_BTNK.dtype}")
  if not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a static Python number, got {scale!r}")
  if segment_ids_BT is not None:
    if k_BSNK.shape[1] != t:
      raise ValueError(f"segment_ids_BT needs T == S, got T={t}, "
                       f"S={k_BSNK.shape[1]}")
    if segment_ids_BT.shape != (b, t):
      raise ValueError(f"segment_ids_BT shape {segment_ids_BT.shape} != "
                       f"(B, T) = {(b, t)}")
  check_blocks(block, ("block_q", "block_k", "block_q_bwd", "block_k_bwd"))


def mla_flash(q_BTNK: jax.Array, k_BSNK: jax.Array, v_BSNE: jax.Array,
              scale: float, segment_ids_BT: jax.Array | None = None, *,
              target: tuple | None = None, target_chunk: int = 512,
              block: FlashBlocks = FlashBlocks(),
              interpret: bool | None = None):
  """Causal (in-segment) flash attention. Returns (o_BTNE in q's dtype,
  lse_BTN f32); differentiable in q, k, v through both outputs. With
  ``target = (q_I_BTIJ, k_I_BSJ, w_BTI)`` (self-attention, T == S) also the
  DSA warm-up KL_BT (f32), computed against the final lse in query chunks of
  ``target_chunk`` (see ``warmup_target``); its gradient reaches only the
  indexer inputs."""
  check_inputs(q_BTNK, k_BSNK, v_BSNE, scale, segment_ids_BT, block)
  interpret = resolve_interpret(interpret)
  o, lse = _mla_flash(q_BTNK, k_BSNK, v_BSNE, segment_ids_BT, float(scale),
                      block, interpret)
  if target is None:
    return o, lse
  if k_BSNK.shape[1] != q_BTNK.shape[1]:
    raise ValueError(f"target needs T == S, got T={q_BTNK.shape[1]}, "
                     f"S={k_BSNK.shape[1]}")
  kl = warmup_target(q_BTNK, k_BSNK, lse, target, scale, segment_ids_BT,
                     chunk=target_chunk, block=block, interpret=interpret)
  return o, lse, kl
