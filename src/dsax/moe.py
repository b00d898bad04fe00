"""DeepSeekMoE feed-forward (DeepSeek-V2/V3): shared experts plus routed
experts, with a dense (reference) dispatch.

Axes beyond DESIGN's key: X routed experts; F is the width of one expert.

Routing, per token with hidden h (all in f32):
  logits_x = h . W_router[:, x]
  s_x      = softmax(logits)_x  (V2)   or   sigmoid(logits_x)  (V3)
  c_x      = s_x + b_x   the noaux_tc correction bias b (aux-loss-free
                         balancing): it changes which experts are chosen, never
                         their weights; absent otherwise (c = s)
  groups (n_group G, topk_group): the X experts form G contiguous groups of
  X / G; a group's score is max_x c_x (group_limited_greedy, V2) or the sum
  of its two largest c_x (noaux_tc, V3); only the topk_group best groups
  stay eligible (greedy: every expert is).
  S = the n_activated eligible experts with the largest c_x
  g_x = s_x for x in S, else 0;  g <- g / (sum_S s + 1e-20) if norm_topk_prob;
  g <- g * routed_scaling_factor
Output:
  y = sum_x g_x SwiGLU_x(h) + SwiGLU_shared(h)
Dense dispatch: every expert runs on every token and g (zero off S) weights
the results. It is clear and exact, and costs X times a sparse dispatch: fine
at test and import-check sizes, not for training a large MoE.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dsax.config import ModelConfig


def router_scores(p: dict[str, Any], x_BTD: jax.Array, cfg: ModelConfig):
  """Returns (s_BTX, c_BTX): the gate scores and the scores that choose."""
  logits = x_BTD.astype(jnp.float32) @ p["router"].astype(jnp.float32)
  if cfg.moe.score_func == "softmax":
    s = jax.nn.softmax(logits, axis=-1)
  else:
    s = jax.nn.sigmoid(logits)
  if "router_bias" not in p:
    return s, s
  return s, s + jax.lax.broadcast_to_rank(
      p["router_bias"].astype(jnp.float32), s.ndim)


def eligible_experts(c_BTX: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Bool [B,T,X]: experts in the topk_group best groups (all for greedy)."""
  m = cfg.moe
  if m.topk_method == "greedy" or m.n_group == 1:
    return jnp.ones(c_BTX.shape, bool)
  grouped = c_BTX.reshape(c_BTX.shape[:-1] + (m.n_group, -1))
  if m.topk_method == "noaux_tc":
    group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
  else:
    group_score = jnp.max(grouped, axis=-1)
  _, best = jax.lax.top_k(group_score, m.topk_group)
  keep = jnp.sum(jax.nn.one_hot(best, m.n_group, dtype=jnp.int32), -2) > 0
  return jnp.repeat(keep, m.n_routed_experts // m.n_group, axis=-1)


def gates(p: dict[str, Any], x_BTD: jax.Array,
          cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Returns (g_BTX, idx_BTK): the combine weights (zero off the chosen
  experts, f32) and the chosen experts (K = n_activated)."""
  m = cfg.moe
  s, c = router_scores(p, x_BTD, cfg)
  c = jnp.where(eligible_experts(c, cfg), c, -jnp.inf)
  _, idx = jax.lax.top_k(c, m.n_activated)
  w = jnp.take_along_axis(s, idx, axis=-1)
  if m.norm_topk_prob:
    w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
  w = w * m.routed_scaling_factor
  onehot = jax.nn.one_hot(idx, m.n_routed_experts, dtype=jnp.float32)
  return jnp.einsum("btk,btkx->btx", w, onehot), idx


def swiglu(p: dict[str, Any], x_BTD: jax.Array, cdt) -> jax.Array:
  """down(silu(x W_gate) * (x W_up)), matmuls in ``cdt``."""
  x = x_BTD.astype(cdt)
  gate = jax.nn.silu(x @ p["w_gate"].astype(cdt))
  return (gate * (x @ p["w_up"].astype(cdt))) @ p["w_down"].astype(cdt)


def moe_block(p: dict[str, Any], x_BTD: jax.Array,
              cfg: ModelConfig) -> jax.Array:
  """The MoE feed-forward of one layer on the normalised input: y_BTD."""
  cdt = jnp.dtype(cfg.compute_dtype)
  g_BTX, _ = gates(p, x_BTD, cfg)
  x = x_BTD.astype(cdt)
  gate_BTXF = jax.nn.silu(jnp.einsum("btd,xdf->btxf", x,
                                     p["w_gate"].astype(cdt)))
  h_BTXF = gate_BTXF * jnp.einsum("btd,xdf->btxf", x, p["w_up"].astype(cdt))
  h_BTXF = h_BTXF * g_BTX[..., None].astype(cdt)
  y = jnp.einsum("btxf,xfd->btd", h_BTXF, p["w_down"].astype(cdt))
  if "shared" in p:
    y = y + swiglu(p["shared"], x, cdt)
  return y


def ffn(p: dict[str, Any], x_BTD: jax.Array, cfg: ModelConfig) -> jax.Array:
  """A layer's feed-forward: MoE when ``p`` holds a router, else SwiGLU."""
  if "router" in p:
    return moe_block(p, x_BTD, cfg)
  return swiglu(p, x_BTD, jnp.dtype(cfg.compute_dtype))
