"""Latent-cache decoding: prefill, one-token steps in absorbed form, sampling.

The cache holds only ``[c_kv ; k_rope]`` per token and layer: C + R numbers,
against 2 * N * (H + R) (or N * (H + R + E)) for an expanded KV cache.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dsax import mla, model
from dsax.config import ModelConfig


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict[str, Any]:
  dt = jnp.dtype(cfg.compute_dtype)
  return {
      "kv": jnp.zeros((cfg.n_layers, batch, max_len, cfg.kv_lora_rank), dt),
      "k_rope": jnp.zeros((cfg.n_layers, batch, max_len, cfg.qk_rope_head_dim),
                          dt),
      "length": jnp.zeros((), jnp.int32),
  }


def prefill(params: dict[str, Any], tokens_BT: jax.Array, cfg: ModelConfig,
            max_len: int):
  """Runs the expanded forward on a prompt; returns (logits_BTV, cache)."""
  b, t = tokens_BT.shape
  if t > max_len:
    raise ValueError(f"prompt length {t} exceeds max_len {max_len}")
  logits, aux = model.forward(params, tokens_BT, cfg, return_cache=True)
  pad = [(0, 0), (0, 0), (0, max_len - t), (0, 0)]
  cache = {"kv": jnp.pad(aux["kv"], pad), "k_rope": jnp.pad(aux["k_rope"], pad),
           "length": jnp.int32(t)}
  return logits, cache


def decode_step(params: dict[str, Any], cache: dict[str, Any],
                tokens_B: jax.Array, cfg: ModelConfig):
  """Appends one token per row at position ``cache['length']``; returns
  (logits_BV, new cache). Attention is the absorbed (MQA) form."""
  pos = cache["length"]
  b = tokens_B.shape[0]
  max_len = cache["kv"].shape[2]
  x = model.embed(params, tokens_B[:, None], cfg)
  ang = mla.mla_angles(jnp.full((b, 1), pos, jnp.int32), cfg)
  mask_B1S = jnp.broadcast_to((jnp.arange(max_len) <= pos)[None, None],
                              (b, 1, max_len))
  cdt = jnp.dtype(cfg.compute_dtype)

  def layer(x, xs):
    p, kv_l, kr_l = xs
    a = p["attn"]
    h = mla.rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q_nope, q_rope, _ = mla.project_q(a, h, ang, cfg)
    kv_new, kr_new = mla.project_kv(a, h, ang, cfg)
    kv_l = jax.lax.dynamic_update_slice(kv_l, kv_new.astype(kv_l.dtype),
                                        (0, pos, 0))
    kr_l = jax.lax.dynamic_update_slice(kr_l, kr_new.astype(kr_l.dtype),
                                        (0, pos, 0))
    o = mla.absorbed_attention(q_nope, q_rope, kv_l, kr_l, a["wkv_b"],
                               mask_B1S, cfg)
    x = x + mla.output_projection(o, a["wo"]).astype(x.dtype)
    h = mla.rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    x = x + model.swiglu(p["mlp"], h, cdt).astype(x.dtype)
    return x, (kv_l, kr_l)

  x, (kv, k_rope) = jax.lax.scan(
      layer, x, (params["layers"], cache["kv"], cache["k_rope"]))
  logits = model.unembed(params, x, cfg)[:, 0]
  return logits, {"kv": kv, "k_rope": k_rope, "length": pos + 1}


def sample(logits_BV: jax.Array, key: jax.Array,
           temperature: float = 0.0) -> jax.Array:
  """Greedy when temperature == 0, else a draw from softmax(logits / T)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV / temperature,
                                axis=-1).astype(jnp.int32)


def generate(params: dict[str, Any], prompt_BT: jax.Array, cfg: ModelConfig,
             steps: int, key: jax.Array | None = None,
             temperature: float = 0.0) -> jax.Array:
  """Prompt plus ``steps`` new tokens, [B, T + steps]."""
  if key is None:
    key = jax.random.PRNGKey(0)
  logits, cache = prefill(params, prompt_BT, cfg, prompt_BT.shape[1] + steps)
  step = jax.jit(decode_step, static_argnums=3)
  tok = sample(logits[:, -1], key, temperature)
  out = [tok]
  for i in range(steps - 1):
    logits_b, cache = step(params, cache, tok, cfg)
    tok = sample(logits_b, jax.random.fold_in(key, i + 1), temperature)
    out.append(tok)
  return jnp.concatenate([prompt_BT, jnp.stack(out, axis=1)], axis=1)
