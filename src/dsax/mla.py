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
from dsax.config import ModelConfig
from dsax.kernels.query_chunks import causal_segment_mask, map_causal_chunks

NEG_INF = -1e30


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def softmax_scale(cfg: ModelConfig) -> float:
  return cfg.qk_head_dim ** -0.5 * rope.softmax_mscale(cfg.rope_scaling)


def mla_angles(positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
  inv = rope.inv_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta,
                             cfg.rope_scaling)
  return rope.angles(positions_BT, inv)


def project_q(p: dict[str, Any], x_BTD: jax.Array, ang_BTR: jax.Array,
              cfg: ModelConfig):
  """Returns (q_nope_BTNH, q_rope_BTNR, cq_BTQ); cq is the normalised q-latent
  (None without one) that the indexer reads."""
  cdt = jnp.dtype(cfg.compute_dtype)
  x = x_BTD.astype(cdt)
  if cfg.q_lora_rank:
    cq_BTQ = rms_norm(x @ p["wq_a"].astype(cdt), p["q_norm"], cfg.norm_eps)
    q_BTNK = jnp.einsum("btq,qnk->btnk", cq_BTQ, p["wq_b"].astype(cdt))
  else:
    cq_BTQ = None
    q_BTNK = jnp.einsum("btd,dnk->btnk", x, p["wq"].astype(cdt))
  q_nope = q_BTNK[..., :cfg.qk_nope_head_dim]
  q_rope = rope.apply_interleaved(q_BTNK[..., cfg.qk_nope_head_dim:], ang_BTR)
  return q_nope, q_rope, cq_BTQ


def project_kv(p: dict[str, Any], x_BTD: jax.Array, ang_BTR: jax.Array,
               cfg: ModelConfig):
  """Returns (kv_BSC, k_rope_BSR): exactly what the latent cache holds."""
  cdt = jnp.dtype(cfg.compute_dtype)
  kva = x_BTD.astype(cdt) @ p["wkv_a"].astype(cdt)
  kv_BSC = rms_norm(kva[..., :cfg.kv_lora_rank], p["kv_norm"], cfg.norm_eps)
  k_rope_BSR = rope.apply_interleaved(kva[..., cfg.kv_lora_rank:], ang_BTR)
  return kv_BSC, k_rope_BSR


def dense_attention(q_nope_BTNH: jax.Array, q_rope_BTNR: jax.Array,
                    kv_BSC: jax.Array, k_rope_BSR: jax.Array,
                    wkv_b_CNK: jax.Array, cfg: ModelConfig,
                    segment_ids_BT: jax.Array | None = None,
                    probe: Callable[..., Any] | None = None,
                    probe_args: tuple[jax.Array, ...] = (),
                    probe_keys: tuple[jax.Array, ...] = (), *,
                    impl: str | None = None, target: tuple | None = None):
  """Causal expanded-form MLA over query chunks. Returns o_BTNE.

  ``impl`` (None: cfg.kernel_impl) "pallas" (or "auto" off CPU) runs the
  kernels.mla_flash kernel instead, unless a probe is given (a probe needs the
  probabilities, which the kernel never forms). There ``target = (q_I_BTIJ,
  k_I_BSJ, w_BTI)`` asks the kernel for the fused DSA warm-up KL, and the
  result is ``(o_BTNE, kl_BT)``.

  Query chunk [s0, s1) is scored only against keys [0, s1) (the rest are in
  its future). ``probe(start, prob_BNTS, mask_BTS, *probe_arg_chunks,
  *probe_key_prefixes)`` sees each chunk's attention probabilities (the DSA
  warm-up target is computed there, so the scores are formed once) and returns
  a tree of [B, chunk, ...] arrays; with a probe the result is
  ``(o_BTNE, probe_out)``. ``probe_args`` are per query [B,T,...],
  ``probe_keys`` per key [B,S,...].
  """
  cdt = jnp.dtype(cfg.compute_dtype)
  h = cfg.qk_nope_head_dim
  kvb = jnp.einsum("bsc,cnk->bsnk", kv_BSC.astype(cdt), wkv_b_CNK.astype(cdt))
  k_nope_BSNH, v_BSNE = kvb[..., :h], kvb[..., h:]
  scale = softmax_scale(cfg)
  if probe is None and kernels.resolve_impl(impl or cfg.kernel_impl) != (
      "reference"):
    # The kernel takes one qk dim K = H + R: the shared rope key per head.
    k_rope = jnp.broadcast_to(k_rope_BSR.astype(cdt)[:, :, None],
                              k_nope_BSNH.shape[:3] + k_rope_BSR.shape[-1:])
    out = kernels.mla_flash(
        jnp.concatenate([q_nope_BTNH.astype(cdt), q_rope_BTNR.astype(cdt)],
                        -1), jnp.concatenate([k_nope_BSNH, k_rope], -1),
        v_BSNE, scale, segment_ids_BT, target=target,
        q_chunk=cfg.attn_q_chunk, impl="pallas")
    return out[0] if target is None else (out[0], out[2])
  if target is not None:
    raise ValueError("dense_attention: target (the fused warm-up KL) needs "
                     "the kernel path (impl pallas or auto off CPU, no probe)")
  b, s_len = kv_BSC.shape[:2]
  seg_BT = (jnp.zeros((b, s_len), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  n_args = len(probe_args)

  def chunk_fn(start, qn, qr, seg, *rest):
    pargs, (k_nope, v, k_rope, seg_k, *pkeys) = rest[:n_args], rest[n_args:]
    tq, sk = qn.shape[1], k_nope.shape[1]
    s = (jnp.einsum("btnh,bsnh->bnts", qn, k_nope,
                    preferred_element_type=jnp.float32)
         + jnp.einsum("btnr,bsr->bnts", qr, k_rope.astype(cdt),
                      preferred_element_type=jnp.float32)) * scale
    mask = causal_segment_mask(start + jnp.arange(tq), jnp.arange(sk), seg,
                               seg_k)
    s = jnp.where(mask[:, None], s, NEG_INF)
    prob = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bnts,bsne->btne", prob.astype(cdt), v)
    if probe is None:
      return o
    return o, probe(start, prob, mask, *pargs, *pkeys)

  return map_causal_chunks(
      chunk_fn, cfg.attn_q_chunk, (q_nope_BTNH, q_rope_BTNR, seg_BT)
      + tuple(probe_args),
      (k_nope_BSNH, v_BSNE, k_rope_BSR, seg_BT) + tuple(probe_keys))


def absorb_query(q_nope_BTNH: jax.Array, wkv_b_CNK: jax.Array,
                 cfg: ModelConfig) -> jax.Array:
  """q_abs[n] = q_nope[n] W_kvb[:, n, :H]^T, shape [B,T,N,C]."""
  w = wkv_b_CNK[..., :cfg.qk_nope_head_dim].astype(q_nope_BTNH.dtype)
  return jnp.einsum("btnh,cnh->btnc", q_nope_BTNH, w)


def expand_output(o_BTNC: jax.Array, wkv_b_CNK: jax.Array,
                  cfg: ModelConfig) -> jax.Array:
  """o[n] = o_latent[n] W_kvb[:, n, H:], shape [B,T,N,E]."""
  w = wkv_b_CNK[..., cfg.qk_nope_head_dim:].astype(o_BTNC.dtype)
  return jnp.einsum("btnc,cne->btne", o_BTNC, w)


def absorbed_attention(q_nope_BTNH: jax.Array, q_rope_BTNR: jax.Array,
                       kv_BSC: jax.Array, k_rope_BSR: jax.Array,
                       wkv_b_CNK: jax.Array, mask_BTS: jax.Array,
                       cfg: ModelConfig) -> jax.Array:
  """MQA-form attention against latent rows (the decode path). o_BTNE."""
  cdt = jnp.dtype(cfg.compute_dtype)
  q_abs = absorb_query(q_nope_BTNH, wkv_b_CNK, cfg)
  s = (jnp.einsum("btnc,bsc->bnts", q_abs, kv_BSC.astype(cdt),
                  preferred_element_type=jnp.float32)
       + jnp.einsum("btnr,bsr->bnts", q_rope_BTNR, k_rope_BSR.astype(cdt),
                    preferred_element_type=jnp.float32)) * softmax_scale(cfg)
  s = jnp.where(mask_BTS[:, None], s, NEG_INF)
  prob = jax.nn.softmax(s, axis=-1)
  o_BTNC = jnp.einsum("bnts,bsc->btnc", prob.astype(cdt), kv_BSC.astype(cdt))
  return expand_output(o_BTNC, wkv_b_CNK, cfg)


def output_projection(o_BTNE: jax.Array, wo_NED: jax.Array) -> jax.Array:
  return jnp.einsum("btne,ned->btd", o_BTNE, wo_NED.astype(o_BTNE.dtype))
