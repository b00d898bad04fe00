"""Top-k sparse MLA (absorbed / MQA form) as Pallas kernels.

Same signature and maths as ``reference.sparse_mla_reference``: query t attends
to its K selected latent rows kv[idx[t, k]] (shared by all N heads), entries
with ``valid = False`` masked (logit NEG_INF, as in the reference):

  s[n, k]  = scale * q[t, n] . kv[idx[t, k]]
  lse[t,n] = logsumexp_k s[n, k],   p = exp(s - lse)
  o[t, n]  = sum_k p[n, k] kv[idx[t, k], :v_dim]

Backward (flash-attention style, p recomputed from lse, delta = sum(o * do)):
  dp = do . kv_v^T,   ds = p * (dp - delta + dlse)
  dq[t, n]        = scale * sum_k ds[n, k] kv[idx[t, k]]
  dkv_sel[t, k]   = sum_n scale * ds[n, k] q[t, n]  (+ p[n, k] do[t, n] on
                    the first v_dim columns)
  dkv[s]          = sum over (t, k) with idx[t, k] = s of dkv_sel[t, k]

Layout. A row of A = C + R (v_dim = C) is split into a "value" part (the
first C columns, which are also the values) and a "rope" part (the rest),
each zero-padded to a power of two >= 16 (Triton block shapes are powers of
two and tl.dot needs dims >= 16; for DeepSeek, 576 = 512 + 64 needs no
padding). Heads are padded to a multiple of the head blocks. ``valid`` is
folded into the index: sel = idx where valid else -1 - idx, so one int32
array travels and the row is recoverable (invalid entries still gather a
real row, exactly as the reference does).

Kernels (Triton style: BlockSpecs, ref indexing, fori_loop over K blocks, the
selected rows gathered by index inside the kernel):
  forward  grid (B, T, N / block_n): one query token and a block of heads per
           program; loops over the K selected rows in blocks of ``block_k``
           with an online softmax; writes o and lse.
  dq       grid (B, T, N / block_n_dq): same loop, accumulates dq.
  dkv      grid (B, T_chunk, K / block_k_dkv): a block of selected rows of one
           query, loops over head blocks; writes that query's contribution
           dkv_sel [B, T_chunk, K, A] (summed over heads, f32).

dkv without atomics. Several queries select the same row, so the dkv kernel
never adds into dkv[s] itself (duplicate-index atomics are slow on GPU and lose
updates in interpret mode). It writes per-(query, selected-row) contributions,
and a scatter-add in plain JAX reduces them onto rows. That is exactly what
autodiff of the reference does (the transpose of its gather), and it runs over
query chunks of ``bwd_q_chunk`` so the buffer is B * chunk * K * A * 4 bytes
(B=1, chunk 128, K 2048, A 576: 0.6 GB) instead of B * T * K * A (77 GB at
T = 16K). Chunks are accumulated in a fixed order; the scatter inside a chunk
is XLA's (deterministic on GPU with --xla_gpu_deterministic_ops).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsax.kernels.tiling import (NEG_INF, check_blocks, dot_nn, dot_nt,
                                 dot_tn, pad_axis, pow2, resolve_interpret,
                                 round_up)


@dataclasses.dataclass(frozen=True)
class SparseMLABlocks:
  """Tile sizes (powers of two >= 16; clipped to the problem)."""
  block_n: int = 32         # fwd: heads per program (the matmuls' M dim)
  block_k: int = 32         # fwd and dq: selected rows per inner step
  block_n_dq: int = 32      # dq: heads per program
  block_n_dkv: int = 32     # dkv: heads per inner step
  block_k_dkv: int = 32     # dkv: selected rows per program
  bwd_q_chunk: int = 128    # queries per dkv scatter step (memory, see above)
  num_warps: int = 8
  num_stages: int = 2
  num_warps_bwd: int = 8
  num_stages_bwd: int = 1
  # Not timed on a GPU. Compiled for sm_90 (Triton 3.5 + ptxas, A = 576, 64
  # heads, bf16), these defaults fit without spills: fwd 76 KB shared,
  # dq 135 KB, dkv 111 KB. block_n 64 in the fwd (rows gathered once per
  # token, not twice) spills ~600 B/thread; 2 stages in the dkv overflow
  # shared memory (311 KB > 227 KB).


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static padded sizes of one call."""
  b: int
  t: int
  s: int
  n: int
  a: int          # row width C + R
  k: int
  v: int          # v_dim
  r: int          # a - v_dim (0: no rope part)
  vp: int
  rp: int
  bn: int         # fwd heads per program
  bnq: int        # dq heads per program
  bnd: int        # dkv heads per step
  np_: int
  bk: int
  bkd: int
  kp: int

  @property
  def has_rope(self) -> bool:
    return self.r > 0


def _layout(q, kv, idx, v_dim, block: SparseMLABlocks) -> _Layout:
  b, t, n, a = q.shape
  s = kv.shape[1]
  k = idx.shape[2]
  r = a - v_dim
  bn, bnq, bnd = (min(pow2(x), pow2(n)) for x in
                  (block.block_n, block.block_n_dq, block.block_n_dkv))
  bk = min(pow2(block.block_k), pow2(k))
  bkd = min(pow2(block.block_k_dkv), pow2(k))
  return _Layout(b=b, t=t, s=s, n=n, a=a, k=k, v=v_dim, r=r,
                 vp=pow2(v_dim), rp=pow2(r) if r else 0, bn=bn, bnq=bnq,
                 bnd=bnd, np_=round_up(n, max(bn, bnq, bnd)), bk=bk, bkd=bkd,
                 kp=round_up(k, max(bk, bkd)))


def _split_q(x_BTNA, lay: _Layout):
  """[B,T,N,A] -> value part [B,T,Np,Vp] (+ rope part [B,T,Np,Rp])."""
  x = pad_axis(x_BTNA, 2, lay.np_)
  parts = [pad_axis(x[..., :lay.v], 3, lay.vp)]
  if lay.has_rope:
    parts.append(pad_axis(x[..., lay.v:], 3, lay.rp))
  return parts


def _split_kv(kv_BSA, lay: _Layout):
  parts = [pad_axis(kv_BSA[..., :lay.v], 2, lay.vp)]
  if lay.has_rope:
    parts.append(pad_axis(kv_BSA[..., lay.v:], 2, lay.rp))
  return parts


def _encode(idx_BTK, valid_BTK, lay: _Layout):
  """sel = idx where valid else -1 - idx, padded along K (pads: position)."""
  sel = jnp.where(valid_BTK, idx_BTK, -1 - idx_BTK).astype(jnp.int32)
  return pad_axis(sel, 2, lay.kp, value=-1)


def _params(block: SparseMLABlocks, bwd: bool = False):
  if bwd:
    return plgpu.CompilerParams(num_warps=block.num_warps_bwd,
                                num_stages=block.num_stages_bwd)
  return plgpu.CompilerParams(num_warps=block.num_warps,
                              num_stages=block.num_stages)


def _logits(sel, q_v, q_r, kv_v_ref, kv_r_ref, start, *, scale, k_real):
  """Gathers the selected rows of one K block and forms the masked logits.

  Returns (s [bn, bk] f32, kv_v [bk, Vp], kv_r [bk, Rp] or None, rows)."""
  rows = jnp.where(sel >= 0, sel, -1 - sel)
  kv_v = kv_v_ref[rows, :]
  s = dot_nt(q_v, kv_v)
  kv_r = None
  if kv_r_ref is not None:
    kv_r = kv_r_ref[rows, :]
    s = s + dot_nt(q_r, kv_r)
  s = s * scale
  s = jnp.where((sel >= 0)[None, :], s, NEG_INF)
  # K padding (not an entry of the reference at all): exactly zero weight.
  pos = start + jax.lax.broadcasted_iota(jnp.int32, sel.shape, 0)
  s = jnp.where((pos < k_real)[None, :], s, -jnp.inf)
  return s, kv_v, kv_r


# ---------------------------------------------------------------- forward


def _fwd_kernel(*refs, scale, k_real, block_k, has_rope):
  if has_rope:
    sel_ref, q_v_ref, q_r_ref, kv_v_ref, kv_r_ref, o_ref, lse_ref = refs
  else:
    sel_ref, q_v_ref, kv_v_ref, o_ref, lse_ref = refs
    q_r_ref = kv_r_ref = None
  q_v = q_v_ref[...]
  q_r = None if q_r_ref is None else q_r_ref[...]
  bn, vp = q_v.shape

  def body(j, carry):
    acc, m, l = carry
    start = j * block_k
    sel = sel_ref[pl.ds(start, block_k)]
    s, kv_v, _ = _logits(sel, q_v, q_r, kv_v_ref, kv_r_ref, start,
                         scale=scale, k_real=k_real)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = corr * l + jnp.sum(p, axis=1)
    acc = corr[:, None] * acc + dot_nn(p.astype(kv_v.dtype), kv_v)
    return acc, m_new, l

  n_blocks = sel_ref.shape[0] // block_k
  acc = jnp.zeros((bn, vp), jnp.float32)
  # m starts finite (no inf - inf): a block of only masked logits gives
  # exp(0) weights that the first real block's correction exp(NEG_INF - m)
  # wipes out. (A query with no valid entry at all, which the causal top-k
  # never produces, gets the mean of its rows; the reference their sum.)
  m = jnp.full((bn,), NEG_INF, jnp.float32)
  l = jnp.zeros((bn,), jnp.float32)
  acc, m, l = jax.lax.fori_loop(0, n_blocks, body, (acc, m, l))
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _forward(q, kv, idx, valid, scale, v_dim, block, interpret):
  lay = _layout(q, kv, idx, v_dim, block)
  sel = _encode(idx, valid, lay)
  qs, kvs = _split_q(q, lay), _split_kv(kv, lay)
  row = lambda w: pl.BlockSpec((None, None, lay.bn, w),
                               lambda b, t, h: (b, t, h, 0))
  full = lambda w: pl.BlockSpec((None, lay.s, w), lambda b, t, h: (b, 0, 0))
  widths = [lay.vp] + ([lay.rp] if lay.has_rope else [])
  in_specs = ([pl.BlockSpec((None, None, lay.kp), lambda b, t, h: (b, t, 0))]
              + [row(w) for w in widths] + [full(w) for w in widths])
  out_specs = [row(lay.vp),
               pl.BlockSpec((None, None, lay.bn), lambda b, t, h: (b, t, h))]
  out_shape = [jax.ShapeDtypeStruct((lay.b, lay.t, lay.np_, lay.vp), q.dtype),
               jax.ShapeDtypeStruct((lay.b, lay.t, lay.np_), jnp.float32)]
  kernel = functools.partial(_fwd_kernel, scale=scale, k_real=lay.k,
                             block_k=lay.bk, has_rope=lay.has_rope)
  o, lse = pl.pallas_call(
      kernel, grid=(lay.b, lay.t, lay.np_ // lay.bn), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, interpret=interpret,
      compiler_params=_params(block), name="sparse_mla_fwd",
  )(sel, *qs, *kvs)
  return o[:, :, :lay.n, :lay.v], lse[:, :, :lay.n]


# --------------------------------------------------------------- backward


def _dq_kernel(*refs, scale, k_real, block_k, has_rope):
  if has_rope:
    (sel_ref, q_v_ref, q_r_ref, kv_v_ref, kv_r_ref, do_ref, lse_ref,
     delta_ref, dq_v_ref, dq_r_ref) = refs
  else:
    (sel_ref, q_v_ref, kv_v_ref, do_ref, lse_ref, delta_ref,
     dq_v_ref) = refs
    q_r_ref = kv_r_ref = dq_r_ref = None
  q_v = q_v_ref[...]
  q_r = None if q_r_ref is None else q_r_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]

  def body(j, carry):
    dq_v, dq_r = carry
    start = j * block_k
    sel = sel_ref[pl.ds(start, block_k)]
    s, kv_v, kv_r = _logits(sel, q_v, q_r, kv_v_ref, kv_r_ref, start,
                            scale=scale, k_real=k_real)
    p = jnp.exp(s - lse[:, None])
    dp = dot_nt(do, kv_v)
    ds = (p * (dp - delta[:, None])).astype(kv_v.dtype)
    dq_v = dq_v + dot_nn(ds, kv_v)
    if kv_r is not None:
      dq_r = dq_r + dot_nn(ds, kv_r)
    return dq_v, dq_r

  n_blocks = sel_ref.shape[0] // block_k
  dq_v = jnp.zeros(q_v.shape, jnp.float32)
  dq_r = jnp.zeros(q_r.shape if q_r is not None else (1, 1), jnp.float32)
  dq_v, dq_r = jax.lax.fori_loop(0, n_blocks, body, (dq_v, dq_r))
  dq_v_ref[...] = (dq_v * scale).astype(dq_v_ref.dtype)
  if dq_r_ref is not None:
    dq_r_ref[...] = (dq_r * scale).astype(dq_r_ref.dtype)


def _dkv_kernel(*refs, scale, k_real, block_n, has_rope):
  if has_rope:
    (sel_ref, q_v_ref, q_r_ref, kv_v_ref, kv_r_ref, do_ref, lse_ref,
     delta_ref, dkv_v_ref, dkv_r_ref) = refs
  else:
    (sel_ref, q_v_ref, kv_v_ref, do_ref, lse_ref, delta_ref,
     dkv_v_ref) = refs
    q_r_ref = kv_r_ref = dkv_r_ref = None
  bkd = sel_ref.shape[0]
  start = pl.program_id(2) * bkd
  sel = sel_ref[...]

  def body(h, carry):
    dkv_v, dkv_r = carry
    heads = pl.ds(h * block_n, block_n)
    q_v = q_v_ref[heads, :]
    q_r = None if q_r_ref is None else q_r_ref[heads, :]
    do = do_ref[heads, :]
    s, kv_v, _ = _logits(sel, q_v, q_r, kv_v_ref, kv_r_ref, start,
                         scale=scale, k_real=k_real)
    p = jnp.exp(s - lse_ref[heads][:, None])
    dp = dot_nt(do, kv_v)
    ds = (p * (dp - delta_ref[heads][:, None]) * scale).astype(q_v.dtype)
    dkv_v = dkv_v + dot_tn(p.astype(do.dtype), do) + dot_tn(ds, q_v)
    if q_r is not None:
      dkv_r = dkv_r + dot_tn(ds, q_r)
    return dkv_v, dkv_r

  n_heads = q_v_ref.shape[0] // block_n
  dkv_v = jnp.zeros((bkd, q_v_ref.shape[1]), jnp.float32)
  dkv_r = jnp.zeros((bkd, q_r_ref.shape[1]) if q_r_ref is not None
                    else (1, 1), jnp.float32)
  dkv_v, dkv_r = jax.lax.fori_loop(0, n_heads, body, (dkv_v, dkv_r))
  dkv_v_ref[...] = dkv_v
  if dkv_r_ref is not None:
    dkv_r_ref[...] = dkv_r


def _dq_call(sel, qs, kvs, do, lse, delta, lay, scale, block, interpret):
  row = lambda w: pl.BlockSpec((None, None, lay.bnq, w),
                               lambda b, t, h: (b, t, h, 0))
  full = lambda w: pl.BlockSpec((None, lay.s, w), lambda b, t, h: (b, 0, 0))
  vec = pl.BlockSpec((None, None, lay.bnq), lambda b, t, h: (b, t, h))
  widths = [lay.vp] + ([lay.rp] if lay.has_rope else [])
  in_specs = ([pl.BlockSpec((None, None, lay.kp), lambda b, t, h: (b, t, 0))]
              + [row(w) for w in widths] + [full(w) for w in widths]
              + [row(lay.vp), vec, vec])
  out_shape = [jax.ShapeDtypeStruct((lay.b, lay.t, lay.np_, w), qs[0].dtype)
               for w in widths]
  kernel = functools.partial(_dq_kernel, scale=scale, k_real=lay.k,
                             block_k=lay.bk, has_rope=lay.has_rope)
  return pl.pallas_call(
      kernel, grid=(lay.b, lay.t, lay.np_ // lay.bnq), in_specs=in_specs,
      out_specs=[row(w) for w in widths], out_shape=out_shape,
      interpret=interpret, compiler_params=_params(block, bwd=True),
      name="sparse_mla_dq",
  )(sel, *qs, *kvs, do, lse, delta)


def _dkv_call(sel, qs, kvs, do, lse, delta, lay, scale, block, interpret):
  """Per-(query, selected-row) dkv contributions of one query chunk."""
  tc = sel.shape[1]
  heads = lambda w: pl.BlockSpec((None, None, lay.np_, w),
                                 lambda b, t, j: (b, t, 0, 0))
  full = lambda w: pl.BlockSpec((None, lay.s, w), lambda b, t, j: (b, 0, 0))
  vec = pl.BlockSpec((None, None, lay.np_), lambda b, t, j: (b, t, 0))
  out = lambda w: pl.BlockSpec((None, None, lay.bkd, w),
                               lambda b, t, j: (b, t, j, 0))
  widths = [lay.vp] + ([lay.rp] if lay.has_rope else [])
  in_specs = ([pl.BlockSpec((None, None, lay.bkd), lambda b, t, j: (b, t, j))]
              + [heads(w) for w in widths] + [full(w) for w in widths]
              + [heads(lay.vp), vec, vec])
  out_shape = [jax.ShapeDtypeStruct((lay.b, tc, lay.kp, w), jnp.float32)
               for w in widths]
  kernel = functools.partial(_dkv_kernel, scale=scale, k_real=lay.k,
                             block_n=lay.bnd, has_rope=lay.has_rope)
  return pl.pallas_call(
      kernel, grid=(lay.b, tc, lay.kp // lay.bkd), in_specs=in_specs,
      out_specs=[out(w) for w in widths], out_shape=out_shape,
      interpret=interpret, compiler_params=_params(block, bwd=True),
      name="sparse_mla_dkv",
  )(sel, *qs, *kvs, do, lse, delta)


def _scatter_rows(acc_BS_, sel_BTK, x_BTK_):
  """acc[b, row(sel[b, t, k])] += x[b, t, k] (plain-JAX scatter-add); the
  trailing axis is one part's padded width (value or rope)."""
  rows = jnp.where(sel_BTK >= 0, sel_BTK, -1 - sel_BTK)

  def one(acc, r, x):
    return acc.at[r.reshape(-1)].add(x.reshape(-1, x.shape[-1]))

  return jax.vmap(one)(acc_BS_, rows, x_BTK_)


def _backward(scale, v_dim, block, interpret, res, cotangents):
  q, kv, idx, valid, o, lse = res
  do, dlse = cotangents
  lay = _layout(q, kv, idx, v_dim, block)
  sel = _encode(idx, valid, lay)
  qs, kvs = _split_q(q, lay), _split_kv(kv, lay)
  do = do.astype(q.dtype)
  # ds = p * (dp - delta) with delta = sum(o * do); a cotangent of lse adds
  # p * dlse (d lse / d s = p), i.e. it enters as delta - dlse.
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = delta - dlse.astype(jnp.float32)
  do_p = pad_axis(pad_axis(do, 2, lay.np_), 3, lay.vp)
  lse_p = pad_axis(lse, 2, lay.np_)
  delta_p = pad_axis(delta, 2, lay.np_)

  dqs = _dq_call(sel, qs, kvs, do_p, lse_p, delta_p, lay, scale, block,
                 interpret)
  dq = dqs[0][:, :, :lay.n, :lay.v]
  if lay.has_rope:
    dq = jnp.concatenate([dq, dqs[1][:, :, :lay.n, :lay.r]], axis=-1)

  # dkv over query chunks: per-chunk contributions, scatter-added in order.
  chunk = min(block.bwd_q_chunk, lay.t)
  n_chunks = -(-lay.t // chunk)
  tp = n_chunks * chunk
  # Padded queries carry do = 0, so every contribution of theirs is zero.
  per_t = [sel] + qs + [do_p, lse_p, delta_p]
  per_t = [pad_axis(x, 1, tp, value=-1 if x is sel else 0) for x in per_t]
  widths = [lay.vp] + ([lay.rp] if lay.has_rope else [])
  acc0 = [jnp.zeros((lay.b, lay.s, w), jnp.float32) for w in widths]

  def step(acc, i):
    xs = [jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
          for x in per_t]
    c_sel, c_qs, (c_do, c_lse, c_delta) = xs[0], xs[1:-3], xs[-3:]
    parts = _dkv_call(c_sel, c_qs, kvs, c_do, c_lse, c_delta, lay, scale,
                      block, interpret)
    return [_scatter_rows(a, c_sel, x) for a, x in zip(acc, parts)], None

  if n_chunks == 1:
    acc, _ = step(acc0, 0)
  else:
    acc, _ = jax.lax.scan(step, acc0, jnp.arange(n_chunks))
  dkv = acc[0][..., :lay.v]
  if lay.has_rope:
    dkv = jnp.concatenate([dkv, acc[1][..., :lay.r]], axis=-1)
  return dq.astype(q.dtype), dkv.astype(kv.dtype), None, None


# ----------------------------------------------------------------- public


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _sparse_mla(q, kv, idx, valid, scale, v_dim, block, interpret):
  return _forward(q, kv, idx, valid, scale, v_dim, block, interpret)


def _sparse_mla_fwd(q, kv, idx, valid, scale, v_dim, block, interpret):
  o, lse = _forward(q, kv, idx, valid, scale, v_dim, block, interpret)
  return (o, lse), (q, kv, idx, valid, o, lse)


_sparse_mla.defvjp(_sparse_mla_fwd, _backward)


def check_inputs(q_BTNA, kv_BSA, idx_BTK, valid_BTK, scale, v_dim,
                 block: SparseMLABlocks):
  """Raises ValueError/TypeError naming the offending values."""
  if q_BTNA.ndim != 4:
    raise ValueError(f"q_BTNA must be [B,T,N,A], got shape {q_BTNA.shape}")
  if kv_BSA.ndim != 3:
    raise ValueError(f"kv_BSA must be [B,S,A], got shape {kv_BSA.shape}")
  if idx_BTK.ndim != 3:
    raise ValueError(f"idx_BTK must be [B,T,K], got shape {idx_BTK.shape}")
  b, t, _, a = q_BTNA.shape
  if kv_BSA.shape[0] != b or kv_BSA.shape[2] != a:
    raise ValueError(f"kv_BSA shape {kv_BSA.shape} does not match q_BTNA "
                     f"shape {q_BTNA.shape} (need B={b}, A={a})")
  if idx_BTK.shape[:2] != (b, t):
    raise ValueError(f"idx_BTK shape {idx_BTK.shape} does not match q_BTNA "
                     f"shape {q_BTNA.shape} (need B={b}, T={t})")
  if valid_BTK.shape != idx_BTK.shape:
    raise ValueError(f"valid_BTK shape {valid_BTK.shape} != idx_BTK shape "
                     f"{idx_BTK.shape}")
  if idx_BTK.dtype != jnp.int32:
    raise TypeError(f"idx_BTK must be int32, got {idx_BTK.dtype}")
  if valid_BTK.dtype != jnp.bool_:
    raise TypeError(f"valid_BTK must be bool, got {valid_BTK.dtype}")
  if not jnp.issubdtype(q_BTNA.dtype, jnp.floating):
    raise TypeError(f"q_BTNA must be floating, got {q_BTNA.dtype}")
  if kv_BSA.dtype != q_BTNA.dtype:
    raise TypeError(f"kv_BSA dtype {kv_BSA.dtype} != q_BTNA dtype "
                    f"{q_BTNA.dtype}")
  if not isinstance(v_dim, int) or not 0 < v_dim <= a:
    raise ValueError(f"v_dim must be an int with 0 < v_dim <= A={a}, "
                     f"got {v_dim!r}")
  if not isinstance(scale, (int, float)) or not math.isfinite(scale):
    raise TypeError(f"scale must be a finite Python number (static), got "
                    f"{scale!r}")
  check_blocks(block, ("block_n", "block_k", "block_n_dq", "block_n_dkv",
                       "block_k_dkv", "bwd_q_chunk"))


def sparse_mla(q_BTNA: jax.Array, kv_BSA: jax.Array, idx_BTK: jax.Array,
               valid_BTK: jax.Array, scale: float, v_dim: int, *,
               block: SparseMLABlocks = SparseMLABlocks(),
               interpret: bool | None = None):
  """Top-k sparse MLA. Returns (o_BTNC in q's dtype, lse_BTN in f32).

  Rows are latent rows of A = C + R (``v_dim`` = C: the first C columns are
  the values), shared by all N heads. Differentiable in q and kv through both outputs (custom VJP; idx and
  valid get no gradient).
  ``scale`` and ``v_dim`` are static Python numbers. ``interpret=None``
  interprets on CPU and compiles (Triton) elsewhere.
  """
  check_inputs(q_BTNA, kv_BSA, idx_BTK, valid_BTK, scale, v_dim, block)
  return _sparse_mla(q_BTNA, kv_BSA, idx_BTK, valid_BTK, float(scale), v_dim,
                     block, resolve_interpret(interpret))
