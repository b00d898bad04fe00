"""Grouped-query attention (Llama / Qwen2 / SmolLM family), pure functions.

N query heads share G kv heads (M = N / G query heads per group), head dim H.
Projections per token x in R^D (the biases only with ``qkv_bias``, Qwen2):
  q[n] = x W_q[:, n] + b_q[n],  k[g] = x W_k[:, g] + b_k[g],
  v[g] = x W_v[:, g] + b_v[g]
RoPE rotates q and k over the whole head dim in half-split pairs
(x[i], x[i + H/2]): HF Llama's ``rotate_half``.
Query head n reads kv head g(n) = n // M (HF ``repeat_kv`` order):
  s[n, t, s] = q[t, n] . k[s, g(n)] * scale,   o[t, n] = sum_s softmax_s(s) v[s, g(n)]
  scale = H**-0.5 (* mscale**2 with YaRN enabled), causal and within a segment.
A decode cache holds k and v: 2 G H numbers per token and layer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dsax import rope
from dsax.attention import Projections
from dsax.config import ModelConfig
from dsax.kernels import causal_blocks
from dsax.kernels.query_chunks import causal_segment_mask, map_causal_chunks
from dsax.kernels.reference import NEG_INF, sparse_gqa_reference


def softmax_scale(cfg: ModelConfig) -> float:
  return cfg.head_dim ** -0.5 * rope.softmax_mscale(cfg.rope_scaling)


def angles(positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
  """RoPE angles [B, T, H/2] for q and k."""
  inv = rope.inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
  return rope.angles(positions_BT, inv)


def project(p: dict[str, Any], x_BTD: jax.Array, ang_BTR: jax.Array,
            cfg: ModelConfig) -> Projections:
  """q_BTNH and the rows (k_BTGH, v_BTGH), RoPE applied to q and k."""
  cdt = jnp.dtype(cfg.compute_dtype)
  x_BTD = x_BTD.astype(cdt)

  def proj(w, b):
    y_BTGH = jnp.einsum("btd,dgh->btgh", x_BTD, p[w].astype(cdt))
    if not cfg.qkv_bias:
      return y_BTGH
    return y_BTGH + jax.lax.broadcast_to_rank(p[b].astype(cdt), y_BTGH.ndim)

  q_BTNH = rope.apply_half(proj("wq", "bq"), ang_BTR)
  k_BTGH = rope.apply_half(proj("wk", "bk"), ang_BTR)
  return Projections(q=q_BTNH, rows=(k_BTGH, proj("wv", "bv")))


def grouped(q_BTNH: jax.Array, n_kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [B, T, G, M, H]: query heads by the kv head they read."""
  b, t, n, h = q_BTNH.shape
  return q_BTNH.reshape(b, t, n_kv_heads, n // n_kv_heads, h)


def scores(q_BTNH: jax.Array, k_BSGH: jax.Array, scale: float) -> jax.Array:
  """s[b, n, t, s] = q[b, t, n] . k[b, s, n // M] * scale, f32 [B,N,T,S]."""
  b, t, n, _ = q_BTNH.shape
  s_BGMTS = jnp.einsum("btgmh,bsgh->bgmts", grouped(q_BTNH, k_BSGH.shape[2]),
                       k_BSGH.astype(q_BTNH.dtype),
                       preferred_element_type=jnp.float32) * scale
  return s_BGMTS.reshape(b, n, t, k_BSGH.shape[1])


def weighted_values(prob_BNTS: jax.Array, v_BSGH: jax.Array) -> jax.Array:
  """o[b, t, n] = sum_s prob[b, n, t, s] v[b, s, n // M], [B,T,N,H]."""
  b, n, t, s = prob_BNTS.shape
  g = v_BSGH.shape[2]
  p_BGMTS = prob_BNTS.reshape(b, g, n // g, t, s).astype(v_BSGH.dtype)
  o_BTGMH = jnp.einsum("bgmts,bsgh->btgmh", p_BGMTS, v_BSGH)
  return o_BTGMH.reshape(b, t, n, v_BSGH.shape[-1])


def masked_attention(p: dict[str, Any], proj: Projections,
                     rows: tuple[jax.Array, jax.Array], mask_BTS: jax.Array,
                     cfg: ModelConfig) -> jax.Array:
  """Attention to every cached row under an explicit key mask (a dense
  decode step). o_BTNH."""
  del p
  cdt = jnp.dtype(cfg.compute_dtype)
  k_BSGH, v_BSGH = (r.astype(cdt) for r in rows)
  s_BNTS = scores(proj.q.astype(cdt), k_BSGH, softmax_scale(cfg))
  prob_BNTS = jax.nn.softmax(jnp.where(mask_BTS[:, None], s_BNTS, NEG_INF),
                             axis=-1)
  return weighted_values(prob_BNTS, v_BSGH)


def flash_inputs(p: dict[str, Any], proj: Projections, cfg: ModelConfig):
  """(q_BTNH, k_BSNH, v_BSNH): k and v repeated to the N query heads, for
  the flash kernel (whose qk head dim P is H here)."""
  del p
  cdt = jnp.dtype(cfg.compute_dtype)
  m = cfg.n_heads // cfg.n_kv_heads
  k_BSGH, v_BSGH = proj.rows
  return (proj.q.astype(cdt), jnp.repeat(k_BSGH.astype(cdt), m, axis=2),
          jnp.repeat(v_BSGH.astype(cdt), m, axis=2))


def score_inputs(p: dict[str, Any], proj: Projections, cfg: ModelConfig):
  """``kernels.causal_blocks`` score parts: ((q_BTNH,), (k_BSGH,), v_BSGH),
  query head n reading kv head n // M (nothing repeated per head)."""
  del p
  cdt = jnp.dtype(cfg.compute_dtype)
  k_BSGH, v_BSGH = (r.astype(cdt) for r in proj.rows)
  return (proj.q.astype(cdt),), (k_BSGH,), v_BSGH


def dense_attention(p: dict[str, Any], proj: Projections, cfg: ModelConfig,
                    segment_ids_BT: jax.Array | None = None,
                    probe: Callable[..., Any] | None = None,
                    probe_rows: tuple[jax.Array, ...] = (),
                    probe_keys: tuple[jax.Array, ...] = ()):
  """Causal GQA (jnp). Returns ``(o_BTNH, probe_out)``; without a probe
  flash attention over the lower-triangle blocks (``causal_blocks``), with
  one query chunks as in ``mla.dense_attention`` (the probe sees each
  chunk's probabilities [B, N, chunk, S])."""
  if probe is None:
    o_BTNH, _ = causal_blocks.attention(
        *score_inputs(p, proj, cfg), softmax_scale(cfg), segment_ids_BT,
        block=cfg.attn_q_chunk)
    return o_BTNH, None
  del p
  cdt = jnp.dtype(cfg.compute_dtype)
  k_BSGH, v_BSGH = (r.astype(cdt) for r in proj.rows)
  scale = softmax_scale(cfg)
  b, s_len = k_BSGH.shape[:2]
  seg_BT = (jnp.zeros((b, s_len), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  n_rows = len(probe_rows)

  def chunk_fn(start, q_BTNH, seg_q_BT, *rest):
    prows, (k_BSGH, v_BSGH, seg_k_BS, *pkeys) = rest[:n_rows], rest[n_rows:]
    mask_BTS = causal_segment_mask(start + jnp.arange(q_BTNH.shape[1]),
                                   jnp.arange(k_BSGH.shape[1]), seg_q_BT,
                                   seg_k_BS)
    s_BNTS = jnp.where(mask_BTS[:, None], scores(q_BTNH, k_BSGH, scale),
                       NEG_INF)
    prob_BNTS = jax.nn.softmax(s_BNTS, axis=-1)
    o_BTNH = weighted_values(prob_BNTS, v_BSGH)
    return o_BTNH, probe(start, prob_BNTS, mask_BTS, *prows, *pkeys)

  return map_causal_chunks(chunk_fn, cfg.attn_q_chunk,
                           (proj.q.astype(cdt), seg_BT) + tuple(probe_rows),
                           (k_BSGH, v_BSGH, seg_BT) + tuple(probe_keys))


def absorbed_inputs(p: dict[str, Any], proj: Projections,
                    rows: tuple[jax.Array, jax.Array], cfg: ModelConfig):
  """(q_BTNH, k_BSGH): the main-model side of the sparse indexer KL (the
  name matches ``mla.absorbed_inputs``; GQA absorbs nothing)."""
  del p, cfg
  return proj.q, rows[0]


def sparse_attention(p: dict[str, Any], proj: Projections,
                     rows: tuple[jax.Array, jax.Array], idx_BTK: jax.Array,
                     valid_BTK: jax.Array, cfg: ModelConfig, impl: str):
  """Each query head attends to the selected rows of its kv head (the jnp
  reference on every backend: GQA has no sparse kernel yet). ``rows``: the
  layer's own (k, v), or the cache in a decode step. Returns ``(o_BTNH,
  (q_BTNH, k_BSGH))``: the output and the main-model side of the sparse
  indexer KL."""
  del p, impl
  k_BSGH, v_BSGH = rows
  o_BTNH, _ = sparse_gqa_reference(proj.q, k_BSGH, v_BSGH, idx_BTK, valid_BTK,
                                   softmax_scale(cfg), cfg.indexer.q_chunk)
  return o_BTNH, (proj.q, k_BSGH)
