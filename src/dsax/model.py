"""The decoder: embedding, L x (RMSNorm -> MLA -> RMSNorm -> SwiGLU), head.

``forward(params, tokens_BT, cfg, segment_ids_BT=None) -> (logits_BTV, aux)``
is causal and never attends across packed-document boundaries (segment ids).
Layers are stacked on a leading axis and scanned.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dsax import mla
from dsax.config import ModelConfig


def swiglu(p: dict[str, Any], x_BTD: jax.Array, cdt) -> jax.Array:
  x = x_BTD.astype(cdt)
  gate = jax.nn.silu(x @ p["w_gate"].astype(cdt))
  return (gate * (x @ p["w_up"].astype(cdt))) @ p["w_down"].astype(cdt)


def embed(params: dict[str, Any], tokens_BT: jax.Array,
          cfg: ModelConfig) -> jax.Array:
  return params["embed"][tokens_BT].astype(jnp.dtype(cfg.compute_dtype))


def unembed(params: dict[str, Any], x_BTD: jax.Array,
            cfg: ModelConfig) -> jax.Array:
  x = mla.rms_norm(x_BTD, params["final_norm"], cfg.norm_eps)
  w = params["embed"].T if cfg.tie_embeddings else params["head"]
  cdt = jnp.dtype(cfg.compute_dtype)
  return jnp.einsum("btd,dv->btv", x.astype(cdt), w.astype(cdt),
                    preferred_element_type=jnp.float32)


def default_positions(tokens_BT: jax.Array) -> jax.Array:
  b, t = tokens_BT.shape
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def attention_block(p: dict[str, Any], x_BTD: jax.Array, ang_BTR: jax.Array,
                    cfg: ModelConfig, segment_ids_BT: jax.Array | None,
                    attend=None):
  """One MLA block on the normalised input. ``attend`` replaces the core
  attention: ``attend(q_nope, q_rope, cq, kv, k_rope) -> (o_BTNE, aux)``; the
  DSA layer passes one that selects keys. Returns (out_BTD, aux, kv, k_rope)."""
  a = p["attn"]
  q_nope, q_rope, cq = mla.project_q(a, x_BTD, ang_BTR, cfg)
  kv, k_rope = mla.project_kv(a, x_BTD, ang_BTR, cfg)
  if attend is None:
    o = mla.dense_attention(q_nope, q_rope, kv, k_rope, a["wkv_b"], cfg,
                            segment_ids_BT)
    aux = {}
  else:
    o, aux = attend(q_nope, q_rope, cq, kv, k_rope)
  return mla.output_projection(o, a["wo"]), aux, kv, k_rope


def forward(params: dict[str, Any], tokens_BT: jax.Array, cfg: ModelConfig,
            segment_ids_BT: jax.Array | None = None, *,
            positions_BT: jax.Array | None = None,
            embeddings_BTD: jax.Array | None = None,
            attention: str = "dense", dsa_options: Any = None,
            return_cache: bool = False):
  """Logits and aux. ``attention``: "dense" or "sparse" (DSA, see dsax.dsa).

  aux holds per-layer arrays stacked on a leading L axis (indexer KL, recall,
  selected indices when asked) and, with ``return_cache``, the latent rows
  ``kv_LBSC`` and ``k_rope_LBSR`` that a decode cache holds.
  ``embeddings_BTD`` replaces the token embedding (for gradient tests).
  """
  if attention not in ("dense", "sparse"):
    raise ValueError(f"attention must be 'dense' or 'sparse', got {attention!r}")
  if positions_BT is None:
    positions_BT = default_positions(tokens_BT)
  x = embed(params, tokens_BT, cfg) if embeddings_BTD is None else embeddings_BTD
  ang = mla.mla_angles(positions_BT, cfg)
  cdt = jnp.dtype(cfg.compute_dtype)
  layer_fn = None
  if attention == "sparse" or dsa_options is not None:
    from dsax import dsa  # the DSA layer builds on this module
    layer_fn = dsa.make_layer_attend(cfg, attention, dsa_options,
                                     positions_BT, segment_ids_BT)

  def layer(x, p):
    h = mla.rms_norm(x, p["attn_norm"], cfg.norm_eps)
    attend = None if layer_fn is None else layer_fn(p, h)
    out, aux, kv, k_rope = attention_block(p, h, ang, cfg, segment_ids_BT,
                                           attend)
    x = x + out.astype(x.dtype)
    h = mla.rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    x = x + swiglu(p["mlp"], h, cdt).astype(x.dtype)
    if return_cache:
      aux = dict(aux, kv=kv, k_rope=k_rope)
    return x, aux

  if cfg.remat:
    layer = jax.checkpoint(layer)
  x, aux = jax.lax.scan(layer, x, params["layers"], unroll=True)
  return unembed(params, x, cfg), aux


def lm_loss(logits_BTV: jax.Array, targets_BT: jax.Array,
            weights_BT: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross entropy over weighted positions (f32)."""
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
  if weights_BT is None:
    return nll.mean()
  w = weights_BT.astype(jnp.float32)
  return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)
