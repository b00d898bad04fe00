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

from dsax import kernels, rope
from dsax.config import ModelConfig
from dsax.kernels.query_chunks import causal_segment_mask, map_causal_chunks
from dsax.kernels.reference import NEG_INF


def softmax_scale(cfg: ModelConfig) -> float:
  return cfg.head_dim ** -0.5 * rope.softmax_mscale(cfg.rope_scaling)


def gqa_angles(positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
  """RoPE angles [B, T, H/2] for q and k."""
  inv = rope.inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
  return rope.angles(positions_BT, inv)


def project_qkv(p: dict[str, Any], x_BTD: jax.Array, ang_BTR: jax.Array,
                cfg: ModelConfig):
  """Returns (q_BTNH, k_BTGH, v_BTGH), RoPE applied to q and k."""
  cdt = jnp.dtype(cfg.compute_dtype)
  x = x_BTD.astype(cdt)

  def proj(w, b):
    y = jnp.einsum("btd,dgh->btgh", x, p[w].astype(cdt))
    return y + p[b].astype(cdt) if cfg.qkv_bias else y

  q = rope.apply_half(proj("wq", "bq"), ang_BTR)
  k = rope.apply_half(proj("wk", "bk"), ang_BTR)
  return q, k, proj("wv", "bv")


def grouped(q_BTNH: jax.Array, n_kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [B, T, G, M, H]: query heads by the kv head they read."""
  b, t, n, h = q_BTNH.shape
  return q_BTNH.reshape(b, t, n_kv_heads, n // n_kv_heads, h)


def scores(q_BTNH: jax.Array, k_BSGH: jax.Array, scale: float) -> jax.Array:
  """s[b, n, t, s] = q[b, t, n] . k[b, s, n // M] * scale, f32 [B,N,T,S]."""
  b, t, n, _ = q_BTNH.shape
  s = jnp.einsum("btgmh,bsgh->bgmts", grouped(q_BTNH, k_BSGH.shape[2]),
                 k_BSGH.astype(q_BTNH.dtype),
                 preferred_element_type=jnp.float32) * scale
  return s.reshape(b, n, t, k_BSGH.shape[1])


def weighted_values(prob_BNTS: jax.Array, v_BSGH: jax.Array) -> jax.Array:
  """o[b, t, n] = sum_s prob[b, n, t, s] v[b, s, n // M], [B,T,N,H]."""
  b, n, t, s = prob_BNTS.shape
  g = v_BSGH.shape[2]
  p = prob_BNTS.reshape(b, g, n // g, t, s).astype(v_BSGH.dtype)
  o = jnp.einsum("bgmts,bsgh->btgmh", p, v_BSGH)
  return o.reshape(b, t, n, v_BSGH.shape[-1])


def masked_attention(q_BTNH: jax.Array, k_BSGH: jax.Array, v_BSGH: jax.Array,
                     mask_BTS: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Attention under an explicit key mask (the decode path). o_BTNH."""
  cdt = jnp.dtype(cfg.compute_dtype)
  s = scores(q_BTNH, k_BSGH.astype(cdt), softmax_scale(cfg))
  prob = jax.nn.softmax(jnp.where(mask_BTS[:, None], s, NEG_INF), axis=-1)
  return weighted_values(prob, v_BSGH.astype(cdt))


def dense_attention(q_BTNH: jax.Array, k_BSGH: jax.Array, v_BSGH: jax.Array,
                    cfg: ModelConfig, segment_ids_BT: jax.Array | None = None,
                    probe: Callable[..., Any] | None = None,
                    probe_args: tuple[jax.Array, ...] = (),
                    probe_keys: tuple[jax.Array, ...] = (), *,
                    impl: str | None = None, target: tuple | None = None):
  """Causal GQA over query chunks. Returns o_BTNH.

  The arguments after ``segment_ids_BT`` mean what they mean in
  ``mla.dense_attention``: a ``probe`` sees each chunk's probabilities
  [B, N, chunk, S] (the DSA warm-up target) and the result is then
  ``(o_BTNH, probe_out)``; ``impl`` "pallas" (or "auto" off CPU) without a
  probe runs ``kernels.mla_flash`` with k and v repeated to N heads, and
  ``target = (q_I, k_I, w_I)`` asks it for the fused warm-up KL (result
  ``(o_BTNH, kl_BT)``).
  """
  cdt = jnp.dtype(cfg.compute_dtype)
  q, k, v = q_BTNH.astype(cdt), k_BSGH.astype(cdt), v_BSGH.astype(cdt)
  scale = softmax_scale(cfg)
  if probe is None and kernels.resolve_impl(impl or cfg.kernel_impl) != (
      "reference"):
    m = cfg.n_heads // cfg.n_kv_heads
    out = kernels.mla_flash(q, jnp.repeat(k, m, axis=2),
                            jnp.repeat(v, m, axis=2), scale, segment_ids_BT,
                            target=target, q_chunk=cfg.attn_q_chunk,
                            impl="pallas")
    return out[0] if target is None else (out[0], out[2])
  if target is not None:
    raise ValueError("gqa.dense_attention: target (the fused warm-up KL) "
                     "needs the kernel path (impl pallas or auto off CPU, "
                     "no probe)")
  b, s_len = k.shape[:2]
  seg_BT = (jnp.zeros((b, s_len), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  n_args = len(probe_args)

  def chunk_fn(start, q_c, seg, *rest):
    pargs, (k_c, v_c, seg_k, *pkeys) = rest[:n_args], rest[n_args:]
    mask = causal_segment_mask(start + jnp.arange(q_c.shape[1]),
                               jnp.arange(k_c.shape[1]), seg, seg_k)
    s = jnp.where(mask[:, None], scores(q_c, k_c, scale), NEG_INF)
    prob = jax.nn.softmax(s, axis=-1)
    o = weighted_values(prob, v_c)
    if probe is None:
      return o
    return o, probe(start, prob, mask, *pargs, *pkeys)

  return map_causal_chunks(chunk_fn, cfg.attn_q_chunk,
                           (q, seg_BT) + tuple(probe_args),
                           (k, v, seg_BT) + tuple(probe_keys))
