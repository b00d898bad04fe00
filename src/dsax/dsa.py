"""DeepSeek Sparse Attention: lightning indexer, top-k selection, sparse MLA,
the indexer losses and attention-mass recall.

Indexer (DeepSeek-V3.2, after its RoPE fix), per token with hidden h and
normalised q-latent c_q (h when the model has no q-latent):
  q_I[t, i] = RoPE_half(c_q W_qb)[i]        I heads of dim J
  k_I[s]    = RoPE_half(LayerNorm(h W_k))    one key per token, with bias
  w[t, i]   = (h W_w)[i] * I**-0.5 * J**-0.5  (in f32)
  I[t, s]   = sum_i w[t, i] * relu(q_I[t, i] . k_I[s])
RoPE rotates the first R_I dims half-split (not interleaved). Optionally q_I and
k_I are rotated by a normalised Hadamard matrix and pass through an FP8 (e4m3,
one scale per 128-vector) round trip with a straight-through gradient.

Selection (``select``, by ``AttentionMode.selection``): S_t = top-k of
I[t, s] over s <= t in t's segment (k_eff = min(k, visible)). Baselines:
"local" = the first ``sinks`` keys of t's segment plus its k - sinks most
recent keys (``local_window``); "oracle" = the top-k of the dense target p_t
below (``oracle_probe``). Every selection is causal and in-segment, with the
invalid slots of ``select_topk`` (pointing at t, valid = False). Sparse
attention attends only to [c_kv ; k_rope] rows in S_t in absorbed (MQA) form,
softmax scale unchanged. GQA models (no q-latent: q_I from h) attend to the k
and v rows in S_t of each kv head; S_t is shared by all heads either way.

Losses (target detached; indexer inputs detached):
  dense:  p_t = sum_n softmax(s_n[t, :]) / N over causal keys;
          KL(p_t || softmax(I[t, :]))
  sparse: the same with both sides restricted and renormalised to S_t.
Recall: sum of p_t over S_t (selected), over the k largest p_t (oracle) and
over the k most recent keys (local window).
Router-style gate (``AttentionMode.indexer_gate``, ``gate_delta``): the LM
loss reaches the indexer through the selected keys' attention logits,
  g[t, k]    = softmax_{k in S_t} I[t, idx[t, k]]
  s'[n,t,k]  = s[n,t,k] + log g[t,k] - sg(log g[t,k])
so the forward is unchanged, dL/dI[t, k] = sum_n p[n,t,k] (v_k - o[n,t]) .
dL/do[n,t] (the normaliser of g cancels in the attention softmax), and the
main model's gradient is unchanged.

``attend`` is the one attention layer of the model: it takes the layer's
projections and an ``attention.AttentionMode`` and returns ``(o, LayerAux)``
for every mode (dense, dense with the warm-up KL or recall, sparse with the
indexer's, a baseline's or a given selection).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsax import gqa, kernels, mla, rope, sharding
from dsax.attention import AttentionMode, LayerAux, Projections, QueryShard
from dsax.config import ModelConfig
from dsax.kernels import causal_blocks, reference
from dsax.kernels.query_chunks import map_query_chunks
from dsax.kernels.reference import (NEG_INF, gather_rows, indexer_logits,
                                    kl_divergence, select_topk, sparse_scores)


def family(cfg: ModelConfig):
  """The attention family's module (``dsax.mla`` or ``dsax.gqa``): both
  provide angles, project, dense_attention, flash_inputs,
  sparse_attention, masked_attention and softmax_scale with one signature."""
  return gqa if cfg.attention_type == "gqa" else mla


# ------------------------------------------------------------------ indexer


def hadamard(n: int) -> np.ndarray:
  """Normalised Sylvester Hadamard matrix of order n (a power of two)."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(n)


def fp8_roundtrip(x: jax.Array, block: int = 128) -> jax.Array:
  """e4m3 quantise-dequantise with one scale per ``block`` of the last axis;
  the gradient passes straight through."""
  d = x.shape[-1]
  blk = min(block, d)
  xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (d // blk, blk))
  amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
  scale = jnp.maximum(amax, 1e-12) / float(jnp.finfo(jnp.float8_e4m3fn).max)
  q = (xb / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale
  q = q.reshape(x.shape).astype(x.dtype)
  return x + jax.lax.stop_gradient(q - x)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mu = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
  y = (x32 - mu) * jax.lax.rsqrt(var + eps)
  scale, bias = (jax.lax.broadcast_to_rank(v.astype(jnp.float32), y.ndim)
                 for v in (scale, bias))
  return (y * scale + bias).astype(x.dtype)


def indexer_angles(positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
  inv = rope.inv_frequencies(cfg.indexer.rope_dim, cfg.rope_theta,
                             cfg.rope_scaling)
  return rope.angles(positions_BT, inv)


def indexer_project(p: dict[str, Any], h_BTD: jax.Array,
                    cq_BTQ: jax.Array | None, ang_BTR: jax.Array,
                    cfg: ModelConfig):
  """Returns (q_BTIJ, k_BTJ, w_BTI) of the lightning indexer; q reads the
  q-latent ``cq_BTQ`` (the hidden state when it is None)."""
  ix = cfg.indexer
  cdt = jnp.dtype(cfg.compute_dtype)
  src_BTQ = (h_BTD if cq_BTQ is None else cq_BTQ).astype(cdt)
  q_BTIJ = jnp.einsum("btq,qij->btij", src_BTQ, p["wq_b"].astype(cdt))
  k_BTJ = layer_norm(h_BTD.astype(cdt) @ p["wk"].astype(cdt),
                     p["k_norm_scale"], p["k_norm_bias"], cfg.norm_eps)
  r = ix.rope_dim
  if r:
    q_BTIJ = jnp.concatenate(
        [rope.apply_half(q_BTIJ[..., :r], ang_BTR), q_BTIJ[..., r:]], -1)
    k_BTJ = jnp.concatenate(
        [rope.apply_half(k_BTJ[..., :r], ang_BTR), k_BTJ[..., r:]], -1)
  if ix.hadamard:
    had_JJ = jnp.asarray(hadamard(ix.head_dim), cdt)
    q_BTIJ, k_BTJ = q_BTIJ @ had_JJ, k_BTJ @ had_JJ
  if ix.fp8:
    q_BTIJ, k_BTJ = fp8_roundtrip(q_BTIJ), fp8_roundtrip(k_BTJ)
  w_BTI = h_BTD.astype(jnp.float32) @ p["weights_proj"].astype(jnp.float32)
  w_BTI = w_BTI * (ix.n_heads ** -0.5 * ix.head_dim ** -0.5)
  return q_BTIJ, k_BTJ, w_BTI


def select_cached(p: dict[str, Any], h_B1D: jax.Array,
                  cq_B1Q: jax.Array | None, index_k_BSJ: jax.Array,
                  pos: jax.Array, topk: int, cfg: ModelConfig):
  """One decode step's selection: (idx_B1K, valid_B1K, index_k_BSJ with the
  new token's key written at ``pos``): the top-k cached keys s <= pos by the
  new token's indexer scores, as ``kernels.indexer_topk`` selects them in a
  forward (same ``select_topk``)."""
  b, max_len = index_k_BSJ.shape[:2]
  ang_B1R = indexer_angles(jnp.full((b, 1), pos, jnp.int32), cfg)
  q_B1IJ, k_B1J, w_B1I = indexer_project(p, h_B1D, cq_B1Q, ang_B1R, cfg)
  index_k_BSJ = jax.lax.dynamic_update_slice(
      index_k_BSJ, k_B1J.astype(index_k_BSJ.dtype), (0, pos, 0))
  visible_11S = (jnp.arange(max_len) <= pos)[None, None]
  idx_B1K, valid_B1K = select_topk(
      indexer_logits(q_B1IJ, index_k_BSJ, w_B1I), visible_11S, topk,
      jnp.reshape(pos, (1,)))
  return idx_B1K, valid_B1K, index_k_BSJ


# ------------------------------------------------------ selection baselines


def segment_starts(segment_ids_BT: jax.Array | None, b: int,
                   t: int) -> jax.Array:
  """The first position of each token's segment, int32 [B, T]. Segments are
  contiguous runs of one id (as ``dsax.data`` packs them, padding included):
  a new run starts where the id changes."""
  if segment_ids_BT is None:
    return jnp.zeros((b, t), jnp.int32)
  pos_1T = jnp.arange(t, dtype=jnp.int32)[None, :]
  first_B1 = jnp.ones((b, 1), bool)
  change_BT = jnp.concatenate(
      [first_B1, segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(change_BT, pos_1T, 0), axis=1)


def local_window(segment_ids_BT: jax.Array | None, b: int, t: int, topk: int,
                 sinks: int, shard: QueryShard | None = None):
  """The "local" selection: per query t with segment start a_t and n_t =
  t - a_t + 1 visible keys, S_t = {a_t .. a_t + sinks - 1} (attention
  sinks) U {t - (k - sinks) + 1 .. t} when n_t > k, else every visible key
  {a_t .. t}; K = min(topk, S) slots as ``select_topk`` lays them out
  (invalid slots point at t). Built in O(T K): no scores, no top-k.
  A query shard (``shard``): t is each query's index among the S keys,
  a_t from the keys' segment ids."""
  if shard is None:
    kk = min(topk, t)
    start_BT1 = segment_starts(segment_ids_BT, b, t)[:, :, None]
    q_1T1 = jnp.arange(t, dtype=jnp.int32)[None, :, None]
  else:
    s_len = shard.k_segment_ids_BS.shape[1]
    kk = min(topk, s_len)
    start_BT1 = jnp.take(segment_starts(shard.k_segment_ids_BS, b, s_len),
                         shard.q_index_T, axis=1)[:, :, None]
    q_1T1 = shard.q_index_T.astype(jnp.int32)[None, :, None]
  slot_11K = jnp.arange(kk, dtype=jnp.int32)[None, None, :]
  n_BT1 = q_1T1 - start_BT1 + 1
  # Slot j holds the j-th key of the segment (the sinks, or every key when
  # all fit), else the (k - 1 - j)-th key before the query.
  from_start_BTK = (n_BT1 <= kk) | (slot_11K < sinks)
  idx_BTK = jnp.where(from_start_BTK, start_BT1 + slot_11K,
                      q_1T1 - (kk - 1 - slot_11K))
  valid_BTK = slot_11K < n_BT1
  idx_BTK = jnp.where(valid_BTK, idx_BTK, q_1T1)
  return idx_BTK.astype(jnp.int32), valid_BTK


def oracle_probe(start, prob_BNTS, mask_BTS, *, topk: int,
                 n_keys: int) -> tuple[jax.Array, jax.Array]:
  """The "oracle" selection of one query chunk (a ``dense_attention`` probe,
  partial over the keywords): ``select_topk`` of the warm-up target p_t
  (softmax per head, summed over heads, L1-normalised) on the chunk's mask.
  A chunk that sees a key prefix shorter than ``n_keys`` gets invalid slots
  appended, so every chunk has K = min(topk, n_keys) slots."""
  p_BTS = normalise(jnp.sum(prob_BNTS, axis=1))
  b, tc, s_len = p_BTS.shape
  q_index_T = start + jnp.arange(tc, dtype=jnp.int32)
  idx_BTK, valid_BTK = select_topk(p_BTS, mask_BTS, topk, q_index_T)
  pad = min(topk, n_keys) - min(topk, s_len)
  if pad:
    idx_BTK = jnp.concatenate([idx_BTK, jnp.broadcast_to(
        q_index_T[None, :, None], (b, tc, pad)).astype(jnp.int32)], -1)
    valid_BTK = jnp.concatenate(
        [valid_BTK, jnp.zeros((b, tc, pad), bool)], -1)
  return idx_BTK, valid_BTK


# ------------------------------------------------------- losses and recall


def normalise(p_BTS: jax.Array) -> jax.Array:
  """L1-normalise the last axis."""
  return p_BTS / jnp.maximum(jnp.sum(p_BTS, axis=-1, keepdims=True), 1e-30)


def recall_metrics(p_BTS: jax.Array, logits_BTS: jax.Array, mask_BTS: jax.Array,
                   q_index_T: jax.Array, topk: int) -> dict[str, jax.Array]:
  """Dense attention mass kept by the indexer's top-k, the oracle top-k and
  the local window of the k most recent keys; [B, T] each."""
  kk = min(topk, p_BTS.shape[-1])
  idx_BTK, valid_BTK = select_topk(logits_BTS, mask_BTS, kk, q_index_T)
  selected_BT = jnp.sum(jnp.take_along_axis(p_BTS, idx_BTK, -1) * valid_BTK,
                        -1)
  oracle_BT = jnp.sum(jax.lax.top_k(p_BTS, kk)[0], -1)
  k_index_S = jnp.arange(p_BTS.shape[-1])
  window_1TS = k_index_S[None, None, :] > q_index_T[None, :, None] - kk
  local_BT = jnp.sum(jnp.where(window_1TS & mask_BTS, p_BTS, 0.0), -1)
  return {"recall": selected_BT, "recall_oracle": oracle_BT,
          "recall_local": local_BT}


def dense_probe(start, prob_BNTS, mask_BTS, q_i_BTIJ, w_i_BTI, k_i_BSJ, *,
                topk: int, loss: bool, recall: bool) -> dict[str, jax.Array]:
  """The chunk probe of ``dense_attention`` (partial over the keywords):
  per query of the chunk, the warm-up KL and/or recall from the chunk's
  attention probabilities and the indexer q, w (of its queries) and k (of
  its key prefix)."""
  p_BTS = normalise(jax.lax.stop_gradient(jnp.sum(prob_BNTS, axis=1)))
  logits_BTS = indexer_logits(q_i_BTIJ, k_i_BSJ, w_i_BTI)
  out = {}
  if loss:
    out["indexer_kl"] = kl_divergence(p_BTS, logits_BTS, mask_BTS)
  if recall:
    q_index_T = start + jnp.arange(p_BTS.shape[1])
    out.update(recall_metrics(p_BTS, jax.lax.stop_gradient(logits_BTS),
                              mask_BTS, q_index_T, topk))
    # Queries that see at most k keys keep all their mass in any set.
    out["recall_weight"] = (
        jnp.sum(jnp.broadcast_to(mask_BTS, p_BTS.shape), -1) > topk
    ).astype(jnp.float32)
  return out


def selected_logits(q_i_BTIJ: jax.Array, k_i_BSJ: jax.Array,
                    w_i_BTI: jax.Array, idx_BTK: jax.Array) -> jax.Array:
  """I[t, idx[t, k]] = sum_i w[t, i] relu(q_I[t, i] . k_I[idx[t, k]]), the
  indexer scores of the selected keys only, f32 [B, T, K]."""
  k_sel_BTKJ = gather_rows(k_i_BSJ, idx_BTK)
  dots_BTIK = jnp.einsum("btij,btkj->btik", q_i_BTIJ, k_sel_BTKJ,
                         preferred_element_type=jnp.float32)
  return jnp.einsum("btik,bti->btk", jax.nn.relu(dots_BTIK),
                    w_i_BTI.astype(jnp.float32))


def sparse_kl(q_BTNA: jax.Array, row_BSA: jax.Array, idx_BTK: jax.Array,
              valid_BTK: jax.Array, scale: float, q_i_BTIJ: jax.Array,
              k_i_BSJ: jax.Array, w_i_BTI: jax.Array, q_chunk: int) -> jax.Array:
  """KL(p_t[S_t] || softmax(I_t[S_t])) per token, both renormalised on S_t;
  the main-model side (q, rows) is the detached target. [B, T]. ``row_BSA``
  holds MLA's latent rows shared by all heads, or GQA's keys k_BSGH (with
  q_BTNH)."""
  q_BTNA = jax.lax.stop_gradient(q_BTNA)
  row_BSA = jax.lax.stop_gradient(row_BSA)

  def chunk_fn(start, q_BTNA, idx_BTK, valid_BTK, q_i_BTIJ, w_i_BTI):
    del start
    s_BTNK = sparse_scores(q_BTNA, gather_rows(row_BSA, idx_BTK), scale)
    s_BTNK = jnp.where(valid_BTK[:, :, None, :], s_BTNK, NEG_INF)
    p_BTK = normalise(jnp.sum(jax.nn.softmax(s_BTNK, axis=-1), axis=2))
    logits_BTK = selected_logits(q_i_BTIJ, k_i_BSJ, w_i_BTI, idx_BTK)
    return kl_divergence(p_BTK, logits_BTK, valid_BTK)

  return map_query_chunks(chunk_fn, q_chunk, q_BTNA, idx_BTK, valid_BTK,
                          q_i_BTIJ, w_i_BTI)


def gate_delta(q_BTNA: jax.Array, row_BSA: jax.Array, value_BS_: jax.Array,
               idx_BTK: jax.Array, valid_BTK: jax.Array, scale: float,
               q_i_BTIJ: jax.Array, k_i_BSJ: jax.Array, w_i_BTI: jax.Array,
               q_chunk: int) -> jax.Array:
  """The router-style gate's term of the sparse attention output: exactly
  zero in value, its gradient reaches the indexer. With
    b[t, k]  = log g[t, k] - sg(log g[t, k]),
    g[t, k]  = softmax_{k in S_t} I[t, idx[t, k]]     (``selected_logits``)
  the sparse attention with logits s[n,t,k] + b[t,k] is, to first order in
  b (and exactly in value and gradient at b = 0),
    o[n, t] + delta[n, t],
    delta[n, t] = sum_k p[n,t,k] (b[t,k] - sum_j p[n,t,j] b[t,j]) v[idx[t,k]]
  with p the plain sparse probabilities. p, the rows and the values are
  detached, so the main model's gradient is unchanged. Shapes as
  ``sparse_kl`` (MLA: q_BTNA absorbed, rows [B,S,A], values the latents
  kv_BSC, delta [B,T,N,C]; GQA: q_BTNH, keys k_BSGH, values v_BSGH, delta
  [B,T,N,H])."""
  q_BTNA, row_BSA, value_BS_ = jax.lax.stop_gradient(
      (q_BTNA, row_BSA, value_BS_))

  def chunk_fn(start, q_BTNA, idx_BTK, valid_BTK, q_i_BTIJ, w_i_BTI):
    del start
    s_BTNK = sparse_scores(q_BTNA, gather_rows(row_BSA, idx_BTK), scale)
    p_BTNK = jax.nn.softmax(
        jnp.where(valid_BTK[:, :, None, :], s_BTNK, NEG_INF), axis=-1)
    logits_BTK = selected_logits(q_i_BTIJ, k_i_BSJ, w_i_BTI, idx_BTK)
    log_g_BTK = jax.nn.log_softmax(
        jnp.where(valid_BTK, logits_BTK, NEG_INF), axis=-1)
    b_BT1K = jnp.where(valid_BTK, log_g_BTK - jax.lax.stop_gradient(
        log_g_BTK), 0.0)[:, :, None, :]
    # The softmax's Jacobian applied to b: p (b - <b>_p), per head.
    dp_BTNK = p_BTNK * (b_BT1K - jnp.sum(p_BTNK * b_BT1K, -1, keepdims=True))
    v_sel_BTK_ = gather_rows(value_BS_, idx_BTK)
    dp_BTNK = dp_BTNK.astype(v_sel_BTK_.dtype)
    if v_sel_BTK_.ndim == 4:  # MLA: one latent row shared by every head
      return jnp.einsum("btnk,btkc->btnc", dp_BTNK, v_sel_BTK_)
    b, t, n, k = dp_BTNK.shape
    g = v_sel_BTK_.shape[3]
    d_BTGMH = jnp.einsum("btgmk,btkgh->btgmh",
                         dp_BTNK.reshape(b, t, g, n // g, k), v_sel_BTK_)
    return d_BTGMH.reshape(b, t, n, -1)

  return map_query_chunks(chunk_fn, q_chunk, q_BTNA, idx_BTK, valid_BTK,
                          q_i_BTIJ, w_i_BTI)


def layer_means(per_token: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Means over query positions; recall only over queries that see more
  than k keys (1.0 when there are none)."""
  per_token = dict(per_token)
  w_BT = per_token.pop("recall_weight", None)
  out = {}
  for k, v_BT in per_token.items():
    if k.startswith("recall") and w_BT is not None:
      n = jnp.sum(w_BT)
      out[k] = jnp.where(n > 0, jnp.sum(v_BT * w_BT) / jnp.maximum(n, 1.0),
                         1.0)
    else:
      out[k] = jnp.mean(v_BT)
  return out


# -------------------------------------------------------------- the layer


def attend(p: dict[str, Any], h_BTD: jax.Array, proj: Projections,
           mode: AttentionMode, cfg: ModelConfig,
           segment_ids_BT: jax.Array | None = None,
           ang_i_BTR: jax.Array | None = None,
           given: tuple[jax.Array, jax.Array] | None = None,
           keys: Callable[..., Any] | None = None):
  """One layer's core attention: ``(o_BTNE, LayerAux)``.

  ``p`` is the layer's parameters (attn, indexer), ``h_BTD`` its normalised
  input (the indexer reads it), ``ang_i_BTR`` the indexer's RoPE angles
  (``indexer_angles``; needed when ``mode.uses_indexer``) and ``given`` the
  (idx_BTK, valid_BTK) of ``mode.selection == "given"``.
  dense:  causal attention; with ``indexer_loss`` the warm-up KL and with
          ``recall`` the recall, from the same scores (the jnp probe), or
          with kernels the flash kernel then the warm-up KL kernel on its lse.
  sparse: the selection (``select``: indexer top-k, local window, oracle,
          or given), sparse attention (MLA: absorbed form over the latent
          rows), the KL on the selected set; with ``indexer_gate`` the
          router-style gate (``gate_delta``, zero in value).
  The indexer's inputs are detached: it learns only from its own loss, and
  from the LM loss through the gate when ``mode.indexer_gate``.
  ``keys`` (context parallelism, dsax.context): ``keys(rows, k_I) ->
  (rows_S, k_I_S, QueryShard)`` gathers every shard's latent rows and
  indexer keys; the local queries then attend to all of them (jnp paths:
  ``causal_blocks`` and the reference top-k, which take a query shard).
  """
  out: dict[str, Any] = {}
  indexer = ()
  if mode.uses_indexer:
    cq = None if proj.cq is None else jax.lax.stop_gradient(proj.cq)
    indexer = indexer_project(p["indexer"], jax.lax.stop_gradient(h_BTD), cq,
                              ang_i_BTR, cfg)
    if mode.indexer_keys:
      out["index_k"] = indexer[1]
  if mode.cache:
    out["cache"] = proj.rows
  shard = None
  if keys is not None:
    rows, k_i_BSJ, shard = keys(proj.rows, indexer[1] if indexer else None)
    proj = dataclasses.replace(proj, rows=rows)
    if indexer:
      indexer = (indexer[0], k_i_BSJ, indexer[2])
  run = _sparse if mode.sparse else _dense
  o_BTNE, more = run(p["attn"], proj, mode, cfg, segment_ids_BT, indexer,
                     given, shard)
  return o_BTNE, LayerAux(**out, **more)


def _recall(fam, a, proj, mode, cfg, segment_ids_BT, indexer):
  """Recall of the dense attention mass, from a (detached) dense pass."""
  q_i_BTIJ, k_i_BSJ, w_i_BTI = indexer
  probe = functools.partial(dense_probe, topk=mode.topk, loss=False,
                            recall=True)
  _, per_token = fam.dense_attention(
      *jax.lax.stop_gradient((a, proj)), cfg, segment_ids_BT, probe,
      (q_i_BTIJ, w_i_BTI), (k_i_BSJ,))
  return layer_means(per_token)


def _dense(a, proj, mode, cfg, segment_ids_BT, indexer, given, shard=None):
  del given
  fam = family(cfg)
  if shard is not None:
    return _dense_shard(fam, a, proj, mode, cfg, segment_ids_BT, indexer,
                        shard)
  # Recall needs the probabilities: only the jnp path (a probe) has them.
  if kernels.resolve_impl(mode.impl) != "reference" and not mode.recall:
    q_BTNP, k_BSNP, v_BSNE = fam.flash_inputs(a, proj, cfg)
    scale = fam.softmax_scale(cfg)
    o_BTNE, lse_BTN = kernels.mla_flash(
        q_BTNP, k_BSNP, v_BSNE, scale, segment_ids_BT,
        q_chunk=cfg.attn_q_chunk, impl="pallas")
    if not mode.indexer_loss:
      return o_BTNE, {}
    kl_BT = kernels.warmup_kl(q_BTNP, k_BSNP, lse_BTN, *indexer, scale,
                              segment_ids_BT, q_chunk=cfg.attn_q_chunk,
                              impl="pallas")
    return o_BTNE, {"indexer_kl": jnp.mean(kl_BT)}
  if not (mode.indexer_loss or mode.recall):
    return fam.dense_attention(a, proj, cfg, segment_ids_BT)[0], {}
  if not mode.recall:
    # The warm-up: flash attention over the causal blocks gives (o, lse),
    # then the KL and its indexer gradient in one more pass over the same
    # blocks from that lse.
    qs, ks, v = fam.score_inputs(a, proj, cfg)
    scale = fam.softmax_scale(cfg)
    o_BTNE, lse_BTN = causal_blocks.attention(qs, ks, v, scale, segment_ids_BT,
                                              block=cfg.attn_q_chunk)
    kl = causal_blocks.warmup_kl_mean(qs, ks, lse_BTN, *indexer, scale,
                                      segment_ids_BT, block=cfg.attn_q_chunk)
    return o_BTNE, {"indexer_kl": kl}
  # Recall takes a top-k over each query's whole row: the chunk probe.
  q_i_BTIJ, k_i_BSJ, w_i_BTI = indexer
  probe = functools.partial(dense_probe, topk=mode.topk,
                            loss=mode.indexer_loss, recall=mode.recall)
  o_BTNE, per_token = fam.dense_attention(a, proj, cfg, segment_ids_BT, probe,
                                          (q_i_BTIJ, w_i_BTI), (k_i_BSJ,))
  return o_BTNE, layer_means(per_token)


def _dense_shard(fam, a, proj, mode, cfg, segment_ids_BT, indexer, shard):
  """Dense attention (with the warm-up KL) of a query shard against every
  key: ``causal_blocks`` from each query's index among the keys."""
  if mode.recall:
    raise ValueError("dsa: recall is not computed per query shard "
                     "(dsax.context runs it on whole rows)")
  at = {"q_index_T": shard.q_index_T,
        "k_segment_ids_BS": shard.k_segment_ids_BS}
  qs, ks, v = fam.score_inputs(a, proj, cfg)
  scale = fam.softmax_scale(cfg)
  o_BTNE, lse_BTN = causal_blocks.attention(qs, ks, v, scale, segment_ids_BT,
                                            block=shard.block, **at)
  if not mode.indexer_loss:
    return o_BTNE, {}
  kl = causal_blocks.warmup_kl_mean(qs, ks, lse_BTN, *indexer, scale,
                                    segment_ids_BT, block=shard.block, **at)
  return o_BTNE, {"indexer_kl": kl}


def _indexer_topk(q_i_BTIJ, k_i_BSJ, w_i_BTI, segment_ids_BT, *, topk, q_chunk,
                  impl):
  return kernels.indexer_topk(q_i_BTIJ, k_i_BSJ, w_i_BTI, topk, segment_ids_BT,
                              q_chunk=q_chunk, impl=impl)


def _oracle(fam, a, proj, mode, cfg, segment_ids_BT):
  """The oracle top-k from a detached dense pass of the layer's own
  projections: the probe sees one query chunk's [B, N, chunk, S]
  probabilities at a time (memory O(chunk x S), never T x S). The jnp dense
  path whatever ``mode.impl``: the kernels do not expose probabilities."""
  probe = functools.partial(oracle_probe, topk=mode.topk,
                            n_keys=proj.rows[0].shape[1])
  _, (idx_BTK, valid_BTK) = fam.dense_attention(
      *jax.lax.stop_gradient((a, proj)), cfg, segment_ids_BT, probe)
  return idx_BTK, valid_BTK


def _shard_topk(q_i_BTIJ, k_i_BSJ, w_i_BTI, segment_ids_BT, q_index_BT,
                k_segment_ids_BS, *, topk, q_chunk):
  return reference.indexer_topk_reference(
      q_i_BTIJ, k_i_BSJ, w_i_BTI, topk, segment_ids_BT, q_chunk,
      q_index_T=q_index_BT[0], k_segment_ids_BS=k_segment_ids_BS)


def select(a, proj: Projections, mode: AttentionMode, cfg: ModelConfig,
           segment_ids_BT, indexer, given, shard=None):
  """(idx_BTK, valid_BTK) of a sparse layer by ``mode.selection``: the
  indexer's top-k, the local window with sinks, the oracle top-k of the
  dense attention, or the given sets. A query shard (``shard``): the
  indexer's top-k or the local window, indices among every key."""
  if shard is not None and mode.selection == "local":
    b, t = proj.q.shape[:2]
    return local_window(segment_ids_BT, b, t, mode.topk, mode.sinks, shard)
  if shard is not None:
    if mode.selection != "indexer":
      raise ValueError(f"dsa: selection={mode.selection!r} is not computed "
                       "per query shard (dsax.context runs it on whole rows)")
    b, t = indexer[0].shape[:2]
    seg_BT = (jnp.zeros((b, t), jnp.int32) if segment_ids_BT is None
              else segment_ids_BT)
    topk_fn = functools.partial(_shard_topk, topk=mode.topk,
                                q_chunk=cfg.indexer.q_chunk)
    return sharding.batch_local(topk_fn)(
        *indexer, seg_BT, jnp.broadcast_to(shard.q_index_T, (b, t)),
        shard.k_segment_ids_BS)
  if mode.selection == "given":
    return given
  if mode.selection == "local":
    b, t = proj.q.shape[:2]
    return local_window(segment_ids_BT, b, t, mode.topk, mode.sinks)
  if mode.selection == "oracle":
    return _oracle(family(cfg), a, proj, mode, cfg, segment_ids_BT)
  # Per shard of the batch rows: XLA would otherwise all-gather each
  # chunk's scores over the batch and repeat the top-k on every device.
  topk_fn = functools.partial(_indexer_topk, topk=mode.topk,
                              q_chunk=cfg.indexer.q_chunk, impl=mode.impl)
  return sharding.batch_local(topk_fn)(*indexer, segment_ids_BT)


def _gate(fam, a, proj, cfg, q_kl, rows_kl, idx_BTK, valid_BTK, indexer):
  """``gate_delta`` in the family's output space [B, T, N, E]: MLA's values
  are the latents (expanded by the detached W_kvb), GQA's the v rows."""
  q_i_BTIJ, k_i_BSJ, w_i_BTI = indexer
  mla_family = cfg.attention_type != "gqa"
  value_BS_ = proj.rows[0] if mla_family else proj.rows[1]
  d_BTN_ = gate_delta(q_kl, rows_kl, value_BS_, idx_BTK, valid_BTK,
                      fam.softmax_scale(cfg), q_i_BTIJ, k_i_BSJ, w_i_BTI,
                      cfg.indexer.q_chunk)
  if mla_family:
    d_BTN_ = mla.expand_output(d_BTN_, jax.lax.stop_gradient(a["wkv_b"]),
                               cfg)
  return d_BTN_


# Short contexts: sparse attention as dense attention under the selection's
# key mask (the layer MaxText writes), which is cheaper on a CPU than
# gathering k rows per query when S <= MASKED_RATIO * k. Measured by
# experiments/bench_attention.py (variants "masked" and "gather", one
# MLA + indexer layer, d 1024, k 256, f32, 2 cores): T 512 masked 385 ms,
# gather 442; T 1024 masked 1350, gather 963. MASKED_MAX_KEYS bounds its
# [B, N, T, S] f32 scores. The jnp reference only: the kernels always
# gather. AttentionMode.sparse_way forces either.
MASKED_RATIO = 2
MASKED_MAX_KEYS = 2048


def use_masked(mode: AttentionMode, n_keys: int) -> bool:
  """Whether a sparse forward over ``n_keys`` keys runs masked."""
  if mode.sparse_way != "auto":
    return mode.sparse_way == "masked"
  return (mode.impl == "reference" and n_keys <= MASKED_MAX_KEYS
          and n_keys <= MASKED_RATIO * mode.topk)


def selection_mask(idx_BTK: jax.Array, valid_BTK: jax.Array,
                   n_keys: int) -> jax.Array:
  """The selected sets as a [B, T, S] key mask (invalid slots set nothing)."""
  b, t, _ = idx_BTK.shape
  bi_B11 = jnp.arange(b)[:, None, None]
  ti_1T1 = jnp.arange(t)[None, :, None]
  return jnp.zeros((b, t, n_keys), bool).at[bi_B11, ti_1T1, idx_BTK].max(
      valid_BTK)


def _sparse(a, proj, mode, cfg, segment_ids_BT, indexer, given, shard=None):
  fam = family(cfg)
  chunk = cfg.indexer.q_chunk
  idx_BTK, valid_BTK = select(a, proj, mode, cfg, segment_ids_BT, indexer,
                              given, shard)
  n_keys = proj.rows[0].shape[1]
  if use_masked(mode, n_keys):
    o_BTNE = fam.masked_attention(
        a, proj, proj.rows, selection_mask(idx_BTK, valid_BTK, n_keys), cfg)
    q_kl, rows_kl = fam.absorbed_inputs(a, proj, proj.rows, cfg)
  else:
    o_BTNE, (q_kl, rows_kl) = fam.sparse_attention(
        a, proj, proj.rows, idx_BTK, valid_BTK, cfg, mode.impl)
  if mode.indexer_gate:
    # Zero in value: the forward is the plain sparse forward.
    o_BTNE = o_BTNE + _gate(fam, a, proj, cfg, q_kl, rows_kl, idx_BTK,
                            valid_BTK, indexer).astype(o_BTNE.dtype)
  out = {}
  if mode.indexer_loss:
    q_i_BTIJ, k_i_BSJ, w_i_BTI = indexer
    out["indexer_kl"] = jnp.mean(sparse_kl(
        q_kl, rows_kl, idx_BTK, valid_BTK, fam.softmax_scale(cfg), q_i_BTIJ,
        k_i_BSJ, w_i_BTI, chunk))
  if mode.recall:
    if shard is not None:
      raise ValueError("dsa: recall is not computed per query shard "
                       "(dsax.context runs it on whole rows)")
    out.update(_recall(fam, a, proj, mode, cfg, segment_ids_BT, indexer))
  if mode.indices:
    out["idx"], out["valid"] = idx_BTK, valid_BTK
  return o_BTNE, out
