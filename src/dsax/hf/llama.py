"""Hugging Face Llama-family checkpoints (Llama, Qwen2, Mistral, SmolLM) <->
dsax GQA models (``attention_type="gqa"``).

Tensor names (per layer i; an HF linear weight is [out, in], y = x W^T):

  model.embed_tokens.weight [V, D]               embed [V, D]
  model.layers.i.input_layernorm.weight          layers/attn_norm
  model.layers.i.self_attn.q_proj.weight [NH, D] layers/attn/wq [D, N, H]
  ... k_proj, v_proj [GH, D]                     layers/attn/wk, wv [D, G, H]
  ... o_proj [D, NH]                             layers/attn/wo [N, H, D]
  ... q/k/v_proj.bias (Qwen2)                    layers/attn/bq [N, H], bk, bv
  model.layers.i.post_attention_layernorm.weight layers/mlp_norm
  model.layers.i.mlp.{gate,up}_proj [F, D]       layers/mlp/w_gate, w_up [D, F]
  model.layers.i.mlp.down_proj [D, F]            layers/mlp/w_down [F, D]
  model.norm.weight                              final_norm
  lm_head.weight [V, D]                          head [D, V] (absent if tied)

The q/k rows need no permutation: HF's ``rotate_half`` RoPE is dsax's
half-split layout over the whole head dim (``gqa``). HF's RMSNorm (f32,
``w * x / sqrt(mean(x^2) + eps)``) is ``mla.rms_norm`` and its MLP
``down(silu(gate(x)) * up(x))`` is ``model.swiglu``.

A Llama checkpoint has no lightning indexer. ``to_hf`` writes dsax's under
``model.layers.i.self_attn.indexer.{wq_b,wk,weights_proj}.weight`` and
``k_norm.{weight,bias}`` (transformers ignores them), and ``params_from_hf``
reads them back when all are present, else initialises a fresh indexer
(``params.init_specs``): the DSA warm-up then trains it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsax import params as P
from dsax.config import ModelConfig, RopeScaling, validate
from dsax.hf import ModelFileError

MODEL_TYPES = ("llama", "qwen2", "mistral")

# (HF suffix under model.layers.i., dsax path under layers/, in_axes): in_axes
# leading dsax axes form the HF input dim of a transposed linear weight; 0 =
# a vector (norm, bias), reshaped only; None = the same array.
_LAYER = (
    ("input_layernorm.weight", ("attn_norm",), 0),
    ("self_attn.q_proj.weight", ("attn", "wq"), 1),
    ("self_attn.k_proj.weight", ("attn", "wk"), 1),
    ("self_attn.v_proj.weight", ("attn", "wv"), 1),
    ("self_attn.o_proj.weight", ("attn", "wo"), 2),
    ("post_attention_layernorm.weight", ("mlp_norm",), 0),
    ("mlp.gate_proj.weight", ("mlp", "w_gate"), 1),
    ("mlp.up_proj.weight", ("mlp", "w_up"), 1),
    ("mlp.down_proj.weight", ("mlp", "w_down"), 1),
)
_BIAS = tuple((f"self_attn.{x}_proj.bias", ("attn", f"b{x}"), 0)
              for x in "qkv")
_INDEXER = (
    ("self_attn.indexer.wq_b.weight", ("indexer", "wq_b"), 1),
    ("self_attn.indexer.wk.weight", ("indexer", "wk"), 1),
    ("self_attn.indexer.k_norm.weight", ("indexer", "k_norm_scale"), 0),
    ("self_attn.indexer.k_norm.bias", ("indexer", "k_norm_bias"), 0),
    ("self_attn.indexer.weights_proj.weight", ("indexer", "weights_proj"), 1),
)
_TOP = (
    ("model.embed_tokens.weight", ("embed",), None),
    ("model.norm.weight", ("final_norm",), 0),
    ("lm_head.weight", ("head",), 1),
)


# ------------------------------------------------------------------- config

_REQUIRED = object()


def field(hf: dict[str, Any], key: str, typ: Any = int,
          default: Any = _REQUIRED) -> Any:
  """``typ(hf[key])``, ``default`` when the key is absent or null; a
  missing required key or a value ``typ`` refuses is a ModelFileError
  naming the key (``dsax.hf.load`` adds the file)."""
  value = hf.get(key)
  if value is None:
    if default is _REQUIRED:
      raise ModelFileError(f"lacks {key!r}")
    return default
  try:
    return typ(value)
  except (TypeError, ValueError):
    raise ModelFileError(f"{key}={value!r} is not {typ.__name__}") from None


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
  """(rope_theta, scaling), refusing RoPE variants dsax's GQA does not
  compute (only the default and Llama 3's scaling)."""
  rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = rp.get("rope_type", rp.get("type", "default"))
  if kind not in ("default", "llama3"):
    raise ModelFileError(f"rope_type={kind!r} is not supported (only "
                         "'default' and 'llama3' RoPE; yarn/linear/dynamic "
                         "are not)")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise ModelFileError("partial_rotary_factor="
                         f"{hf['partial_rotary_factor']} is not supported")
  theta = field(rp, "rope_theta", float,
                field(hf, "rope_theta", float, 10000.0))
  if kind == "default":
    return theta, RopeScaling()
  return theta, RopeScaling(
      enabled=True, kind="llama3", factor=field(rp, "factor", float),
      original_max_position=field(
          rp, "original_max_position_embeddings", int,
          field(hf, "max_position_embeddings", int, 8192)),
      low_freq_factor=field(rp, "low_freq_factor", float),
      high_freq_factor=field(rp, "high_freq_factor", float))


def config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> ModelConfig:
  """A GQA ``ModelConfig`` from an HF config dict; ``overrides`` are
  ModelConfig fields (e.g. ``indexer=IndexerConfig(...)``, ``param_dtype``)."""
  hf = hf_config
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise ModelFileError(f"model_type={kind!r}: dsax.hf.llama reads "
                         f"{MODEL_TYPES}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ModelFileError(f"hidden_act={hf['hidden_act']!r}: only silu "
                         "(SwiGLU)")
  if hf.get("mlp_bias"):
    raise ModelFileError("mlp_bias=True is not supported")
  if kind != "qwen2" and hf.get("attention_bias"):
    raise ModelFileError("attention_bias=True (biases on q/k/v/o) is not "
                         "supported; Qwen2's q/k/v biases are")
  if kind == "qwen2" and hf.get("use_sliding_window"):
    raise ModelFileError("use_sliding_window=True is not supported")
  if kind == "mistral" and hf.get("sliding_window") is not None:
    raise ModelFileError(f"sliding_window={hf['sliding_window']} is not "
                         "supported (dsax attends to the whole causal "
                         "prefix); set it to None when your sequences fit "
                         "inside the window")
  d, n = field(hf, "hidden_size"), field(hf, "num_attention_heads")
  theta, scaling = _rope(hf)
  cfg = ModelConfig(
      attention_type="gqa", vocab_size=field(hf, "vocab_size"), d_model=d,
      n_layers=field(hf, "num_hidden_layers"), n_heads=n,
      n_kv_heads=field(hf, "num_key_value_heads", int, 0) or n,
      head_dim=field(hf, "head_dim", int, 0) or d // max(n, 1),
      qkv_bias=kind == "qwen2", d_ff=field(hf, "intermediate_size"),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      rope_theta=theta, rope_scaling=scaling,
      norm_eps=field(hf, "rms_norm_eps", float, 1e-6),
      init_std=field(hf, "initializer_range", float, 0.02))
  return validate(dataclasses.replace(cfg, **overrides))


def hf_config_from(cfg: ModelConfig,
                   max_position_embeddings: int = 2048) -> dict[str, Any]:
  """The HF config dict of a dsax GQA config (Qwen2 when it has biases)."""
  if cfg.attention_type != "gqa":
    raise ValueError(f"attention_type={cfg.attention_type!r}: only gqa "
                     "models export to Llama/Qwen2")
  rs = cfg.rope_scaling
  if rs.enabled and rs.kind != "llama3":
    raise ValueError(f"rope_scaling.kind={rs.kind!r}: dsax's YaRN has no HF "
                     "Llama equivalent here (llama3 has)")
  rope_scaling = None if not rs.enabled else {
      "rope_type": "llama3", "factor": rs.factor,
      "original_max_position_embeddings": rs.original_max_position,
      "low_freq_factor": rs.low_freq_factor,
      "high_freq_factor": rs.high_freq_factor}
  kind = "qwen2" if cfg.qkv_bias else "llama"
  arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
  out = {
      "architectures": [arch], "model_type": kind,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
      "max_position_embeddings": max_position_embeddings,
      "tie_word_embeddings": cfg.tie_embeddings,
      "initializer_range": cfg.init_std, "torch_dtype": cfg.param_dtype,
  }
  if kind == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  return out


# ------------------------------------------------------------------ tensors


def _entries(cfg: ModelConfig, indexer: bool):
  """(HF name, dsax path, in_axes, layer index or None) of every tensor."""
  layer = _LAYER + (_BIAS if cfg.qkv_bias else ()) + (
      _INDEXER if indexer else ())
  top = _TOP[:2] if cfg.tie_embeddings else _TOP
  out = [(name, path, k, None) for name, path, k in top]
  for i in range(cfg.n_layers):
    out += [(f"model.layers.{i}.{sfx}", ("layers",) + path, k, i)
            for sfx, path, k in layer]
  return out


def _hf_shape(shape: tuple[int, ...], in_axes: int | None) -> tuple[int, ...]:
  if in_axes is None:
    return shape
  if not in_axes:
    return (math.prod(shape),)
  return (math.prod(shape[in_axes:]), math.prod(shape[:in_axes]))


def _check_names(tensors: dict[str, Any], known: set[str],
                 cfg: ModelConfig) -> None:
  """Every expected tensor present and nothing unexpected. Tied checkpoints
  may still carry lm_head; old ones carry RoPE buffers."""
  extra = sorted(n for n in tensors if n not in known
                 and not n.endswith("rotary_emb.inv_freq")
                 and not (cfg.tie_embeddings and n == "lm_head.weight"))
  missing = sorted(known - set(tensors))
  if missing:
    raise ModelFileError(
        f"missing {len(missing)} tensors that the config implies: "
        f"{missing[:6]}" + (f"; and {len(extra)} unexpected: {extra[:6]}"
                            if extra else ""))
  if extra:
    raise ModelFileError(f"not a tensor of this config ({len(extra)} "
                         f"unexpected: {extra[:6]})", tensor=extra[0])


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig,
                   key: jax.Array | None = None) -> dict[str, Any]:
  """The dsax params of an HF state dict (name -> array). The indexer is read
  when the tensors hold one, else initialised from ``key`` (default
  PRNGKey(0)). Shapes are checked against ``params.param_specs``."""
  specs = P.param_specs(cfg)
  prefix = "model.layers.0.self_attn.indexer."
  has_indexer = any(n.startswith(prefix) for n in tensors)
  entries = _entries(cfg, has_indexer)
  _check_names(tensors, {e[0] for e in entries}, cfg)
  stacks: dict[tuple[str, ...], list[np.ndarray]] = {}
  for name, path, in_axes, layer in entries:
    spec = _get(specs, path)
    shape = spec.shape[1:] if layer is not None else spec.shape
    w = np.asarray(tensors[name])
    if w.shape != _hf_shape(shape, in_axes):
      raise ModelFileError(f"shape {w.shape}, the config implies "
                           f"{_hf_shape(shape, in_axes)}", tensor=name)
    stacks.setdefault(path, []).append((w.T if in_axes else w).reshape(shape))
  out: dict[str, Any] = {}
  for path, ws in stacks.items():
    spec = _get(specs, path)
    w = np.stack(ws) if path[0] == "layers" else ws[0]
    _set(out, path, jnp.asarray(w, jnp.dtype(spec.dtype or cfg.param_dtype)))
  if not has_indexer:
    key = jax.random.PRNGKey(0) if key is None else key
    out["layers"]["indexer"] = P.init_specs(specs["layers"]["indexer"], key,
                                            cfg.param_dtype)
  return out


def to_hf(cfg: ModelConfig, params: dict[str, Any], indexer: bool = True):
  """(HF config dict, HF state dict of numpy arrays) of a dsax GQA model;
  ``indexer`` also writes the lightning indexer (see the module docstring)."""
  hf = hf_config_from(cfg)
  tensors = {}
  for name, path, in_axes, layer in _entries(cfg, indexer):
    w = np.asarray(_get(params, path))
    if layer is not None:
      w = w[layer]
    hf_shape = _hf_shape(w.shape, in_axes)
    w = w.reshape(hf_shape[::-1]).T if in_axes else w.reshape(hf_shape)
    tensors[name] = np.array(w, order="C")  # a writable, contiguous copy
  return hf, tensors
