"""Causal dense attention in jnp over the lower triangle of key blocks (flash
attention with an online softmax), and the DSA warm-up KL over the same
blocks: the model's dense path on CPU (``impl="reference"``).

Score parts. The queries and keys come as parts i = 1..P' that add up:
q_i [B,T,N,X_i] with k_i [B,S,G_i,X_i], G_i dividing N; query head n reads
kv head n // M_i of part i (M_i = N / G_i, HF ``repeat_kv`` order):
  s[n,t,s] = scale * sum_i q_i[t,n] . k_i[s, n // M_i]
MLA (expanded form): (q_nope, k_nope) with G = N and (q_rope, k_rope) with
G = 1, the shared rope key never repeated per head; GQA: (q, k) with the G kv
heads. The values v [B,S,G_v,E] are grouped the same way:
  o[t,n] = sum_s softmax_s(s[n,t,:]) v[s, n // M_v]
Self-attention (T == S), f32 scores and softmax, masked to
  s <= t < T and segment[s] == segment[t].

Blocks. T is padded to n blocks of b rows (b = min(block, T)); query block i
sees key blocks j <= i only: every loop over key blocks has trip count i + 1
(a while loop with a dynamic bound), so n(n+1)/2 of the n^2 tiles are
scored in each pass. Only [B,N,b,b] tiles and O(T) buffers exist; nothing
of size T x S. Compile time does not depend on T (the loops are rolled).

Query shards (context parallelism, dsax.context): the T queries may be a
subset of the S keys, given by ``q_index_T``, each query's index among the
keys (default arange(T), S = T). Every run of b queries must then be one
aligned block of b consecutive keys (c_i = q_index[i b] / b), the blocks in
ascending order; query block i sees key blocks j <= c_i (the backward: key
block j is seen by the query blocks from the first with c_i >= j on), and
the mask is s <= q_index[t] (and the segments of the query and of the key
agree), never the array order.

Forward (online softmax), query block i, over j = 0..i:
  m' = max(m, max_s s),  l <- l e^{m - m'} + sum_s e^{s - m'},
  acc <- acc e^{m - m'} + e^{s - m'} v,   then o = acc / l, lse = m + log l.
Backward (flash attention 2; a while loop with a dynamic bound has no
reverse-mode rule, hence the custom_vjp), delta[t,n] = sum_e o do - dlse:
  p = exp(s - lse),  dv_j += p^T do,  dp = do v^T,  ds = scale p (dp - delta),
  dq_i += ds k_j,  dk_j += ds^T q_i
as one pass over the same tiles: per key block j (dk_j, dv_j accumulate in
the loop) over query blocks i >= j (dq accumulates in a [B,T]-long buffer).
Residuals: the inputs, o and lse. Matmuls per tile: 2 forward, 5 backward.

Warm-up KL (``warmup_kl.py``'s formulas, from the forward's lse), query
block i over j <= i, with I the indexer heads:
  p[t,s]  = (1/N) sum_n exp(s[n,t,s] - lse[t,n])      (softmax per head, mean)
  I[t,s]  = sum_i w[t,i] relu(q_I[t,i] . k_I[s])
  Z = sum_s p,   A = sum_s p (log p - I),   lse_I = logsumexp_s I  (online)
  KL[t] = sum_s p~ (log p~ - log_softmax_s I) = A / Z - log Z + lse_I,
  p~ = p / Z, over the causal in-segment keys (Z = 1 when the lse is the
  attention's over the same keys). The attention side (q, k, lse) is
  detached; the gradient reaches q_I, k_I, w through
  dKL/dI[t,s] = softmax_s(I[t])[s] - p~[t,s].
Training (``warmup_kl_mean``, the mean over [B, T]) needs lse_I before any
tile's gradient, so its forward runs two passes: the indexer logits alone
for lse_I, then every tile once for p, the KL terms and the tile's
indexer-logits vjp of softmax(I) - p (dq_I, dw of query block i, dk_I of key
block j, a [B,S]-long buffer), kept as the residual the backward scales. The
attention scores are formed twice per warm-up step (the attention's forward,
this pass), not three times as a forward then a recomputing backward would.
No T x S, no T x S x N.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsax.kernels.reference import indexer_logits
from dsax.kernels.tiling import NEG_INF

F32 = jnp.float32


# ---------------------------------------------------------------- layout


class _Grid(NamedTuple):
  t: int      # real length
  n: int      # blocks
  b: int      # rows per block


def _grid(t: int, block: int) -> _Grid:
  b = max(1, min(block, t))
  return _Grid(t=t, n=-(-t // b), b=b)


def _grids(t: int, s: int, block: int) -> tuple[_Grid, _Grid]:
  """(query grid, key grid) with one block size b = min(block, T)."""
  q = _grid(t, block)
  return q, _Grid(t=s, n=-(-s // q.b), b=q.b)


def _split(x, grid: _Grid):
  """[B, T, ...] -> [n, B, b, ...]: T zero-padded to n b, block-major (a
  block is one contiguous slice of the leading axis)."""
  x = jnp.pad(x, [(0, 0), (0, grid.n * grid.b - x.shape[1])]
              + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((x.shape[0], grid.n, grid.b) + x.shape[2:]),
                      1, 0)


def _join(x, grid: _Grid):
  """[n, B, b, ...] -> [B, T, ...] (padding dropped)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape((x.shape[0], grid.n * grid.b) + x.shape[3:])[:, :grid.t]


def _q_blocks(q_BTNX, g: int, grid: _Grid):
  """[B,T,N,X] -> [n,B,G,M,b,X], head n = g M + m."""
  x = _split(q_BTNX, grid)
  n, bb, b, heads, d = x.shape
  return jnp.transpose(x.reshape(n, bb, b, g, heads // g, d),
                       (0, 1, 3, 4, 2, 5))


def _q_join(x, grid: _Grid):
  n, bb, g, m, b, d = x.shape
  return _join(jnp.transpose(x, (0, 1, 4, 2, 3, 5)).reshape(
      n, bb, b, g * m, d), grid)


def _k_blocks(k_BSGX, grid: _Grid):
  """[B,S,G,X] -> [n,B,G,b,X]."""
  return jnp.swapaxes(_split(k_BSGX, grid), 2, 3)


def _k_join(x, grid: _Grid):
  return _join(jnp.swapaxes(x, 2, 3), grid)


def _row_blocks(x_BTN, grid: _Grid):
  """[B,T,N] -> [n,B,N,b] (per head and query)."""
  return jnp.swapaxes(_split(x_BTN, grid), 2, 3)


def _row_join(x, grid: _Grid):
  return _join(jnp.swapaxes(x, 2, 3), grid)


def _at(x, i):
  return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _put(buf, x, i):
  return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)


def _head_mean(x_BN_):
  """Mean over the head axis 1 as elementwise adds of its slices: one loop
  fusion; XLA:CPU's reduce over a major axis is ~15x slower here."""
  acc = x_BN_[:, 0]
  for n in range(1, x_BN_.shape[1]):
    acc = acc + x_BN_[:, n]
  return acc / x_BN_.shape[1]


def _grouped(x_BN_, g: int):
  """[B, N, ...] -> [B, G, M, ...]."""
  return x_BN_.reshape((x_BN_.shape[0], g, x_BN_.shape[1] // g)
                       + x_BN_.shape[2:])


# ----------------------------------------------------------------- tiles


def _mask(i, j, seg_i_BT, seg_j_BS, pos_i_T, grid: _Grid):
  """[B, b, b] bool of tile (i, j): key index <= the query's (``pos_i_T``,
  its index among the keys), a real query row (< T), same segment."""
  real_T = i * grid.b + jnp.arange(grid.b) < grid.t
  k_pos = j * grid.b + jnp.arange(grid.b)
  ok_TS = (k_pos[None, :] <= pos_i_T[:, None]) & real_T[:, None]
  return ok_TS[None] & (seg_i_BT[:, :, None] == seg_j_BS[:, None, :])


def _scores(q_i, k_j, mask_BTS, scale):
  """Masked s [B,N,b,b] f32 of one tile: the sum over the score parts."""
  s = None
  for q_BGMTX, k_BGSX in zip(q_i, k_j):
    bb, g, m, bq, _ = q_BGMTX.shape
    part = jnp.einsum("bgmtx,bgsx->bgmts", q_BGMTX, k_BGSX,
                      preferred_element_type=F32).reshape(
                          bb, g * m, bq, k_BGSX.shape[2])
    s = part if s is None else s + part
  return jnp.where(mask_BTS[:, None], s * scale, NEG_INF)


class _Blocked(NamedTuple):
  qs: tuple         # [n,B,G,M,b,X] per part
  ks: tuple         # [n_k,B,G,b,X] per part
  seg: jax.Array    # [n,B,b] of the queries
  seg_k: jax.Array  # [n_k,B,b] of the keys
  pos: jax.Array    # [n,b] each query's index among the keys
  top: jax.Array    # [n] the last key block that query block i sees
  first: jax.Array  # [n_k] the first query block that sees key block j


def _blocked(qs, ks, seg_BT, seg_k_BS, q_index_T, grid: _Grid,
             kgrid: _Grid) -> _Blocked:
  pos = _split(q_index_T[None], grid)[:, 0]
  top = pos[:, 0] // grid.b
  first = jnp.sum(top[None, :] < jnp.arange(kgrid.n)[:, None], axis=1)
  return _Blocked(
      qs=tuple(_q_blocks(q, k.shape[2], grid) for q, k in zip(qs, ks)),
      ks=tuple(_k_blocks(k, kgrid) for k in ks), seg=_split(seg_BT, grid),
      seg_k=_split(seg_k_BS, kgrid), pos=pos, top=top, first=first)


def _rows(blk: _Blocked, i):
  """The q parts, segment ids and key indices of query block i (the query
  side of a tile)."""
  return (tuple(_at(x, i) for x in blk.qs), _at(blk.seg, i),
          _at(blk.pos, i))


def _cols(blk: _Blocked, j):
  """The k parts and segment ids of key block j (key side of a tile)."""
  return tuple(_at(x, j) for x in blk.ks), _at(blk.seg_k, j)


def _tile(rows, cols, i, j, grid: _Grid, scale):
  """(mask_BTS, masked s_BNTS) of tile (i, j)."""
  (q_i, seg_i, pos_i), (k_j, seg_j) = rows, cols
  mask_BTS = _mask(i, j, seg_i, seg_j, pos_i, grid)
  return mask_BTS, _scores(q_i, k_j, mask_BTS, scale)


# ------------------------------------------------------------- attention


def _attention_fwd_impl(qs, ks, v, seg_BT, seg_k_BS, q_index_T, scale, block):
  grid, kgrid = _grids(qs[0].shape[1], ks[0].shape[1], block)
  blk = _blocked(qs, ks, seg_BT, seg_k_BS, q_index_T, grid, kgrid)
  v_b = _k_blocks(v, kgrid)
  bsz, heads = qs[0].shape[0], qs[0].shape[2]
  gv, e = v.shape[2], v.shape[3]

  def row(i, bufs):
    rows = _rows(blk, i)

    def col(j, carry):
      m_BNT, l_BNT, acc = carry
      _, s_BNTS = _tile(rows, _cols(blk, j), i, j, grid, scale)
      m_new = jnp.maximum(m_BNT, jnp.max(s_BNTS, axis=-1))
      alpha_BNT = jnp.exp(m_BNT - m_new)
      p_BNTS = jnp.exp(s_BNTS - m_new[..., None])
      pv = jnp.einsum("bgmts,bgse->bgmte",
                      _grouped(p_BNTS, gv).astype(v.dtype), _at(v_b, j),
                      preferred_element_type=F32)
      return (m_new, l_BNT * alpha_BNT + jnp.sum(p_BNTS, axis=-1),
              acc * _grouped(alpha_BNT, gv)[..., None] + pv)

    init = (jnp.full((bsz, heads, grid.b), NEG_INF, F32),
            jnp.zeros((bsz, heads, grid.b), F32),
            jnp.zeros((bsz, gv, heads // gv, grid.b, e), F32))
    m_BNT, l_BNT, acc = jax.lax.fori_loop(0, _at(blk.top, i) + 1, col,
                                          init)
    o_buf, lse_buf = bufs
    return (_put(o_buf, acc / _grouped(l_BNT, gv)[..., None], i),
            _put(lse_buf, m_BNT + jnp.log(l_BNT), i))

  bufs = (jnp.zeros((grid.n, bsz, gv, heads // gv, grid.b, e), qs[0].dtype),
          jnp.zeros((grid.n, bsz, heads, grid.b), F32))
  o_buf, lse_buf = jax.lax.fori_loop(0, grid.n, row, bufs)
  return _q_join(o_buf, grid), _row_join(lse_buf, grid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(qs, ks, v, seg_BT, seg_k_BS, q_index_T, scale, block):
  return _attention_fwd_impl(qs, ks, v, seg_BT, seg_k_BS, q_index_T, scale,
                             block)


def _attention_fwd(qs, ks, v, seg_BT, seg_k_BS, q_index_T, scale, block):
  o, lse = _attention_fwd_impl(qs, ks, v, seg_BT, seg_k_BS, q_index_T, scale,
                               block)
  return (o, lse), (qs, ks, v, seg_BT, seg_k_BS, q_index_T, o, lse)


def _attention_bwd(scale, block, res, cts):
  qs, ks, v, seg_BT, seg_k_BS, q_index_T, o, lse_BTN = res
  do, dlse_BTN = cts
  grid, kgrid = _grids(qs[0].shape[1], ks[0].shape[1], block)
  blk = _blocked(qs, ks, seg_BT, seg_k_BS, q_index_T, grid, kgrid)
  v_b = _k_blocks(v, kgrid)
  gv = v.shape[2]
  do_b = _q_blocks(do, gv, grid)
  lse_b = _row_blocks(lse_BTN, grid)
  delta_b = _row_blocks(
      jnp.sum(o.astype(F32) * do.astype(F32), axis=-1) - dlse_BTN, grid)

  def col(j, bufs):
    dq_bufs, dk_bufs, dv_buf = bufs
    cols, v_j = _cols(blk, j), _at(v_b, j)

    def row(i, carry):
      dks, dv, dq_bufs = carry
      rows = _rows(blk, i)
      _, s_BNTS = _tile(rows, cols, i, j, grid, scale)
      do_i = _at(do_b, i)
      p_BNTS = jnp.exp(s_BNTS - _at(lse_b, i)[..., None])
      dv = dv + jnp.einsum("bgmts,bgmte->bgse",
                           _grouped(p_BNTS, gv).astype(do_i.dtype), do_i,
                           preferred_element_type=F32)
      dp_BNTS = jnp.einsum("bgmte,bgse->bgmts", do_i, v_j,
                           preferred_element_type=F32).reshape(p_BNTS.shape)
      ds_BNTS = p_BNTS * (dp_BNTS - _at(delta_b, i)[..., None]) * scale
      new_dq, new_dk = [], []
      for q, k, dq_buf, dk in zip(rows[0], cols[0], dq_bufs, dks):
        ds = _grouped(ds_BNTS, k.shape[1]).astype(q.dtype)
        dq = jnp.einsum("bgmts,bgsx->bgmtx", ds, k,
                        preferred_element_type=F32)
        new_dq.append(_put(dq_buf, _at(dq_buf, i) + dq, i))
        new_dk.append(dk + jnp.einsum("bgmts,bgmtx->bgsx", ds, q,
                                      preferred_element_type=F32))
      return tuple(new_dk), dv, tuple(new_dq)

    dk0 = tuple(jnp.zeros(x.shape[1:], F32) for x in blk.ks)
    dv0 = jnp.zeros(v_b.shape[1:], F32)
    dks, dv, dq_bufs = jax.lax.fori_loop(_at(blk.first, j), grid.n, row,
                                         (dk0, dv0, dq_bufs))
    return (dq_bufs, tuple(_put(buf, dk, j) for buf, dk in zip(dk_bufs, dks)),
            _put(dv_buf, dv, j))

  bufs = (tuple(jnp.zeros(x.shape, F32) for x in blk.qs),
          tuple(jnp.zeros(x.shape, F32) for x in blk.ks),
          jnp.zeros(v_b.shape, F32))
  dq_bufs, dk_bufs, dv_buf = jax.lax.fori_loop(0, kgrid.n, col, bufs)
  dqs = tuple(_q_join(x, grid).astype(q.dtype) for x, q in zip(dq_bufs, qs))
  dks = tuple(_k_join(x, kgrid).astype(k.dtype) for x, k in zip(dk_bufs, ks))
  return (dqs, dks, _k_join(dv_buf, kgrid).astype(v.dtype), None, None,
          None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(qs, ks, v_BSGE=None, s=None):
  """Shapes of the score parts; ``s`` the number of keys (None: S = T)."""
  if len(qs) != len(ks) or not qs:
    raise ValueError(f"need one key part per query part, got {len(qs)} "
                     f"query and {len(ks)} key parts")
  b, t, n = qs[0].shape[:3]
  s = t if s is None else s
  for i, (q, k) in enumerate(zip(qs, ks)):
    if q.ndim != 4 or k.ndim != 4:
      raise ValueError(f"part {i}: q must be [B,T,N,X] and k [B,S,G,X], got "
                       f"{q.shape} and {k.shape}")
    if q.shape[:3] != (b, t, n) or k.shape[:2] != (b, s):
      raise ValueError(f"part {i}: q {q.shape} and k {k.shape} must share "
                       f"B={b} and have T={t}, S={s} (and q N={n})")
    if n % k.shape[2] or q.shape[3] != k.shape[3]:
      raise ValueError(f"part {i}: kv heads G={k.shape[2]} must divide N={n} "
                       f"and the dims must match, got q {q.shape}, k "
                       f"{k.shape}")
  if v_BSGE is not None and (v_BSGE.ndim != 4 or v_BSGE.shape[:2] != (b, s)
                             or n % v_BSGE.shape[2]):
    raise ValueError(f"v must be [B={b}, S={s}, G, E] with G dividing N={n}, "
                     f"got {v_BSGE.shape}")


def _segments(segment_ids_BT, b, t):
  return (jnp.zeros((b, t), jnp.int32) if segment_ids_BT is None
          else segment_ids_BT.astype(jnp.int32))


def _shard(q_index_T, k_segment_ids_BS, segment_ids_BT, b, t, s):
  """(q segments [B,T], key segments [B,S], q_index_T [T]) of a query
  shard (``q_index_T`` given) or of self-attention (S = T)."""
  if q_index_T is None:
    if s != t:
      raise ValueError(f"S={s} keys for T={t} queries need q_index_T, each "
                       "query's index among the keys")
    q_index_T = jnp.arange(t, dtype=jnp.int32)
  elif q_index_T.shape != (t,):
    raise ValueError(f"q_index_T must be [T={t}], got {q_index_T.shape}")
  if k_segment_ids_BS is None:
    if segment_ids_BT is not None and s != t:
      raise ValueError("segment ids of T queries among S != T keys need "
                       "k_segment_ids_BS")
    k_segment_ids_BS = segment_ids_BT
  return (_segments(segment_ids_BT, b, t), _segments(k_segment_ids_BS, b, s),
          q_index_T.astype(jnp.int32))


def attention(q_parts, k_parts, v_BSGE, scale: float,
              segment_ids_BT=None, block: int = 256, *, q_index_T=None,
              k_segment_ids_BS=None):
  """Causal, in-segment self-attention over the lower-triangle blocks.
  ``q_parts`` [B,T,N,X_i] and ``k_parts`` [B,S,G_i,X_i] (score parts, see
  the module docstring), ``v_BSGE`` [B,S,G,E]. Returns (o_BTNE in q's dtype,
  lse_BTN f32); differentiable w.r.t. q, k, v (and through lse).
  A query shard: ``q_index_T`` (int32 [T], each query's index among the S
  keys, ascending aligned blocks of b) and the keys' ``k_segment_ids_BS``."""
  qs, ks = tuple(q_parts), tuple(k_parts)
  b, t = qs[0].shape[:2]
  s = ks[0].shape[1] if ks and ks[0].ndim == 4 else t
  _check(qs, ks, v_BSGE, s)
  seg_BT, seg_k_BS, q_index_T = _shard(q_index_T, k_segment_ids_BS,
                                       segment_ids_BT, b, t, s)
  return _attention(qs, ks, v_BSGE, seg_BT, seg_k_BS, q_index_T,
                    float(scale), int(block))


# -------------------------------------------------------------- warm-up KL


def _kl_rows(blk, lse_b, ib, i):
  """Query side of a KL tile: q parts, segments, lse, indexer q and w."""
  return _rows(blk, i), _at(lse_b, i), _at(ib[0], i), _at(ib[2], i)


def _kl_tile(rows, blk, ib, i, j, grid, scale):
  """(p_BTS, logits_BTS, mask_BTS, vjp of the tile's indexer logits)."""
  att_rows, lse_BNT, q_i_BTIJ, w_BTI = rows
  mask_BTS, s_BNTS = _tile(att_rows, _cols(blk, j), i, j, grid, scale)
  p_BTS = _head_mean(jnp.exp(s_BNTS - lse_BNT[..., None]))
  logits_BTS, vjp = jax.vjp(indexer_logits, q_i_BTIJ, _at(ib[1], j), w_BTI)
  return p_BTS, logits_BTS, mask_BTS, vjp


def _lse_step(m_BT, l_BT, x_BTS):
  """One key block of an online logsumexp over masked x (NEG_INF)."""
  m_new = jnp.maximum(m_BT, jnp.max(x_BTS, axis=-1))
  return m_new, l_BT * jnp.exp(m_BT - m_new) + jnp.sum(
      jnp.exp(x_BTS - m_new[..., None]), axis=-1)


def _kl_sums(z_BT, a_BT, p_BTS, logits_BTS, mask_BTS):
  """One key block of Z = sum_s p and A = sum_s p (log p - I)."""
  terms = jax.scipy.special.xlogy(p_BTS, p_BTS) - p_BTS * logits_BTS
  return (z_BT + jnp.sum(jnp.where(mask_BTS, p_BTS, 0.0), axis=-1),
          a_BT + jnp.sum(jnp.where(mask_BTS, terms, 0.0), axis=-1))


def _kl_value(z_BT, a_BT, lse_i_BT):
  """KL[t] = A / Z - log Z + lse_I."""
  z_BT = jnp.maximum(z_BT, 1e-30)
  return a_BT / z_BT - jnp.log(z_BT) + lse_i_BT


def _kl_fwd_impl(qs, ks, lse_BTN, q_i_BTIJ, k_i_BSJ, w_BTI, seg_BT,
                 seg_k_BS, q_index_T, scale, block):
  """KL_BT in one pass: the values."""
  grid, kgrid = _grids(qs[0].shape[1], ks[0].shape[1], block)
  blk = _blocked(qs, ks, seg_BT, seg_k_BS, q_index_T, grid, kgrid)
  lse_b = _row_blocks(lse_BTN, grid)
  ib = (_split(q_i_BTIJ, grid), _split(k_i_BSJ, kgrid), _split(w_BTI, grid))
  bsz = qs[0].shape[0]

  def row(i, kl_buf):
    rows = _kl_rows(blk, lse_b, ib, i)

    def col(j, carry):
      z_BT, a_BT, m_BT, l_BT = carry
      p_BTS, logits_BTS, mask_BTS, _ = _kl_tile(rows, blk, ib, i, j, grid,
                                                scale)
      return _kl_sums(z_BT, a_BT, p_BTS, logits_BTS, mask_BTS) + _lse_step(
          m_BT, l_BT, jnp.where(mask_BTS, logits_BTS, NEG_INF))

    zero = jnp.zeros((bsz, grid.b), F32)
    z_BT, a_BT, m_BT, l_BT = jax.lax.fori_loop(
        0, _at(blk.top, i) + 1, col,
        (zero, zero, jnp.full_like(zero, NEG_INF), zero))
    return _put(kl_buf, _kl_value(z_BT, a_BT, m_BT + jnp.log(l_BT)), i)

  kl_b = jax.lax.fori_loop(0, grid.n, row, jnp.zeros((grid.n, bsz, grid.b),
                                                      F32))
  return _join(kl_b, grid)


# --------------------------------------------- warm-up KL, one fused pass


def _indexer_lse(blk, ib, grid: _Grid, bsz: int):
  """[n,B,b] logsumexp of the indexer logits over each query's causal
  in-segment keys: the indexer side alone (no attention scores)."""
  def row(i, buf):
    _, seg_i, pos_i = _rows(blk, i)
    q_i_BTIJ, w_BTI = _at(ib[0], i), _at(ib[2], i)

    def col(j, carry):
      mask_BTS = _mask(i, j, seg_i, _at(blk.seg_k, j), pos_i, grid)
      return _lse_step(*carry, jnp.where(
          mask_BTS, indexer_logits(q_i_BTIJ, _at(ib[1], j), w_BTI), NEG_INF))

    zero = jnp.zeros((bsz, grid.b), F32)
    m_BT, l_BT = jax.lax.fori_loop(0, _at(blk.top, i) + 1, col,
                                   (jnp.full_like(zero, NEG_INF), zero))
    return _put(buf, m_BT + jnp.log(l_BT), i)

  return jax.lax.fori_loop(0, grid.n, row, jnp.zeros((grid.n, bsz, grid.b),
                                                      F32))


def _kl_fused(qs, ks, lse_BTN, q_i_BTIJ, k_i_BSJ, w_BTI, seg_BT, seg_k_BS,
              q_index_T, scale, block):
  """(mean KL, its gradients w.r.t. q_I, k_I, w) in two passes: the
  indexer's lse alone, then each tile once for the KL terms and the tile's
  indexer-logits vjp of dKL/dI = softmax(I) - p (Z = 1: the lse is the
  attention's over the same keys)."""
  grid, kgrid = _grids(qs[0].shape[1], ks[0].shape[1], block)
  blk = _blocked(qs, ks, seg_BT, seg_k_BS, q_index_T, grid, kgrid)
  lse_b = _row_blocks(lse_BTN, grid)
  ib = (_split(q_i_BTIJ, grid), _split(k_i_BSJ, kgrid), _split(w_BTI, grid))
  bsz = qs[0].shape[0]
  lse_i_b = _indexer_lse(blk, ib, grid, bsz)

  def row(i, bufs):
    rows = _kl_rows(blk, lse_b, ib, i)
    lse_i_BT = _at(lse_i_b, i)

    def col(j, carry):
      z_BT, a_BT, dq, dw, dk_buf = carry
      p_BTS, logits_BTS, mask_BTS, vjp = _kl_tile(rows, blk, ib, i, j, grid,
                                                  scale)
      soft_BTS = jnp.exp(jnp.where(mask_BTS, logits_BTS, NEG_INF)
                         - lse_i_BT[..., None])
      dq_t, dk_t, dw_t = vjp(jnp.where(mask_BTS, soft_BTS - p_BTS, 0.0))
      return _kl_sums(z_BT, a_BT, p_BTS, logits_BTS, mask_BTS) + (
          dq + dq_t, dw + dw_t, _put(dk_buf, _at(dk_buf, j) + dk_t, j))

    kl_buf, dq_buf, dk_buf, dw_buf = bufs
    zero = jnp.zeros((bsz, grid.b), F32)
    z_BT, a_BT, dq, dw, dk_buf = jax.lax.fori_loop(
        0, _at(blk.top, i) + 1, col,
        (zero, zero, jnp.zeros(ib[0].shape[1:], F32),
         jnp.zeros(ib[2].shape[1:], F32), dk_buf))
    return (_put(kl_buf, _kl_value(z_BT, a_BT, lse_i_BT), i),
            _put(dq_buf, dq, i), dk_buf,
            _put(dw_buf, dw, i))

  bufs = (jnp.zeros((grid.n, bsz, grid.b), F32),) + tuple(
      jnp.zeros(x.shape, F32) for x in ib)
  kl_b, dq_b, dk_b, dw_b = jax.lax.fori_loop(0, grid.n, row, bufs)
  n = bsz * grid.t   # the mean's count; padded query rows have dl = 0
  grads = tuple(_join(d, g) / n for d, g in zip(
      (dq_b, dk_b, dw_b), (grid, kgrid, grid)))
  return jnp.mean(_join(kl_b, grid)), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _warmup_kl_mean(qs, ks, lse_BTN, q_i_BTIJ, k_i_BSJ, w_BTI, seg_BT,
                    seg_k_BS, q_index_T, scale, block):
  # Not differentiated (an evaluation): the one forward pass.
  return jnp.mean(_kl_fwd_impl(qs, ks, lse_BTN, q_i_BTIJ, k_i_BSJ, w_BTI,
                               seg_BT, seg_k_BS, q_index_T, scale, block))


def _warmup_kl_mean_fwd(qs, ks, lse_BTN, q_i_BTIJ, k_i_BSJ, w_BTI, seg_BT,
                        seg_k_BS, q_index_T, scale, block):
  kl, grads = _kl_fused(qs, ks, lse_BTN, q_i_BTIJ, k_i_BSJ, w_BTI, seg_BT,
                        seg_k_BS, q_index_T, scale, block)
  return kl, tuple(g.astype(x.dtype) for g, x in zip(
      grads, (q_i_BTIJ, k_i_BSJ, w_BTI)))


def _warmup_kl_mean_bwd(scale, block, grads, g):
  del scale, block
  return (None, None, None) + tuple(x * g.astype(x.dtype) for x in grads) + (
      None, None, None)


_warmup_kl_mean.defvjp(_warmup_kl_mean_fwd, _warmup_kl_mean_bwd)


def _kl_args(q_parts, k_parts, lse_BTN, q_I_BTIJ, k_I_BSJ, w_BTI,
             segment_ids_BT, q_index_T, k_segment_ids_BS):
  """Checked, detached arguments of the warm-up KL ops."""
  qs, ks = tuple(q_parts), tuple(k_parts)
  b, t, n = qs[0].shape[:3]
  s = ks[0].shape[1] if ks and ks[0].ndim == 4 else t
  _check(qs, ks, s=s)
  if lse_BTN.shape != (b, t, n):
    raise ValueError(f"lse must be [B,T,N] = {(b, t, n)}, got "
                     f"{lse_BTN.shape}")
  if (q_I_BTIJ.shape[:2] != (b, t) or k_I_BSJ.shape[:2] != (b, s)
      or w_BTI.shape != q_I_BTIJ.shape[:3]):
    raise ValueError(f"indexer q [B,T,I,J], k [B,S,J], w [B,T,I] must share "
                     f"B={b}, T={t}, S={s}; got {q_I_BTIJ.shape}, "
                     f"{k_I_BSJ.shape}, {w_BTI.shape}")
  seg_BT, seg_k_BS, q_index_T = _shard(q_index_T, k_segment_ids_BS,
                                       segment_ids_BT, b, t, s)
  qs, ks, lse_BTN = jax.lax.stop_gradient((qs, ks, lse_BTN))
  return (qs, ks, lse_BTN, q_I_BTIJ, k_I_BSJ, w_BTI, seg_BT, seg_k_BS,
          q_index_T)


def warmup_kl_mean(q_parts, k_parts, lse_BTN, q_I_BTIJ, k_I_BSJ, w_BTI,
                   scale: float, segment_ids_BT=None, block: int = 256, *,
                   q_index_T=None, k_segment_ids_BS=None):
  """The mean over [B, T] of ``warmup_kl``, for training: under a gradient
  its forward makes the indexer's lse in a pass of its own, then scores
  each tile once for both the KL and its indexer gradient (kept as the
  residual), so the attention scores are formed twice per step (the
  attention's forward, this pass) instead of three times. Not
  differentiated, it is ``warmup_kl``'s one pass. The gradient takes p as
  normalised (Z = 1), which holds when ``lse_BTN`` is ``attention``'s over
  the same queries, keys and segments."""
  return _warmup_kl_mean(*_kl_args(
      q_parts, k_parts, lse_BTN, q_I_BTIJ, k_I_BSJ, w_BTI, segment_ids_BT,
      q_index_T, k_segment_ids_BS), float(scale), int(block))


def warmup_kl(q_parts, k_parts, lse_BTN, q_I_BTIJ, k_I_BSJ, w_BTI,
              scale: float, segment_ids_BT=None, block: int = 256, *,
              q_index_T=None, k_segment_ids_BS=None):
  """The DSA dense warm-up KL_BT (f32) of causal self-attention given by
  its score parts and the lse that ``attention`` returned, against the
  indexer logits of (q_I, k_I, w), over the lower-triangle blocks: one
  pass, values only (its loops have no reverse mode; train on
  ``warmup_kl_mean``). A query shard: ``q_index_T`` and
  ``k_segment_ids_BS`` as in ``attention``."""
  args = _kl_args(q_parts, k_parts, lse_BTN, q_I_BTIJ, k_I_BSJ, w_BTI,
                  segment_ids_BT, q_index_T, k_segment_ids_BS)
  return _kl_fwd_impl(*args, float(scale), int(block))
