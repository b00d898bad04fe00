"""Causal dense attention (expanded "MHA" form of MLA) as Pallas kernels.

  q [B,T,N,P], k [B,S,N,P], v [B,S,N,E]; P the qk head dim: H + R for MLA
  (no-rope and rope parts of a head), the plain head dim H for GQA callers
  (k and v repeated to N heads)
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

Layout. P is split into power-of-two pieces (192 = 128 + 64, 72 = 64 + 8->16)
and E padded to a power of two >= 16, so every tile is a legal Triton block
without padding P = 192 to 256. T and S are padded to whole blocks; padded
keys are masked, padded queries are dropped (their do is zero).

The returned lse is what the DSA warm-up KL (``warmup_kl.py``) reads to form
the per-head probabilities without a second softmax pass.
``mla_flash_reference`` (same signature) is the chunked dense jnp version.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsax.kernels.query_chunks import causal_segment_mask, map_query_chunks
from dsax.kernels.tiling import (NEG_INF, check_blocks, dot_nn, dot_nt,
                                 dot_tn, pad_axis, pieces, pow2,
                                 resolve_interpret, round_up, split_pieces,
                                 take, tile_mask)


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
  """Tile sizes (powers of two >= 16, clipped to the problem)."""
  block_q: int = 64         # forward
  block_k: int = 64
  block_q_bwd: int = 32     # dq and dkv kernels
  block_k_bwd: int = 32
  num_warps: int = 4
  num_stages: int = 2


# -------------------------------------------------------------- reference


def mla_flash_reference(q_BTNP: jax.Array, k_BSNP: jax.Array,
                        v_BSNE: jax.Array, scale: float,
                        segment_ids_BT: jax.Array | None = None,
                        q_chunk: int = 256):
  """Causal dense attention over query chunks (jnp). Returns (o_BTNE in q's
  dtype, lse_BTN f32)."""
  b, s_len = k_BSNP.shape[:2]
  k_index_S = jnp.arange(s_len)
  seg_BS = (jnp.zeros((b, s_len), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  seg_BT = (jnp.zeros(q_BTNP.shape[:2], jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)

  def chunk_fn(start, q_BTNP, seg_BT):
    s_BNTS = jnp.einsum("btnp,bsnp->bnts", q_BTNP, k_BSNP,
                        preferred_element_type=jnp.float32) * scale
    mask_BTS = causal_segment_mask(start + jnp.arange(q_BTNP.shape[1]),
                                   k_index_S, seg_BT, seg_BS)
    s_BNTS = jnp.where(mask_BTS[:, None], s_BNTS, NEG_INF)
    lse_BNT = jax.nn.logsumexp(s_BNTS, axis=-1)
    p_BNTS = jnp.exp(s_BNTS - lse_BNT[..., None])
    o_BTNE = jnp.einsum("bnts,bsne->btne", p_BNTS.astype(v_BSNE.dtype),
                        v_BSNE, preferred_element_type=jnp.float32)
    return o_BTNE.astype(q_BTNP.dtype), jnp.swapaxes(lse_BNT, 1, 2)

  return map_query_chunks(chunk_fn, q_chunk, q_BTNP, seg_BT)


# ---------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Layout:
  b: int
  t: int
  s: int
  n: int
  p: int                  # qk head dim
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
    return [padded for _, _, padded in self.parts]


def _layout(q, k, v, has_seg, block: FlashBlocks) -> _Layout:
  b, t, n, p = q.shape
  s, e = k.shape[1], v.shape[3]
  bq, bqb = (min(pow2(x), pow2(t)) for x in (block.block_q, block.block_q_bwd))
  bk, bkb = (min(pow2(x), pow2(s)) for x in (block.block_k, block.block_k_bwd))
  return _Layout(b=b, t=t, s=s, n=n, p=p, e=e, parts=tuple(pieces(p)),
                 ep=pow2(e), bq=bq, bk=bk, bqb=bqb, bkb=bkb,
                 tp=round_up(t, max(bq, bqb)), sp=round_up(s, max(bk, bkb)),
                 has_seg=has_seg)


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


def _params(block):
  return plgpu.CompilerParams(num_warps=block.num_warps,
                              num_stages=block.num_stages)


# ---------------------------------------------------------------- forward


def _fwd_kernel(*refs, n_parts, has_seg, scale, bq, bk, s_real, n_kblocks):
  it = iter(refs)
  seg_q_ref, seg_k_ref = take(it, 2) if has_seg else (None, None)
  q_refs, k_refs = take(it, n_parts), take(it, n_parts)
  v_ref, o_ref, lse_ref = take(it, 3)
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
    mask = tile_mask(qpos, kpos, seg_q,
                     seg_k_ref[keys] if has_seg else None, s_real)
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
  qs = split_pieces(q, lay.tp, lay.parts)
  ks = split_pieces(k, lay.sp, lay.parts)
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
  seg_q_ref, seg_k_ref = take(it, 2) if has_seg else (None, None)
  q_refs, k_refs = take(it, n_parts), take(it, n_parts)
  v_ref, do_ref, lse_ref, delta_ref = take(it, 4)
  dk_refs = take(it, n_parts)
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
    mask = tile_mask(qpos, kpos, seg_q_ref[rows] if has_seg else None,
                     seg_k, s_real)
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
  seg_q_ref, seg_k_ref = take(it, 2) if has_seg else (None, None)
  q_refs, k_refs = take(it, n_parts), take(it, n_parts)
  v_ref, do_ref, lse_ref, delta_ref = take(it, 4)
  dq_refs = take(it, n_parts)
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
    mask = tile_mask(qpos, kpos, seg_q,
                     seg_k_ref[keys] if has_seg else None, s_real)
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
  qs = split_pieces(q, lay.tp, lay.parts)
  ks = split_pieces(k, lay.sp, lay.parts)
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


# ----------------------------------------------------------------- public


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _mla_flash(q, k, v, segment_ids, scale, block, interpret):
  return _forward(q, k, v, segment_ids, scale, block, interpret)


def _mla_flash_fwd(q, k, v, segment_ids, scale, block, interpret):
  o, lse = _forward(q, k, v, segment_ids, scale, block, interpret)
  return (o, lse), (q, k, v, segment_ids, o, lse)


_mla_flash.defvjp(_mla_flash_fwd, _backward)


def check_inputs(q_BTNP, k_BSNP, v_BSNE, scale, segment_ids_BT, block):
  for name, x in (("q_BTNP", q_BTNP), ("k_BSNP", k_BSNP), ("v_BSNE", v_BSNE)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have 4 axes, got shape {x.shape}")
  b, t, n, p = q_BTNP.shape
  if k_BSNP.shape[0] != b or k_BSNP.shape[2:] != (n, p):
    raise ValueError(f"k_BSNP shape {k_BSNP.shape} does not match q_BTNP "
                     f"shape {q_BTNP.shape} (need B={b}, N={n}, P={p})")
  if v_BSNE.shape[:3] != k_BSNP.shape[:3]:
    raise ValueError(f"v_BSNE shape {v_BSNE.shape} does not match k_BSNP "
                     f"shape {k_BSNP.shape} in (B, S, N)")
  if not (q_BTNP.dtype == k_BSNP.dtype == v_BSNE.dtype):
    raise TypeError(f"q, k, v dtypes differ: {q_BTNP.dtype}, {k_BSNP.dtype}, "
                    f"{v_BSNE.dtype}")
  if not jnp.issubdtype(q_BTNP.dtype, jnp.floating):
    raise TypeError(f"q_BTNP must be floating, got {q_BTNP.dtype}")
  if not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a static Python number, got {scale!r}")
  if segment_ids_BT is not None:
    if k_BSNP.shape[1] != t:
      raise ValueError(f"segment_ids_BT needs T == S, got T={t}, "
                       f"S={k_BSNP.shape[1]}")
    if segment_ids_BT.shape != (b, t):
      raise ValueError(f"segment_ids_BT shape {segment_ids_BT.shape} != "
                       f"(B, T) = {(b, t)}")
  check_blocks(block, ("block_q", "block_k", "block_q_bwd", "block_k_bwd"))


def mla_flash(q_BTNP: jax.Array, k_BSNP: jax.Array, v_BSNE: jax.Array,
              scale: float, segment_ids_BT: jax.Array | None = None, *,
              block: FlashBlocks = FlashBlocks(),
              interpret: bool | None = None):
  """Causal (in-segment) flash attention. Returns (o_BTNE in q's dtype,
  lse_BTN f32); differentiable in q, k, v through both outputs. P is the qk
  head dim (H + R for MLA; the head dim for GQA with k, v repeated to N
  heads). ``interpret=None`` interprets on CPU and compiles (Triton)
  elsewhere."""
  check_inputs(q_BTNP, k_BSNP, v_BSNE, scale, segment_ids_BT, block)
  return _mla_flash(q_BTNP, k_BSNP, v_BSNE, segment_ids_BT, float(scale),
                    block, resolve_interpret(interpret))
