"""Each parameter declared once: shape, dtype, logical axes, initialiser.

``param_specs(cfg)`` returns a nested dict of ``ParamSpec``; ``init_params``
turns it into arrays; ``logical_axes`` gives the matching tree of axis names that
the sharding table (one place, ``dsax.sharding``) maps to mesh axes.

Per-layer parameters are stacked on a leading ``layers`` axis and the forward
scans over it. Logical axis names:

  layers vocab embed mlp q_lora kv_lora kv_rope heads qk_dim v_dim norm
  idx_heads idx_dim kv_heads head_dim (the last two: GQA) expert (MoE)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  init: str = "normal"       # "normal" | "ones" | "zeros"
  std: float = 0.02
  dtype: str | None = None   # None: the model's param_dtype

  def __post_init__(self):
    assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def _stack(layer: dict[str, Any], n_layers: int) -> dict[str, Any]:
  out = {}
  for k, v in layer.items():
    if isinstance(v, dict):
      out[k] = _stack(v, n_layers)
    else:
      out[k] = dataclasses.replace(
          v, shape=(n_layers,) + v.shape, axes=("layers",) + v.axes)
  return out


def indexer_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
  """Lightning indexer of one layer (DeepSeek-V3.2 names)."""
  d, ix, std = cfg.d_model, cfg.indexer, cfg.init_std
  q_in = _indexer_q_rank(cfg) or d
  q_axis = "q_lora" if _indexer_q_rank(cfg) else "embed"
  return {
      "wq_b": ParamSpec((q_in, ix.n_heads, ix.head_dim),
                        (q_axis, "idx_heads", "idx_dim"), std=std),
      "wk": ParamSpec((d, ix.head_dim), ("embed", "idx_dim"), std=std),
      "k_norm_scale": ParamSpec((ix.head_dim,), ("norm",), "ones"),
      "k_norm_bias": ParamSpec((ix.head_dim,), ("norm",), "zeros"),
      # weights_proj runs in f32 whatever the param dtype.
      "weights_proj": ParamSpec((d, ix.n_heads), ("embed", "idx_heads"),
                                std=std, dtype="float32"),
  }


def _indexer_q_rank(cfg: ModelConfig) -> int:
  """The indexer query reads the q-latent (MLA with Q > 0), else h."""
  return cfg.q_lora_rank if cfg.attention_type == "mla" else 0


def gqa_specs(cfg: ModelConfig, out_std: float) -> dict[str, ParamSpec]:
  """Llama/Qwen2 attention: wq [D,N,H], wk/wv [D,G,H], wo [N,H,D], optional
  q/k/v biases (zeros)."""
  d, n, g, h, std = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                     cfg.init_std)
  attn = {
      "wq": ParamSpec((d, n, h), ("embed", "heads", "head_dim"), std=std),
      "wk": ParamSpec((d, g, h), ("embed", "kv_heads", "head_dim"), std=std),
      "wv": ParamSpec((d, g, h), ("embed", "kv_heads", "head_dim"), std=std),
      "wo": ParamSpec((n, h, d), ("heads", "head_dim", "embed"), std=out_std),
  }
  if cfg.qkv_bias:
    attn["bq"] = ParamSpec((n, h), ("heads", "head_dim"), "zeros")
    attn["bk"] = ParamSpec((g, h), ("kv_heads", "head_dim"), "zeros")
    attn["bv"] = ParamSpec((g, h), ("kv_heads", "head_dim"), "zeros")
  return attn


def swiglu_specs(d: int, f: int, std: float,
                 out_std: float) -> dict[str, ParamSpec]:
  return {
      "w_gate": ParamSpec((d, f), ("embed", "mlp"), std=std),
      "w_up": ParamSpec((d, f), ("embed", "mlp"), std=std),
      "w_down": ParamSpec((f, d), ("mlp", "embed"), std=out_std),
  }


def moe_specs(cfg: ModelConfig, out_std: float) -> dict[str, Any]:
  """One DeepSeekMoE layer (dsax.moe): an f32 router, the selection-only bias
  of noaux_tc, X routed SwiGLU experts of width d_expert and one shared SwiGLU
  of width n_shared * d_expert."""
  m, d, std = cfg.moe, cfg.d_model, cfg.init_std
  x, f = m.n_routed_experts, m.d_expert
  out: dict[str, Any] = {
      # The gate math runs in f32 whatever the param dtype (as DeepSeek's).
      "router": ParamSpec((d, x), ("embed", "expert"), std=std,
                          dtype="float32"),
      "w_gate": ParamSpec((x, d, f), ("expert", "embed", "mlp"), std=std),
      "w_up": ParamSpec((x, d, f), ("expert", "embed", "mlp"), std=std),
      "w_down": ParamSpec((x, f, d), ("expert", "mlp", "embed"), std=out_std),
  }
  if m.topk_method == "noaux_tc":
    out["router_bias"] = ParamSpec((x,), ("expert",), "zeros", dtype="float32")
  if m.n_shared_experts:
    out["shared"] = swiglu_specs(d, m.n_shared_experts * f, std, out_std)
  return out


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
  d, n, std = cfg.d_model, cfg.n_heads, cfg.init_std
  out_std = std / math.sqrt(2 * cfg.n_layers)
  attn: dict[str, ParamSpec] = {}
  if cfg.attention_type == "gqa":
    attn = gqa_specs(cfg, out_std)
  elif cfg.q_lora_rank:
    attn["wq_a"] = ParamSpec((d, cfg.q_lora_rank), ("embed", "q_lora"), std=std)
    attn["q_norm"] = ParamSpec((cfg.q_lora_rank,), ("norm",), "ones")
    attn["wq_b"] = ParamSpec((cfg.q_lora_rank, n, cfg.qk_head_dim),
                             ("q_lora", "heads", "qk_dim"), std=std)
  else:
    attn["wq"] = ParamSpec((d, n, cfg.qk_head_dim),
                           ("embed", "heads", "qk_dim"), std=std)
  if cfg.attention_type == "mla":
    attn["wkv_a"] = ParamSpec((d, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                              ("embed", "kv_rope"), std=std)
    attn["kv_norm"] = ParamSpec((cfg.kv_lora_rank,), ("norm",), "ones")
    attn["wkv_b"] = ParamSpec(
        (cfg.kv_lora_rank, n, cfg.qk_nope_head_dim + cfg.v_head_dim),
        ("kv_lora", "heads", "qk_dim"), std=std)
    attn["wo"] = ParamSpec((n, cfg.v_head_dim, d), ("heads", "v_dim", "embed"),
                           std=out_std)
  layer = {
      "attn_norm": ParamSpec((d,), ("norm",), "ones"),
      "attn": attn,
      "indexer": indexer_specs(cfg),
      "mlp_norm": ParamSpec((d,), ("norm",), "ones"),
      "mlp": swiglu_specs(d, cfg.d_ff, std, out_std),
  }
  specs: dict[str, Any] = {
      # Unit-variance rows feed the pre-norm stack; tied, the same matrix is
      # the output head, whose logits would then have std sqrt(D): init_std.
      "embed": ParamSpec((cfg.vocab_size, d), ("vocab", "embed"),
                         std=cfg.init_std if cfg.tie_embeddings else 1.0),
      "final_norm": ParamSpec((d,), ("norm",), "ones"),
  }
  if cfg.moe.n_routed_experts:
    # MoE: the first k layers' dense MLPs and the other L - k layers' MoE
    # MLPs are two further stacks (model.layer_segments scans them in turn).
    k = cfg.moe.first_k_dense
    if k:
      specs["dense_mlp"] = _stack(layer["mlp"], k)
    specs["moe"] = _stack(moe_specs(cfg, out_std), cfg.n_layers - k)
    del layer["mlp"]
  specs["layers"] = _stack(layer, cfg.n_layers)
  if not cfg.tie_embeddings:
    specs["head"] = ParamSpec((d, cfg.vocab_size), ("embed", "vocab"), std=std)
  return specs


def _is_spec(x: Any) -> bool:
  return isinstance(x, ParamSpec)


def _init_one(spec: ParamSpec, key: jax.Array, default_dtype: str) -> jax.Array:
  dtype = jnp.dtype(spec.dtype or default_dtype)
  if spec.init == "ones":
    return jnp.ones(spec.shape, dtype)
  if spec.init == "zeros":
    return jnp.zeros(spec.shape, dtype)
  # The barrier keeps XLA from folding std into normal's own scale under jit,
  # so a jitted init (train.init_params) equals the eager one bit for bit.
  x = jax.lax.optimization_barrier(
      jax.random.normal(key, spec.shape, jnp.float32)) * spec.std
  return x.astype(dtype)


def init_specs(specs: Any, key: jax.Array, default_dtype: str) -> Any:
  """Arrays for a tree of specs (a whole model or a subtree, e.g. the indexer
  of an imported checkpoint). Deterministic for a key: each leaf's key is the
  key folded with its index in the (sorted-path) flatten order of the tree."""
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  arrays = [_init_one(s, jax.random.fold_in(key, i), default_dtype)
            for i, s in enumerate(leaves)]
  return jax.tree.unflatten(treedef, arrays)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict[str, Any]:
  return init_specs(param_specs(cfg), key, cfg.param_dtype)


def logical_axes(cfg: ModelConfig) -> dict[str, Any]:
  return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype or
                                                        cfg.param_dtype)),
      param_specs(cfg), is_leaf=_is_spec)


def count_tree(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def param_count(cfg: ModelConfig) -> int:
  """Closed-form parameter count from the config (independent of the specs)."""
  d, n, L = cfg.d_model, cfg.n_heads, cfg.n_layers
  h, r, e = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  q, c, f = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.d_ff
  ix = cfg.indexer
  if q:
    q_params = d * q + q + q * n * (h + r)
  else:
    q_params = d * n * (h + r)
  kv_params = d * (c + r) + c + c * n * (h + e)
  attn = q_params + kv_params + n * e * d
  if cfg.attention_type == "gqa":
    g, hg, q = cfg.n_kv_heads, cfg.head_dim, 0
    attn = 2 * d * n * hg + 2 * d * g * hg + cfg.qkv_bias * (n + 2 * g) * hg
  indexer = (q or d) * ix.n_heads * ix.head_dim + d * ix.head_dim \
      + 2 * ix.head_dim + d * ix.n_heads
  mlp = 3 * d * f
  per_layer = attn + indexer + mlp + 2 * d
  head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  total = cfg.vocab_size * d + L * per_layer + d + head
  m = cfg.moe
  if m.n_routed_experts:  # L - k layers trade the dense MLP for an MoE one
    x = m.n_routed_experts
    moe = (d * x + (m.topk_method == "noaux_tc") * x
           + 3 * d * m.d_expert * (x + m.n_shared_experts))
    total += (L - m.first_k_dense) * (moe - mlp)
  return total

