"""jnp references of the DSA ops; the Pallas kernels share these signatures.

All ops work over query chunks (``q_chunk``) so that memory is O(T * K) for
the sparse ops and O(chunk * S) for the indexer scores, never T x S x heads.

sparse_mla: each query t attends to its K selected latent rows
kv[idx[t, k]] (A = C + R wide, shared by all N heads, MQA form), rows with
``valid = False`` masked out:
  s[n, k] = q[t, n] . kv[idx[t, k]] * scale
  o[t, n] = sum_k softmax_k(s[n]) kv[idx[t, k], :C],  lse[t, n] = logsumexp_k s
sparse_gqa: the same selection for grouped-query attention: query head n of
group g = n // M (M = N / G) attends to the K selected rows of its kv head,
  s[n, k] = q[t, n] . k[idx[t, k], g] * scale
  o[t, n] = sum_k softmax_k(s[n]) v[idx[t, k], g]
indexer: I[t, s] = sum_i w[t, i] * relu(q[t, i] . k[s]), masked causally and
by segment, then the top-K keys per query (ties to the lower index).
kl_divergence: KL(p || softmax(logits)) over the last axis on a mask, the
indexer's loss in both DSA phases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsax.kernels.query_chunks import causal_segment_mask, map_query_chunks
from dsax.kernels.tiling import NEG_INF


def kl_divergence(p, logits, mask):
  """KL(p || softmax(logits)) over the last axis, on ``mask``:
    sum_s p (log p - log_softmax(logits)),
  masked logits set to NEG_INF before the softmax, masked terms dropped,
  p log p as xlogy (0 where p = 0). Shapes [..., S] (mask broadcastable):
  [B, T, S] in the dense warm-up, [B, T, K] over the selected keys. p is
  used as given (normalise it first); the gradient flows to both."""
  logq = jax.nn.log_softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
  terms = jax.scipy.special.xlogy(p, p) - p * logq
  return jnp.sum(jnp.where(mask, terms, 0.0), axis=-1)


def gather_rows(x_BS_: jax.Array, idx_BTK: jax.Array) -> jax.Array:
  """x[b, idx[b, t, k]] -> [B, T, K, ...]: x is [B, S, ...] with any trailing
  axes (a latent row [B,S,A], indexer keys [B,S,J], GQA keys [B,S,G,H])."""
  return jax.vmap(lambda x, i: x[i])(x_BS_, idx_BTK)


def sparse_scores(q_BTN_: jax.Array, rows_BTK_: jax.Array,
                  scale: float) -> jax.Array:
  """Scores of each query against its own selected rows, f32 [B,T,N,K].
  MLA (MQA form): q [B,T,N,A], rows [B,T,K,A], one row shared by all heads.
  GQA: q [B,T,N,H], rows [B,T,K,G,H], query head n reading kv head
  n // (N / G)."""
  if rows_BTK_.ndim == 4:
    return jnp.einsum("btna,btka->btnk", q_BTN_, rows_BTK_,
                      preferred_element_type=jnp.float32) * scale
  b, t, n, h = q_BTN_.shape
  g = rows_BTK_.shape[3]
  s = jnp.einsum("btgmh,btkgh->btgmk", q_BTN_.reshape(b, t, g, n // g, h),
                 rows_BTK_, preferred_element_type=jnp.float32)
  return s.reshape(b, t, n, -1) * scale


def sparse_mla_reference(q_BTNA: jax.Array, kv_BSA: jax.Array,
                         idx_BTK: jax.Array, valid_BTK: jax.Array,
                         scale: float, v_dim: int, q_chunk: int = 256):
  """Top-k sparse MLA; v_dim = C, the first C columns of a row are its
  value. Returns (o_BTNC in q's dtype, lse_BTN in f32)."""

  def chunk_fn(start, q, idx, valid):
    del start
    kv_sel = gather_rows(kv_BSA, idx)                        # B,t,K,A
    s = sparse_scores(q, kv_sel, scale)
    s = jnp.where(valid[:, :, None, :], s, NEG_INF)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    o = jnp.einsum("btnk,btkc->btnc", p.astype(q.dtype), kv_sel[..., :v_dim])
    return o, lse

  return map_query_chunks(chunk_fn, q_chunk, q_BTNA, idx_BTK, valid_BTK)


def sparse_gqa_reference(q_BTNH: jax.Array, k_BSGH: jax.Array,
                         v_BSGH: jax.Array, idx_BTK: jax.Array,
                         valid_BTK: jax.Array, scale: float,
                         q_chunk: int = 256):
  """Top-k sparse GQA. Returns (o_BTNH in q's dtype, lse_BTN in f32)."""

  def chunk_fn(start, q, idx, valid):
    del start
    b, t, n, h = q.shape
    g = k_BSGH.shape[2]
    s = sparse_scores(q, gather_rows(k_BSGH, idx), scale)   # B,t,N,K
    s = jnp.where(valid[:, :, None, :], s, NEG_INF)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None]).reshape(b, t, g, n // g, -1)
    o = jnp.einsum("btgmk,btkgh->btgmh", p.astype(q.dtype),
                   gather_rows(v_BSGH, idx).astype(q.dtype))
    return o.reshape(b, t, n, h), lse

  return map_query_chunks(chunk_fn, q_chunk, q_BTNH, idx_BTK, valid_BTK)


def indexer_logits(q_BTIJ: jax.Array, k_BSJ: jax.Array,
                   w_BTI: jax.Array) -> jax.Array:
  """I[b, t, s] = sum_i w[b, t, i] relu(q[b, t, i] . k[b, s]), f32 [B,T,S]."""
  dots = jnp.einsum("btij,bsj->btis", q_BTIJ, k_BSJ,
                    preferred_element_type=jnp.float32)
  return jnp.einsum("btis,bti->bts", jax.nn.relu(dots),
                    w_BTI.astype(jnp.float32))


def indexer_topk_reference(q_BTIJ: jax.Array, k_BSJ: jax.Array,
                           w_BTI: jax.Array, topk: int,
                           segment_ids_BT: jax.Array | None = None,
                           q_chunk: int = 256, *,
                           q_index_T: jax.Array | None = None,
                           k_segment_ids_BS: jax.Array | None = None):
  """Causal, in-segment top-k keys of the indexer scores.

  Returns (idx_BTK int32, valid_BTK bool) with K = min(topk, S). For query t
  only min(K, #visible keys) entries are valid; invalid entries point at t
  itself (a visible key), so a gather with them is always safe.
  A query shard (context parallelism): ``q_index_T`` int32 [T] is each
  query's index among the S keys (the mask is key index <= it) and
  ``k_segment_ids_BS`` the keys' segment ids; default arange(T), S = T.
  """
  # Selection is not differentiable; without this the backward would keep
  # each chunk's [chunk, S] scores as residuals.
  q_BTIJ, k_BSJ, w_BTI = jax.lax.stop_gradient((q_BTIJ, k_BSJ, w_BTI))
  b, t = q_BTIJ.shape[:2]
  s_len = k_BSJ.shape[1]
  kk = min(topk, s_len)
  if q_index_T is None:
    if s_len != t:
      raise ValueError(f"indexer top-k: S={s_len} keys for T={t} queries "
                       "need q_index_T")
    q_index_T = jnp.arange(t, dtype=jnp.int32)
    k_segment_ids_BS = segment_ids_BT
  seg_BT = (jnp.zeros((b, t), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  seg_BS = (jnp.zeros((b, s_len), jnp.int32) if k_segment_ids_BS is None
            else k_segment_ids_BS)
  k_index = jnp.arange(s_len)
  q_index_BT = jnp.broadcast_to(q_index_T.astype(jnp.int32), (b, t))

  def chunk_fn(start, q_BTIJ, w_BTI, seg_BT, q_index_BT):
    del start
    q_index_T = q_index_BT[0]
    mask_BTS = causal_segment_mask(q_index_T, k_index, seg_BT, seg_BS)
    return select_topk(indexer_logits(q_BTIJ, k_BSJ, w_BTI), mask_BTS, kk,
                       q_index_T)

  return map_query_chunks(chunk_fn, q_chunk, q_BTIJ, w_BTI, seg_BT,
                          q_index_BT)


def select_topk(scores_BTS: jax.Array, mask_BTS: jax.Array, topk: int,
                q_index_T: jax.Array):
  """The top-k keys of each query among those ``mask_BTS`` lets it see (ties
  to the lower index): (idx_BTK int32, valid_BTK bool), K = min(topk, S).

  The mask is re-applied after selection: with fewer than K visible keys the
  top-k also returns masked (future or other-document) keys; those entries
  are invalid and point at the query's own position ``q_index_T`` (a
  visible key), so a gather with them is always safe. The one definition of
  the selection: the indexer's top-k in a forward and in a decode step, and
  the recall metrics, all use it."""
  kk = min(topk, scores_BTS.shape[-1])
  _, idx_BTK = jax.lax.top_k(jnp.where(mask_BTS, scores_BTS, -jnp.inf), kk)
  valid_BTK = jnp.take_along_axis(
      jnp.broadcast_to(mask_BTS, scores_BTS.shape), idx_BTK, axis=-1)
  idx_BTK = jnp.where(valid_BTK, idx_BTK, q_index_T[None, :, None])
  return idx_BTK.astype(jnp.int32), valid_BTK
