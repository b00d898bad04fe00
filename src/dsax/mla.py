"""Multi-head latent attention (DeepSeek-V2/V3), pure functions.

Projections (per token, x in R^D):
  c_q   = RMSNorm(x W_qa)                         (rank Q; or q = x W_q if Q = 0)
  q     = c_q W_qb = [q_nope (H) ; q_rope (R)] per head, RoPE (interleaved) on q_rope
  [c_kv ; k_rope] = x W_kva,  c_kv <- RMSNorm(c_kv),  k_rope <- RoPE(k_rope)
  [k_nope ; v] = c_kv W_kvb per head (H + E)

Expanded ("MHA") form, used for training and prefill:
  s[n,t,s] = (q_nope . k_nope + q_rope . k_rope) * scale, o = softmax(s) v
Absorbed ("MQA") form, used for decode and sparse attention:
  q_abs[n] = q_nope[n] W_kvb[:, n, :H]^T   (in R^C)
  s[n,t,s] = (q_abs . c_kv + q_rope . k_rope) * scale
  o[n] = (softmax(s) c_kv) W_kvb[:, n, H:]
The two are equal; only [c_kv ; k_rope] (C + R per token) is cached.
scale = (H + R)**-0.5 * mscale**2 in both forms.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dsax import kernels, rope
from dsax.attention import Projections
from dsax.config import ModelConfig
from dsax.kernels import causal_blocks
from dsax.kernels.query_chunks import causal_segment_mask, map_causal_chunks
from dsax.kernels.reference import NEG_INF


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * jax.lax.broadcast_to_rank(scale.astype(jnp.float32), y.ndim)
          ).astype(x.dtype)


def softmax_scale(cfg: ModelConfig) -> float:
  return cfg.qk_head_dim ** -0.5 * rope.softmax_mscale(cfg.rope_scaling)


def angles(positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
  """RoPE angles [B, T, R/2] of q_rope and k_rope."""
  inv = rope.inv_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta,
                             cfg.rope_scaling)
  return rope.angles(positions_BT, inv)


def project(p: dict[str, Any], x_BTD: jax.Array, ang_BTR: jax.Array,
            cfg: ModelConfig) -> Projections:
  """q (nope and rope parts), the normalised q-latent the indexer reads
  (None without one), and the latent rows [c_kv ; k_rope] the cache holds."""
  cdt = jnp.dtype(cfg.compute_dtype)
  x_BTD = x_BTD.astype(cdt)
  if cfg.q_lora_rank:
    cq_BTQ = rms_norm(x_BTD @ p["wq_a"].astype(cdt), p["q_norm"], cfg.norm_eps)
    q_BTNP = jnp.einsum("btq,qnp->btnp", cq_BTQ, p["wq_b"].astype(cdt))
  else:
    cq_BTQ = None
    q_BTNP = jnp.einsum("btd,dnp->btnp", x_BTD, p["wq"].astype(cdt))
  h = cfg.qk_nope_head_dim
  q_rope_BTNR = rope.apply_interleaved(q_BTNP[..., h:], ang_BTR)
  kva_BTA = x_BTD @ p["wkv_a"].astype(cdt)
  kv_BTC = rms_norm(kva_BTA[..., :cfg.kv_lora_rank], p["kv_norm"],
                    cfg.norm_eps)
  k_rope_BTR = rope.apply_interleaved(kva_BTA[..., cfg.kv_lora_rank:],
                                      ang_BTR)
  return Projections(q=q_BTNP[..., :h], rows=(kv_BTC, k_rope_BTR),
                     q_rope=q_rope_BTNR, cq=cq_BTQ)


def expanded_keys(p: dict[str, Any], kv_BSC: jax.Array,
                  cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(k_nope_BSNH, v_BSNE) = c_kv W_kvb per head (W_kvb is [C, N, H + E])."""
  cdt = jnp.dtype(cfg.compute_dtype)
  h = cfg.qk_nope_head_dim
  kv_BSC = kv_BSC.astype(cdt)
  w = p["wkv_b"].astype(cdt)
  return (jnp.einsum("bsc,cnh->bsnh", kv_BSC, w[..., :h]),
          jnp.einsum("bsc,cne->bsne", kv_BSC, w[..., h:]))


def flash_inputs(p: dict[str, Any], proj: Projections, cfg: ModelConfig):
  """(q_BTNP, k_BSNP, v_BSNE) of the expanded form, P = H + R, for the
  flash kernel (the shared rope key repeated per head)."""
  cdt = jnp.dtype(cfg.compute_dtype)
  kv_BSC, k_rope_BSR = proj.rows
  k_nope_BSNH, v_BSNE = expanded_keys(p, kv_BSC, cfg)
  k_rope_BSNR = jnp.broadcast_to(
      k_rope_BSR.astype(cdt)[:, :, None],
      k_nope_BSNH.shape[:3] + k_rope_BSR.shape[-1:])
  q_BTNP = jnp.concatenate([proj.q.astype(cdt), proj.q_rope.astype(cdt)], -1)
  return q_BTNP, jnp.concatenate([k_nope_BSNH, k_rope_BSNR], -1), v_BSNE


def score_inputs(p: dict[str, Any], proj: Projections, cfg: ModelConfig):
  """The expanded form as ``kernels.causal_blocks`` score parts:
  ((q_nope_BTNH, q_rope_BTNR), (k_nope_BSNH, k_rope_BSGR), v_BSNE) with
  k_nope per head (G = N) and the shared rope key as one kv head (G = 1),
  never repeated per head: s = (q_nope . k_nope + q_rope . k_rope) * scale."""
  cdt = jnp.dtype(cfg.compute_dtype)
  kv_BSC, k_rope_BSR = proj.rows
  k_nope_BSNH, v_BSNE = expanded_keys(p, kv_BSC, cfg)
  return ((proj.q.astype(cdt), proj.q_rope.astype(cdt)),
          (k_nope_BSNH, k_rope_BSR.astype(cdt)[:, :, None]), v_BSNE)


def dense_attention(p: dict[str, Any], proj: Projections, cfg: ModelConfig,
                    segment_ids_BT: jax.Array | None = None,
                    probe: Callable[..., Any] | None = None,
                    probe_rows: tuple[jax.Array, ...] = (),
                    probe_keys: tuple[jax.Array, ...] = ()):
  """Causal expanded-form MLA (jnp). Returns ``(o_BTNE, probe_out)``;
  probe_out is None without a probe.

  Without a probe: flash attention over the lower-triangle blocks of
  ``cfg.attn_q_chunk`` rows (``causal_blocks.attention`` on
  ``score_inputs``): only the key blocks at or below the diagonal are
  scored, memory O(T), a custom flash-attention-2 backward.
  With a probe (recall, which takes a top-k over each query's whole row):
  query chunks of ``cfg.attn_q_chunk``, each scored against a causal key
  prefix (``map_causal_chunks``); ``probe(start, prob_BNTS, mask_BTS,
  *probe_row_chunks, *probe_key_prefixes)`` sees each chunk's attention
  probabilities and returns a tree of [B, chunk, ...] arrays.
  ``probe_rows`` are per query [B,T,...], ``probe_keys`` per key [B,S,...].
  """
  if probe is None:
    o_BTNE, _ = causal_blocks.attention(
        *score_inputs(p, proj, cfg), softmax_scale(cfg), segment_ids_BT,
        block=cfg.attn_q_chunk)
    return o_BTNE, None
  cdt = jnp.dtype(cfg.compute_dtype)
  kv_BSC, k_rope_BSR = proj.rows
  k_nope_BSNH, v_BSNE = expanded_keys(p, kv_BSC, cfg)
  scale = softmax_scale(cfg)
  b, s_len = kv_BSC.shape[:2]
  seg_BT = (jnp.zeros((b, s_len), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  n_rows = len(probe_rows)

  def chunk_fn(start, q_nope_BTNH, q_rope_BTNR, seg_q_BT, *rest):
    prows, (k_nope_BSNH, v_BSNE, k_rope_BSR, seg_k_BS, *pkeys) = (
        rest[:n_rows], rest[n_rows:])
    s_BNTS = (jnp.einsum("btnh,bsnh->bnts", q_nope_BTNH, k_nope_BSNH,
                         preferred_element_type=jnp.float32)
              + jnp.einsum("btnr,bsr->bnts", q_rope_BTNR,
                           k_rope_BSR.astype(cdt),
                           preferred_element_type=jnp.float32)) * scale
    mask_BTS = causal_segment_mask(
        start + jnp.arange(q_nope_BTNH.shape[1]),
        jnp.arange(k_nope_BSNH.shape[1]), seg_q_BT, seg_k_BS)
    s_BNTS = jnp.where(mask_BTS[:, None], s_BNTS, NEG_INF)
    prob_BNTS = jax.nn.softmax(s_BNTS, axis=-1)
    o_BTNE = jnp.einsum("bnts,bsne->btne", prob_BNTS.astype(cdt), v_BSNE)
    return o_BTNE, probe(start, prob_BNTS, mask_BTS, *prows, *pkeys)

  return map_causal_chunks(
      chunk_fn, cfg.attn_q_chunk,
      (proj.q.astype(cdt), proj.q_rope.astype(cdt), seg_BT) + tuple(probe_rows),
      (k_nope_BSNH, v_BSNE, k_rope_BSR, seg_BT) + tuple(probe_keys))


def absorb_query(q_nope_BTNH: jax.Array, wkv_b: jax.Array,
                 cfg: ModelConfig) -> jax.Array:
  """q_abs[n] = q_nope[n] W_kvb[:, n, :H]^T, shape [B,T,N,C]."""
  w_CNH = wkv_b[..., :cfg.qk_nope_head_dim].astype(q_nope_BTNH.dtype)
  return jnp.einsum("btnh,cnh->btnc", q_nope_BTNH, w_CNH)


def expand_output(o_BTNC: jax.Array, wkv_b: jax.Array,
                  cfg: ModelConfig) -> jax.Array:
  """o[n] = o_latent[n] W_kvb[:, n, H:], shape [B,T,N,E]."""
  w_CNE = wkv_b[..., cfg.qk_nope_head_dim:].astype(o_BTNC.dtype)
  return jnp.einsum("btnc,cne->btne", o_BTNC, w_CNE)


def absorbed_inputs(p: dict[str, Any], proj: Projections,
                    rows: tuple[jax.Array, jax.Array], cfg: ModelConfig):
  """(q_BTNA, row_BSA), A = C + R: the absorbed queries [q_abs ; q_rope]
  and latent rows [c_kv ; k_rope] that sparse attention scores."""
  kv_BSC, k_rope_BSR = rows
  q_BTNA = jnp.concatenate(
      [absorb_query(proj.q, p["wkv_b"], cfg), proj.q_rope], axis=-1)
  row_BSA = jnp.concatenate([kv_BSC, k_rope_BSR.astype(kv_BSC.dtype)], -1)
  return q_BTNA, row_BSA


def sparse_attention(p: dict[str, Any], proj: Projections,
                     rows: tuple[jax.Array, jax.Array], idx_BTK: jax.Array,
                     valid_BTK: jax.Array, cfg: ModelConfig, impl: str):
  """Attention of each query to its selected latent rows in absorbed (MQA)
  form (kernels.sparse_mla), softmax scale unchanged. ``rows``: the layer's
  own (kv, k_rope) in a forward, the cache in a decode step. Returns
  ``(o_BTNE, (q_BTNA, row_BSA))``: the output and the main-model side that
  the sparse indexer KL scores."""
  q_BTNA, row_BSA = absorbed_inputs(p, proj, rows, cfg)
  o_BTNC, _ = kernels.sparse_mla(q_BTNA, row_BSA, idx_BTK, valid_BTK,
                                 softmax_scale(cfg), cfg.kv_lora_rank,
                                 q_chunk=cfg.indexer.q_chunk, impl=impl)
  return expand_output(o_BTNC, p["wkv_b"], cfg), (q_BTNA, row_BSA)


def masked_attention(p: dict[str, Any], proj: Projections,
                     rows: tuple[jax.Array, jax.Array], mask_BTS: jax.Array,
                     cfg: ModelConfig) -> jax.Array:
  """Absorbed (MQA) attention of the queries to every row under an explicit
  key mask (a dense decode step against the latent cache). o_BTNE."""
  cdt = jnp.dtype(cfg.compute_dtype)
  kv_BSC, k_rope_BSR = (r.astype(cdt) for r in rows)
  q_abs_BTNC = absorb_query(proj.q, p["wkv_b"], cfg)
  s_BNTS = (jnp.einsum("btnc,bsc->bnts", q_abs_BTNC, kv_BSC,
                       preferred_element_type=jnp.float32)
            + jnp.einsum("btnr,bsr->bnts", proj.q_rope, k_rope_BSR,
                         preferred_element_type=jnp.float32)
            ) * softmax_scale(cfg)
  s_BNTS = jnp.where(mask_BTS[:, None], s_BNTS, NEG_INF)
  prob_BNTS = jax.nn.softmax(s_BNTS, axis=-1)
  o_BTNC = jnp.einsum("bnts,bsc->btnc", prob_BNTS.astype(cdt), kv_BSC)
  return expand_output(o_BTNC, p["wkv_b"], cfg)


def output_projection(o_BTNE: jax.Array, wo_NED: jax.Array) -> jax.Array:
  return jnp.einsum("btne,ned->btd", o_BTNE, wo_NED.astype(o_BTNE.dtype))
