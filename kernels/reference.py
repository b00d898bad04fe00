"""jnp references of the DSA ops; the Pallas kernels share these signatures.

All ops work over query chunks (``q_chunk``) so that memory is O(T * K) for the
sparse ops and O(chunk * S) for the indexer scores, never T x S x heads.

sparse_mla: each query t attends to its K selected latent rows kv[idx[t, k]]
(shared by all N heads, MQA form), rows with ``valid = False`` masked out:
  s[n, k] = q[t, n] . kv[idx[t, k]] * scale
  o[t, n] = sum_k softmax_k(s[n]) kv[idx[t, k], :v_dim],  lse[t, n] = logsumexp_k s
sparse_gqa: the same selection for grouped-query attention: query head n of
group g = n // M (M = N / G) attends to the K selected rows of its kv head,
  s[n, k] = q[t, n] . k[idx[t, k], g] * scale,  o[t, n] = sum_k softmax_k(s[n]) v[idx[t, k], g]
indexer: I[t, s] = sum_i w[t, i] * relu(q[t, i] . k[s]), masked causally and by
segment, then the top-K keys per query (ties to the lower index).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsax.kernels.query_chunks import causal_segment_mask, map_query_chunks

NEG_INF = -1e30


def gather_rows(x_BSD: jax.Array, idx_BTK: jax.Array) -> jax.Array:
  """x[b, idx[b, t, k]] -> [B, T, K, D]."""
  return jax.vmap(lambda x, i: x[i])(x_BSD, idx_BTK)


def sparse_scores(q_BTND: jax.Array, k_sel_BTK: jax.Array,
                  scale: float) -> jax.Array:
  """Scores of each query against its own selected rows, f32 [B,T,N,K].
  ``k_sel`` [B,T,K,D]: one row shared by all heads (MQA); [B,T,K,G,D]: per
  kv head, query head n reading group n // (N / G)."""
  if k_sel_BTK.ndim == 4:
    return jnp.einsum("btnd,btkd->btnk", q_BTND, k_sel_BTK,
                      preferred_element_type=jnp.float32) * scale
  b, t, n, d = q_BTND.shape
  g = k_sel_BTK.shape[3]
  s = jnp.einsum("btgmd,btkgd->btgmk", q_BTND.reshape(b, t, g, n // g, d),
                 k_sel_BTK, preferred_element_type=jnp.float32)
  return s.reshape(b, t, n, -1) * scale


def sparse_mla_reference(q_BTND: jax.Array, kv_BSD: jax.Array,
                         idx_BTK: jax.Array, valid_BTK: jax.Array,
                         scale: float, v_dim: int, q_chunk: int = 256):
  """Top-k sparse MLA. Returns (o_BTNV in q's dtype, lse_BTN in f32)."""

  def chunk_fn(start, q, idx, valid):
    del start
    kv_sel = gather_rows(kv_BSD, idx)                        # B,t,K,D
    s = sparse_scores(q, kv_sel, scale)
    s = jnp.where(valid[:, :, None, :], s, NEG_INF)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    o = jnp.einsum("btnk,btkv->btnv", p.astype(q.dtype), kv_sel[..., :v_dim])
    return o, lse

  return map_query_chunks(chunk_fn, q_chunk, q_BTND, idx_BTK, valid_BTK)


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
                           q_chunk: int = 256):
  """Causal, in-segment top-k keys of the indexer scores.

  Returns (idx_BTK int32, valid_BTK bool) with K = min(topk, S). For query t
  only min(K, #visible keys) entries are valid; invalid entries point at t
  itself (a visible key), so a gather with them is always safe.
  """
  # Selection is not differentiable; without this the backward would keep
  # each chunk's [chunk, S] scores as residuals.
  q_BTIJ, k_BSJ, w_BTI = jax.lax.stop_gradient((q_BTIJ, k_BSJ, w_BTI))
  b, s_len = k_BSJ.shape[:2]
  kk = min(topk, s_len)
  seg_BS = (jnp.zeros((b, s_len), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  k_index = jnp.arange(s_len)

  def chunk_fn(start, q, w, seg):
    tq = q.shape[1]
    q_index = start + jnp.arange(tq)
    mask = causal_segment_mask(q_index, k_index, seg, seg_BS)
    scores = jnp.where(mask, indexer_logits(q, k_BSJ, w), -jnp.inf)
    _, idx = jax.lax.top_k(scores, kk)
    # Re-apply the mask after selection: with fewer than K visible keys the
    # top-k also returns masked (future or other-document) keys.
    valid = jnp.take_along_axis(jnp.broadcast_to(mask, scores.shape), idx,
                                axis=-1)
    idx = jnp.where(valid, idx, q_index[None, :, None])
    return idx.astype(jnp.int32), valid

  return map_query_chunks(chunk_fn, q_chunk, q_BTIJ, w_BTI, seg_BS)
