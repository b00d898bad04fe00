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

Selection: S_t = top-k of I[t, s] over s <= t in t's segment (k_eff =
min(k, visible)). Sparse attention attends only to [c_kv ; k_rope] rows in S_t
in absorbed (MQA) form, softmax scale unchanged. GQA models (no q-latent: q_I
from h) attend to the k and v rows in S_t of each kv head; S_t is shared by
all heads either way.

Losses (target detached; indexer inputs detached):
  dense:  p_t = sum_n softmax(s_n[t, :]) / N over causal keys;
          KL(p_t || softmax(I[t, :]))
  sparse: the same with both sides restricted and renormalised to S_t.
Recall: sum of p_t over S_t (selected), over the k largest p_t (oracle) and
over the k most recent keys (local window).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsax import gqa, kernels, mla, rope, sharding
from dsax.config import ModelConfig
from dsax.kernels.reference import (NEG_INF, gather_rows, indexer_logits,
                                    sparse_gqa_reference, sparse_scores)
from dsax.kernels.query_chunks import map_query_chunks


@dataclasses.dataclass(frozen=True)
class DSAOptions:
  """What the DSA layer computes besides the attention output."""
  indexer_loss: bool = True     # per-layer indexer KL in aux["indexer_kl"]
  metrics: bool = False         # recall of selected / oracle / local window
  return_indices: bool = False  # aux["idx"], aux["valid"] per layer
  return_keys: bool = False     # aux["index_k"]: indexer keys (decode cache)
  topk: int | None = None       # overrides cfg.indexer.topk
  impl: str | None = None       # kernels: None = cfg.kernel_impl, or
                                # "reference" | "pallas" | "auto"


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
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(
      x.dtype)


def indexer_angles(positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
  inv = rope.inv_frequencies(cfg.indexer.rope_dim, cfg.rope_theta,
                             cfg.rope_scaling)
  return rope.angles(positions_BT, inv)


def indexer_project(p: dict[str, Any], h_BTD: jax.Array,
                    cq_BTQ: jax.Array | None, ang_BTR: jax.Array,
                    cfg: ModelConfig):
  """Returns (q_BTIJ, k_BTJ, w_BTI) of the lightning indexer."""
  ix = cfg.indexer
  cdt = jnp.dtype(cfg.compute_dtype)
  src = (h_BTD if cq_BTQ is None else cq_BTQ).astype(cdt)
  q = jnp.einsum("btq,qij->btij", src, p["wq_b"].astype(cdt))
  k = layer_norm(h_BTD.astype(cdt) @ p["wk"].astype(cdt), p["k_norm_scale"],
                 p["k_norm_bias"], cfg.norm_eps)
  r = ix.rope_dim
  if r:
    q = jnp.concatenate([rope.apply_half(q[..., :r], ang_BTR), q[..., r:]], -1)
    k = jnp.concatenate([rope.apply_half(k[..., :r], ang_BTR), k[..., r:]], -1)
  if ix.hadamard:
    had = jnp.asarray(hadamard(ix.head_dim), cdt)
    q, k = q @ had, k @ had
  if ix.fp8:
    q, k = fp8_roundtrip(q), fp8_roundtrip(k)
  w = h_BTD.astype(jnp.float32) @ p["weights_proj"].astype(jnp.float32)
  w = w * (ix.n_heads ** -0.5 * ix.head_dim ** -0.5)
  return q, k, w


# ------------------------------------------------------- losses and recall


def kl_divergence(p: jax.Array, logits: jax.Array, mask: jax.Array) -> jax.Array:
  """sum over the last axis of p (log p - log_softmax(logits)) on ``mask``."""
  logq = jax.nn.log_softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
  terms = jax.scipy.special.xlogy(p, p) - p * logq
  return jnp.sum(jnp.where(mask, terms, 0.0), axis=-1)


def _normalise(p: jax.Array) -> jax.Array:
  return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)


def recall_metrics(p_BTS: jax.Array, logits_BTS: jax.Array, mask_BTS: jax.Array,
                   q_index_T: jax.Array, topk: int) -> dict[str, jax.Array]:
  """Dense attention mass kept by the indexer's top-k, the oracle top-k and
  the local window of the k most recent keys; [B, T] each."""
  kk = min(topk, p_BTS.shape[-1])
  _, idx = jax.lax.top_k(jnp.where(mask_BTS, logits_BTS, -jnp.inf), kk)
  valid = jnp.take_along_axis(jnp.broadcast_to(mask_BTS, p_BTS.shape), idx, -1)
  selected = jnp.sum(jnp.take_along_axis(p_BTS, idx, -1) * valid, -1)
  oracle = jnp.sum(jax.lax.top_k(p_BTS, kk)[0], -1)
  k_index = jnp.arange(p_BTS.shape[-1])
  window = k_index[None, None, :] > q_index_T[None, :, None] - kk
  local = jnp.sum(jnp.where(window & mask_BTS, p_BTS, 0.0), -1)
  return {"recall": selected, "recall_oracle": oracle, "recall_local": local}


def dense_probe(topk: int, loss: bool, metrics: bool):
  """The chunk probe for ``mla.dense_attention``: the warm-up KL per token and
  optionally recall, from the chunk's probabilities, the indexer q and w of
  its queries and the indexer keys of its key prefix."""

  def probe(start, prob_BNTS, mask_BTS, q_BTIJ, w_BTI, k_BSJ):
    p = _normalise(jax.lax.stop_gradient(jnp.sum(prob_BNTS, axis=1)))
    logits = indexer_logits(q_BTIJ, k_BSJ, w_BTI)
    out = {}
    if loss:
      out["indexer_kl"] = kl_divergence(p, logits, mask_BTS)
    if metrics:
      q_index = start + jnp.arange(p.shape[1])
      out.update(recall_metrics(p, jax.lax.stop_gradient(logits), mask_BTS,
                                q_index, topk))
      # Queries that see at most k keys keep all their mass in any set.
      out["recall_weight"] = (jnp.sum(jnp.broadcast_to(mask_BTS, p.shape), -1)
                              > topk).astype(jnp.float32)
    return out

  return probe


def sparse_kl(q_BTND: jax.Array, kv_BSD: jax.Array, idx_BTK: jax.Array,
              valid_BTK: jax.Array, scale: float, iq_BTIJ: jax.Array,
              ik_BSJ: jax.Array, iw_BTI: jax.Array, q_chunk: int) -> jax.Array:
  """KL(p_t[S_t] || softmax(I_t[S_t])) per token, both renormalised on S_t;
  the main-model side (q, kv) is the detached target. [B, T]. ``kv`` is
  [B,S,D] (MLA rows shared by all heads) or GQA keys [B,S,G,H]."""
  q_BTND = jax.lax.stop_gradient(q_BTND)
  kv_BSD = jax.lax.stop_gradient(kv_BSD)

  def chunk_fn(start, q, idx, valid, iq, iw):
    del start
    s = sparse_scores(q, gather_rows(kv_BSD, idx), scale)
    s = jnp.where(valid[:, :, None, :], s, NEG_INF)
    p = _normalise(jnp.sum(jax.nn.softmax(s, axis=-1), axis=2))
    k_sel = gather_rows(ik_BSJ, idx)                          # B,t,K,J
    dots = jnp.einsum("btij,btkj->btik", iq, k_sel,
                      preferred_element_type=jnp.float32)
    logits = jnp.einsum("btik,bti->btk", jax.nn.relu(dots),
                        iw.astype(jnp.float32))
    return kl_divergence(p, logits, valid)

  return map_query_chunks(chunk_fn, q_chunk, q_BTND, idx_BTK, valid_BTK,
                          iq_BTIJ, iw_BTI)


# -------------------------------------------------------------- the layer


def _layer_means(per_token: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Means over query positions; recall only over queries that see more
  than k keys (1.0 when there are none)."""
  w = per_token.pop("recall_weight", None)
  out = {}
  for k, v in per_token.items():
    if k.startswith("recall") and w is not None:
      n = jnp.sum(w)
      out[k] = jnp.where(n > 0, jnp.sum(v * w) / jnp.maximum(n, 1.0), 1.0)
    else:
      out[k] = jnp.mean(v)
  return out


def make_layer_attend(cfg: ModelConfig, attention: str,
                      options: DSAOptions | None, positions_BT: jax.Array,
                      segment_ids_BT: jax.Array | None):
  """Builds ``for_layer(p_layer, h_BTD) -> attend`` for ``model.forward``.

  dense: dense MLA, plus the warm-up KL (and recall) from the same scores.
  sparse: indexer top-k, sparse MLA in MQA form, the sparse KL (and recall).
  GQA models (``cfg.attention_type``) take the same steps with dense / sparse
  GQA. Per-layer aux values are means over the B x T query positions.
  """
  options = options or DSAOptions()
  topk = options.topk or cfg.indexer.topk
  ang_i = indexer_angles(positions_BT, cfg)
  is_gqa = cfg.attention_type == "gqa"
  scale = gqa.softmax_scale(cfg) if is_gqa else mla.softmax_scale(cfg)
  chunk = cfg.indexer.q_chunk
  impl = options.impl or cfg.kernel_impl
  # Recall needs the probabilities: only the jnp path (a probe) has them.
  fused = kernels.resolve_impl(impl) != "reference" and not options.metrics

  def dense_fn(a, main):
    """The layer's dense attention, ``**kw`` as in mla/gqa.dense_attention."""
    if is_gqa:
      return lambda **kw: gqa.dense_attention(*main, cfg, segment_ids_BT, **kw)
    q_nope, q_rope, _, kv, k_rope = main
    return lambda **kw: mla.dense_attention(
        q_nope, q_rope, kv, k_rope, a["wkv_b"], cfg, segment_ids_BT, **kw)

  def sparse_fn(a, main, idx, valid):
    """(o, q, keys): the sparse output and the (q, keys) of ``sparse_kl``."""
    if is_gqa:
      q, k, v = main
      # GQA has no sparse kernel yet: the jnp reference on every backend.
      o, _ = sparse_gqa_reference(q, k, v, idx, valid, scale, chunk)
      return o, q, k
    q_nope, q_rope, _, kv, k_rope = main
    q_full = jnp.concatenate([mla.absorb_query(q_nope, a["wkv_b"], cfg),
                              q_rope], axis=-1)
    kv_full = jnp.concatenate([kv, k_rope.astype(kv.dtype)], axis=-1)
    o_lat, _ = kernels.sparse_mla(q_full, kv_full, idx, valid, scale,
                                  cfg.kv_lora_rank, q_chunk=chunk, impl=impl)
    return mla.expand_output(o_lat, a["wkv_b"], cfg), q_full, kv_full

  def for_layer(p, h_BTD):
    def attend(*main):
      a = p["attn"]
      cq = None if is_gqa else main[2]
      # The indexer learns only from its own loss: its inputs are detached.
      iq, ik, iw = indexer_project(
          p["indexer"], jax.lax.stop_gradient(h_BTD),
          None if cq is None else jax.lax.stop_gradient(cq), ang_i, cfg)
      aux: dict[str, Any] = {}
      if attention == "dense" and fused:
        # The flash kernel's warm-up KL: a second pass over key blocks.
        target = (iq, ik, iw) if options.indexer_loss else None
        out = dense_fn(a, main)(impl=impl, target=target)
        if target is None:
          return out, aux
        aux["indexer_kl"] = jnp.mean(out[1])
        return out[0], aux
      if attention == "dense":
        o, per_tok = dense_fn(a, main)(
            probe=dense_probe(topk, options.indexer_loss, options.metrics),
            probe_args=(iq, iw), probe_keys=(ik,))
        aux.update(_layer_means(per_tok))
        return o, aux
      # Per shard of the batch rows: XLA would otherwise all-gather each
      # chunk's scores over the batch and repeat the top-k on every device.
      idx, valid = sharding.batch_local(
          lambda q, k, w, seg: kernels.indexer_topk(
              q, k, w, topk, seg, q_chunk=chunk, impl=impl))(
                  iq, ik, iw, segment_ids_BT)
      o, q_kl, keys_kl = sparse_fn(a, main, idx, valid)
      if options.indexer_loss:
        aux["indexer_kl"] = jnp.mean(sparse_kl(q_kl, keys_kl, idx, valid,
                                               scale, iq, ik, iw, chunk))
      if options.metrics:
        _, per_tok = dense_fn(*jax.lax.stop_gradient((a, main)))(
            probe=dense_probe(topk, False, True), probe_args=(iq, iw),
            probe_keys=(ik,))
        aux.update(_layer_means(per_tok))
      if options.return_indices:
        aux["idx"], aux["valid"] = idx, valid
      if options.return_keys:
        aux["index_k"] = ik
      return o, aux

    return attend

  return for_layer
