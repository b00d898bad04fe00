"""The decoder: embedding, L x (RMSNorm -> MLA or GQA -> RMSNorm -> SwiGLU
or DeepSeekMoE), head.

``forward(params, tokens_BT, cfg, segment_ids_BT=None) -> (logits_BTV, aux)``
is causal and never attends across packed-document boundaries (segment ids).
Layers are stacked on a leading axis and scanned (with MoE, in two runs: the
first k dense-MLP layers, then the MoE layers; see ``layer_segments``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dsax import gqa, mla, moe
from dsax.config import ModelConfig

# What a decode cache holds per token and layer, by cfg.attention_type.
CACHE_NAMES = {"mla": ("kv", "k_rope"), "gqa": ("k", "v")}


swiglu = moe.swiglu


def layer_segments(params: dict[str, Any], cfg: ModelConfig) -> list[Any]:
  """Runs of layers that scan with one parameter structure, in order; each
  layer's feed-forward is under "mlp" (see dsax.moe.ffn). Without MoE: all
  of ``params["layers"]``. With MoE: the first k layers with
  ``params["dense_mlp"]``, then the other L - k with ``params["moe"]``."""
  layers = params["layers"]
  if not cfg.moe.n_routed_experts:
    return [layers]
  k = cfg.moe.first_k_dense
  head = jax.tree.map(lambda a: a[:k], layers)
  tail = jax.tree.map(lambda a: a[k:], layers)
  segments = [dict(head, mlp=params["dense_mlp"])] if k else []
  return segments + [dict(tail, mlp=params["moe"])]


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


def angles(positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
  """RoPE angles of the main attention (MLA: R dims; GQA: the head dim)."""
  if cfg.attention_type == "gqa":
    return gqa.gqa_angles(positions_BT, cfg)
  return mla.mla_angles(positions_BT, cfg)


def attention_block(p: dict[str, Any], x_BTD: jax.Array, ang_BTR: jax.Array,
                    cfg: ModelConfig, segment_ids_BT: jax.Array | None,
                    attend=None):
  """One attention block on the normalised input. ``attend`` replaces the
  core attention: MLA ``attend(q_nope, q_rope, cq, kv, k_rope)``, GQA
  ``attend(q, k, v)``, -> (o_BTNE, aux); the DSA layer passes one that selects
  keys. Returns (out_BTD, aux, *cache rows): MLA's (kv, k_rope), GQA's (k, v).
  """
  a = p["attn"]
  if cfg.attention_type == "gqa":
    q, k, v = gqa.project_qkv(a, x_BTD, ang_BTR, cfg)
    if attend is None:
      o, aux = gqa.dense_attention(q, k, v, cfg, segment_ids_BT), {}
    else:
      o, aux = attend(q, k, v)
    return mla.output_projection(o, a["wo"]), aux, k, v
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
  selected indices when asked) and, with ``return_cache``, the rows a decode
  cache holds (``CACHE_NAMES``): MLA's latent ``kv_LBSC`` and ``k_rope_LBSR``,
  GQA's ``k_LBSGH`` and ``v_LBSGH``.
  ``embeddings_BTD`` replaces the token embedding (for gradient tests).
  """
  if attention not in ("dense", "sparse"):
    raise ValueError(f"attention must be 'dense' or 'sparse', got {attention!r}")
  if positions_BT is None:
    positions_BT = default_positions(tokens_BT)
  x = embed(params, tokens_BT, cfg) if embeddings_BTD is None else embeddings_BTD
  ang = angles(positions_BT, cfg)
  layer_fn = None
  if attention == "sparse" or dsa_options is not None:
    from dsax import dsa  # the DSA layer builds on this module
    layer_fn = dsa.make_layer_attend(cfg, attention, dsa_options,
                                     positions_BT, segment_ids_BT)

  def layer(x, p):
    h = mla.rms_norm(x, p["attn_norm"], cfg.norm_eps)
    attend = None if layer_fn is None else layer_fn(p, h)
    out, aux, *rows = attention_block(p, h, ang, cfg, segment_ids_BT,
                                      attend)
    x = x + out.astype(x.dtype)
    h = mla.rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    x = x + moe.ffn(p["mlp"], h, cfg).astype(x.dtype)
    if return_cache:
      aux = dict(aux, **dict(zip(CACHE_NAMES[cfg.attention_type], rows)))
    return x, aux

  if cfg.remat:
    layer = jax.checkpoint(layer)
  auxes = []
  for segment in layer_segments(params, cfg):
    x, aux = jax.lax.scan(layer, x, segment, unroll=True)
    auxes.append(aux)
  aux = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *auxes)
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
