"""Hugging Face DeepSeek-V2 / V2-Lite / V3 / V3.2 checkpoints <-> dsax MLA
models (with ``model.moe``), numpy only.

Tensor names (per layer i; an HF linear weight is [out, in], y = x W^T; a
dsax weight is [in..., out...]):

  model.embed_tokens.weight [V, D]            embed [V, D]
  lm_head.weight [V, D]                       head [D, V] (absent if tied)
  model.norm.weight                           final_norm
  model.layers.i.input_layernorm / post_attention_layernorm
                                              layers/attn_norm, mlp_norm
  self_attn.q_a_proj [Q, D], q_a_layernorm, q_b_proj [N(H+R), Q]
                                              layers/attn/wq_a, q_norm, wq_b
  self_attn.q_proj [N(H+R), D] (V2-Lite, Q=0) layers/attn/wq [D, N, H+R]
  self_attn.kv_a_proj_with_mqa [C+R, D], kv_a_layernorm, kv_b_proj [N(H+E), C]
                                              layers/attn/wkv_a, kv_norm, wkv_b
  self_attn.o_proj [D, NE]                    layers/attn/wo [N, E, D]
  self_attn.indexer.{wq_b, wk, weights_proj}.weight, k_norm.{weight, bias}
    (V3.2)                                    layers/indexer/...
  mlp.{gate,up,down}_proj (i < k)             dense_mlp/w_gate... [i]
  mlp.gate.weight [X, D], gate.e_score_correction_bias [X]
                                              moe/router [i-k], router_bias
  mlp.experts.j.{gate,up,down}_proj           moe/w_gate... [i-k, j]
  mlp.shared_experts.{gate,up,down}_proj      moe/shared/...

RoPE. dsax's MLA rotates interleaved pairs (x[2i], x[2i+1]). DeepSeek's own
checkpoints use that layout: V2's complex rotation and V3's
``rope_interleave=True`` (the default; transformers then de-interleaves q and
k alike, which leaves q.k unchanged). A V3 config with ``rope_interleave:
false`` rotates halves (x[i], x[i+R/2]); the importer permutes the R rope rows
of q_b_proj/q_proj and kv_a_proj_with_mqa (dsax row 2i = HF row i, 2i+1 =
i + R/2) and ``to_hf(..., rope_interleave=False)`` inverts it. The V3.2
indexer rotates the first R dims half-split in transformers and in dsax: no
permutation.

Indexer (V3.2). transformers scores ``sum_i w_i I**-0.5 relu(q_i.k J**-0.5)``
(the same logits as dsax: relu is positively homogeneous), rotates the first
``qk_rope_head_dim`` dims (``model.indexer.rope_dim``), keeps weights_proj in
f32, and skips the Hadamard rotation and FP8 scoring of DeepSeek's reference
kernels (the rotation is orthogonal; FP8 only rounds): dsax's
``indexer.hadamard``/``fp8`` stay off and can be set to mimic the reference.
V2/V3 have no indexer: a fresh one is initialised with V3.2's shape (64 heads
of 128, rope_dim R, top-2048) unless ``indexer=`` is overridden.

Differences that remain (none matter for the released checkpoints):
transformers' q_a/kv_a RMSNorms and the indexer LayerNorm use eps 1e-6 whatever
``rms_norm_eps`` says (dsax uses norm_eps everywhere: a warning is logged);
transformers' V2 router ignores ``norm_topk_prob`` (DeepSeek's V2 code and
dsax honour it; override ``moe=`` to match); YaRN configs whose cos/sin scale
``attention_factor`` is not 1 (mscale != mscale_all_dim) are refused.

FP8 checkpoints (V3 release): an ``e4m3`` weight with ``weight_scale_inv``
[ceil(O/128), ceil(I/128)] is ``w * scale_inv[o // 128, i // 128]``; it is
dequantised to the param dtype (ragged edge blocks included). Layers with
index >= num_hidden_layers (multi-token prediction) are skipped with a notice.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any

import jax
import numpy as np

from dsax import params as P
from dsax.config import (IndexerConfig, ModelConfig, MoEConfig, RopeScaling,
                         validate)
from dsax.hf import ModelFileError
# The same [in..., out...] <-> [out, in] reshapes and config.json reads as
# the Llama family.
from dsax.hf.llama import _check_names, _get, _hf_shape, field

log = logging.getLogger("dsax")

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
_ARCH = {"deepseek_v2": "DeepseekV2ForCausalLM",
         "deepseek_v3": "DeepseekV3ForCausalLM",
         "deepseek_v32": "DeepseekV32ForCausalLM"}

# (HF suffix, dsax path, in_axes): a linear weight's first in_axes dsax axes
# are HF's input dim; 0 = a vector; None = the same array.
_NORMS = (("input_layernorm.weight", ("attn_norm",), 0),
          ("post_attention_layernorm.weight", ("mlp_norm",), 0))
_Q_LORA = (("self_attn.q_a_proj.weight", ("attn", "wq_a"), 1),
           ("self_attn.q_a_layernorm.weight", ("attn", "q_norm"), 0),
           ("self_attn.q_b_proj.weight", ("attn", "wq_b"), 1))
_Q_DIRECT = (("self_attn.q_proj.weight", ("attn", "wq"), 1),)
_KV = (("self_attn.kv_a_proj_with_mqa.weight", ("attn", "wkv_a"), 1),
       ("self_attn.kv_a_layernorm.weight", ("attn", "kv_norm"), 0),
       ("self_attn.kv_b_proj.weight", ("attn", "wkv_b"), 1),
       ("self_attn.o_proj.weight", ("attn", "wo"), 2))
_INDEXER = (("self_attn.indexer.wq_b.weight", ("indexer", "wq_b"), 1),
            ("self_attn.indexer.wk.weight", ("indexer", "wk"), 1),
            ("self_attn.indexer.k_norm.weight", ("indexer", "k_norm_scale"), 0),
            ("self_attn.indexer.k_norm.bias", ("indexer", "k_norm_bias"), 0),
            ("self_attn.indexer.weights_proj.weight", ("indexer",
                                                       "weights_proj"), 1))
_SWIGLU = (("gate_proj.weight", ("w_gate",), 1),
           ("up_proj.weight", ("w_up",), 1),
           ("down_proj.weight", ("w_down",), 1))


# ------------------------------------------------------------------- config


def _mscale(factor: float, coeff: float) -> float:
  return 1.0 if factor <= 1 else 0.1 * coeff * math.log(factor) + 1.0


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
  """(rope_theta, RopeScaling) of either config layout (transformers 5's
  ``rope_parameters`` or DeepSeek's ``rope_theta`` + ``rope_scaling``)."""
  rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = rp.get("rope_type", rp.get("type", "default"))
  if kind == "default":
    return theta, RopeScaling()
  if kind != "yarn":
    raise ModelFileError(f"rope_type={kind!r} is not supported (default or "
                         "yarn)")
  orig = field(rp, "original_max_position_embeddings")
  factor = field(rp, "factor", float, 0.0) or field(
      hf, "max_position_embeddings") / orig
  ms, ms_all = rp.get("mscale"), rp.get("mscale_all_dim")
  # transformers scales cos and sin by attention_factor (q_rope . k_rope by
  # its square, q_nope . k_nope not); dsax has no such term.
  af = rp.get("attention_factor")
  if af is None:
    af = (_mscale(factor, ms) / _mscale(factor, ms_all) if ms and ms_all
          else _mscale(factor, 1.0))
  if abs(af - 1.0) > 1e-9:
    raise ModelFileError(f"YaRN attention_factor={af:.6g} (mscale={ms}, "
                         f"mscale_all_dim={ms_all}, factor={factor}) scales "
                         "only the rope part of the logits; dsax needs it to "
                         "be 1 (mscale == mscale_all_dim, as every DeepSeek "
                         "release)")
  if not rp.get("truncate", True):
    raise ModelFileError("YaRN truncate=False is not supported")
  if factor <= 1.0:
    raise ModelFileError(f"YaRN factor={factor} must be > 1")
  return theta, RopeScaling(
      enabled=True, factor=factor, original_max_position=orig,
      beta_fast=float(rp.get("beta_fast") or 32),
      beta_slow=float(rp.get("beta_slow") or 1),
      mscale=float(ms_all or 0.0))


def _first_k_dense(hf: dict[str, Any], kind: str, n_layers: int) -> int:
  types = hf.get("mlp_layer_types")
  if types:
    k = types.count("dense")
    if list(types) != ["dense"] * k + ["sparse"] * (n_layers - k):
      raise ModelFileError(f"mlp_layer_types={types}: only k dense layers "
                           "followed by MoE layers are supported")
    return k
  default = 0 if kind == "deepseek_v2" else 3
  return int(hf.get("first_k_dense_replace", default) or 0)


def _moe(hf: dict[str, Any], kind: str, n_layers: int) -> MoEConfig:
  x = hf.get("n_routed_experts", hf.get("num_local_experts")) or 0
  k = _first_k_dense(hf, kind, n_layers)
  if not x or k >= n_layers:
    return MoEConfig()  # every layer dense
  v2 = kind == "deepseek_v2"
  score = hf.get("scoring_func", "softmax" if v2 else "sigmoid")
  method = hf.get("topk_method", "greedy" if v2 else "noaux_tc")
  if not v2 and (score, method) != ("sigmoid", "noaux_tc"):
    raise ModelFileError(f"{kind}: scoring_func={score!r}, topk_method="
                         f"{method!r}; transformers' V3 router is sigmoid + "
                         "noaux_tc only")
  if v2 and (score != "softmax" or method not in ("greedy",
                                                  "group_limited_greedy")):
    raise ModelFileError(f"deepseek_v2: scoring_func={score!r}, topk_method="
                         f"{method!r} are not V2's (softmax, greedy or "
                         "group_limited_greedy)")
  norm = bool(hf.get("norm_topk_prob", not v2))
  if v2 and norm:
    log.warning("deepseek_v2 norm_topk_prob=True: dsax normalises the top-k "
                "weights (DeepSeek's V2 code does); transformers' V2 does not")
  return MoEConfig(
      n_routed_experts=int(x), n_shared_experts=int(hf.get(
          "n_shared_experts", 2 if v2 else 1) or 0),
      n_activated=field(hf, "num_experts_per_tok"),
      d_expert=field(hf, "moe_intermediate_size"), first_k_dense=k,
      score_func=score, topk_method=method,
      n_group=int(hf.get("n_group") or 1),
      topk_group=int(hf.get("topk_group") or 1), norm_topk_prob=norm,
      routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))


def config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> ModelConfig:
  """An MLA ``ModelConfig`` from an HF DeepSeek config dict; ``overrides``
  are ModelConfig fields (``indexer=IndexerConfig(...)``, ``param_dtype``)."""
  hf = hf_config
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise ModelFileError(f"model_type={kind!r}: dsax.hf.deepseek reads "
                         f"{MODEL_TYPES}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ModelFileError(f"hidden_act={hf['hidden_act']!r}: only silu "
                         "(SwiGLU)")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ModelFileError(f"{flag}=True is not supported (dsax has no "
                           "biases)")
  n_layers = field(hf, "num_hidden_layers")
  q_rank = field(hf, "q_lora_rank", int, 0)
  r = field(hf, "qk_rope_head_dim")
  if kind == "deepseek_v32":
    if not q_rank:
      raise ModelFileError("deepseek_v32 needs q_lora_rank > 0 (its indexer "
                           "reads the q-latent)")
    indexer = IndexerConfig(n_heads=int(hf.get("index_n_heads", 64)),
                            head_dim=int(hf.get("index_head_dim", 128)),
                            rope_dim=r, topk=int(hf.get("index_topk", 2048)))
  else:  # a fresh indexer of V3.2's shape
    indexer = IndexerConfig(n_heads=64, head_dim=128, rope_dim=min(r, 128),
                            topk=2048)
  eps = field(hf, "rms_norm_eps", float, 1e-6)
  if eps != 1e-6:
    log.warning(f"rms_norm_eps={eps}: transformers uses 1e-6 in the q/kv "
                "latent and indexer norms, dsax uses norm_eps in all of them")
  theta, scaling = _rope(hf)
  cfg = ModelConfig(
      attention_type="mla", vocab_size=field(hf, "vocab_size"),
      d_model=field(hf, "hidden_size"), n_layers=n_layers,
      n_heads=field(hf, "num_attention_heads"), q_lora_rank=q_rank,
      kv_lora_rank=field(hf, "kv_lora_rank"),
      qk_nope_head_dim=field(hf, "qk_nope_head_dim"), qk_rope_head_dim=r,
      v_head_dim=field(hf, "v_head_dim"),
      d_ff=field(hf, "intermediate_size"),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      rope_theta=theta, rope_scaling=scaling, norm_eps=eps,
      init_std=float(hf.get("initializer_range", 0.02)), indexer=indexer,
      moe=_moe(hf, kind, n_layers))
  return validate(dataclasses.replace(cfg, **overrides))


def default_model_type(cfg: ModelConfig) -> str:
  """V2 for softmax routing; else V3.2 when its indexer fits transformers'
  (reads the q-latent, rope_dim = R); else V3."""
  m = cfg.moe
  if m.n_routed_experts and m.score_func == "softmax":
    return "deepseek_v2"
  if cfg.q_lora_rank and cfg.indexer.rope_dim == cfg.qk_rope_head_dim:
    return "deepseek_v32"
  return "deepseek_v3"


def hf_config_from(cfg: ModelConfig, model_type: str | None = None,
                   rope_interleave: bool = True) -> dict[str, Any]:
  """The HF config dict of a dsax MLA config (see ``to_hf``)."""
  kind = model_type or default_model_type(cfg)
  if cfg.attention_type != "mla" or kind not in MODEL_TYPES:
    raise ValueError(f"attention_type={cfg.attention_type!r}, model_type="
                     f"{kind!r}: dsax.hf.deepseek writes MLA models as "
                     f"{MODEL_TYPES}")
  m, v2 = cfg.moe, kind == "deepseek_v2"
  if m.n_routed_experts and v2 != (m.score_func == "softmax") or (
      m.n_routed_experts and not v2 and m.topk_method != "noaux_tc"):
    raise ValueError(f"{kind} cannot express model.moe.score_func="
                     f"{m.score_func!r}, topk_method={m.topk_method!r}")
  if kind == "deepseek_v32" and not (
      cfg.q_lora_rank and cfg.indexer.rope_dim == cfg.qk_rope_head_dim):
    raise ValueError("deepseek_v32 needs q_lora_rank > 0 and "
                     "indexer.rope_dim == qk_rope_head_dim")
  if not rope_interleave and kind != "deepseek_v3":
    raise ValueError("rope_interleave=False exists only in deepseek_v3")
  rs = cfg.rope_scaling
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  max_pos = 4096
  if rs.enabled:
    max_pos = int(rs.original_max_position * rs.factor)
    rope.update(rope_type="yarn", factor=rs.factor,
                original_max_position_embeddings=rs.original_max_position,
                beta_fast=rs.beta_fast, beta_slow=rs.beta_slow,
                mscale=rs.mscale, mscale_all_dim=rs.mscale)
    if not rs.mscale:
      rope["attention_factor"] = 1.0
  moe = m if m.n_routed_experts else MoEConfig(
      n_routed_experts=1, n_activated=1, d_expert=cfg.d_ff,
      first_k_dense=cfg.n_layers)
  out = {
      "architectures": [_ARCH[kind]], "model_type": kind,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_heads,
      "q_lora_rank": cfg.q_lora_rank or None,
      "kv_lora_rank": cfg.kv_lora_rank,
      "qk_nope_head_dim": cfg.qk_nope_head_dim,
      "qk_rope_head_dim": cfg.qk_rope_head_dim,
      "v_head_dim": cfg.v_head_dim, "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope,
      "max_position_embeddings": max_pos,
      "tie_word_embeddings": cfg.tie_embeddings,
      "initializer_range": cfg.init_std, "attention_bias": False,
      "dtype": cfg.param_dtype,
      "n_routed_experts": moe.n_routed_experts,
      "n_shared_experts": moe.n_shared_experts,
      "num_experts_per_tok": moe.n_activated,
      "moe_intermediate_size": moe.d_expert,
      "first_k_dense_replace": moe.first_k_dense,
      "n_group": moe.n_group, "topk_group": moe.topk_group,
      "norm_topk_prob": moe.norm_topk_prob,
      "routed_scaling_factor": moe.routed_scaling_factor,
      "scoring_func": "softmax" if v2 else "sigmoid",
      "topk_method": moe.topk_method if v2 else "noaux_tc",
  }
  if kind == "deepseek_v3":
    out.update(rope_interleave=rope_interleave, num_nextn_predict_layers=0)
  if kind == "deepseek_v32":
    ix = cfg.indexer
    out.update(index_n_heads=ix.n_heads, index_head_dim=ix.head_dim,
               index_topk=ix.topk, head_dim=cfg.qk_rope_head_dim)
  return out


# ------------------------------------------------------------------ tensors


def _entries(cfg: ModelConfig, indexer: bool):
  """(HF name, dsax path, leading index, in_axes) of every tensor."""
  m = cfg.moe
  top = [("model.embed_tokens.weight", ("embed",), (), None),
         ("model.norm.weight", ("final_norm",), (), 0)]
  if not cfg.tie_embeddings:
    top.append(("lm_head.weight", ("head",), (), 1))
  layer = _NORMS + (_Q_LORA if cfg.q_lora_rank else _Q_DIRECT) + _KV + (
      _INDEXER if indexer else ())
  k = m.first_k_dense if m.n_routed_experts else cfg.n_layers
  out = list(top)
  for i in range(cfg.n_layers):
    pre = f"model.layers.{i}."
    out += [(pre + sfx, ("layers",) + path, (i,), ax) for sfx, path, ax in layer]
    if i < k:
      base = ("dense_mlp",) if m.n_routed_experts else ("layers", "mlp")
      out += [(pre + "mlp." + sfx, base + path, (i,), ax)
              for sfx, path, ax in _SWIGLU]
      continue
    j = (i - k,)
    out.append((pre + "mlp.gate.weight", ("moe", "router"), j, 1))
    if m.topk_method == "noaux_tc":
      out.append((pre + "mlp.gate.e_score_correction_bias",
                  ("moe", "router_bias"), j, 0))
    for e in range(m.n_routed_experts):
      out += [(f"{pre}mlp.experts.{e}.{sfx}", ("moe",) + path, j + (e,), ax)
              for sfx, path, ax in _SWIGLU]
    if m.n_shared_experts:
      out += [(pre + "mlp.shared_experts." + sfx, ("moe", "shared") + path, j,
               ax) for sfx, path, ax in _SWIGLU]
  return out


def rope_permutation(r: int) -> np.ndarray:
  """dsax's interleaved rope row j is half-split row perm[j]: perm[2i] = i,
  perm[2i+1] = i + R/2."""
  return np.stack([np.arange(r // 2), np.arange(r // 2) + r // 2], 1).ravel()


def _permute_rope(attn: dict[str, np.ndarray], cfg: ModelConfig,
                  perm: np.ndarray) -> None:
  """Reorders (in place) the rope rows of the q and kv_a projections."""
  q = attn["wq_b" if cfg.q_lora_rank else "wq"]
  h, c = cfg.qk_nope_head_dim, cfg.kv_lora_rank
  q[..., h:] = q[..., h:][..., perm]
  attn["wkv_a"][..., c:] = attn["wkv_a"][..., c:][..., perm]


def dequantize_fp8(tensors: dict[str, np.ndarray],
                   block: tuple[int, int] = (128, 128)) -> dict[str, np.ndarray]:
  """Replaces each FP8 weight and its ``weight_scale_inv`` by the f32
  product ``w[o, i] * scale_inv[o // b0, i // b1]`` (edge blocks ragged)."""
  out = {}
  for name, w in tensors.items():
    if name.endswith("_scale_inv"):
      continue
    s = tensors.get(name + "_scale_inv")
    if s is None:
      if "float8" in str(w.dtype):
        raise ModelFileError(f"{w.dtype} without {name}_scale_inv",
                             tensor=name)
      out[name] = w
      continue
    if w.ndim != 2:
      raise ModelFileError(f"shape {w.shape}: a weight with a "
                           "weight_scale_inv must be a matrix", tensor=name)
    rows, cols = w.shape
    expect = (-(-rows // block[0]), -(-cols // block[1]))
    if s.shape != expect:
      raise ModelFileError(f"shape {s.shape}, blocks of {block} over "
                           f"{name} {w.shape} need {expect}",
                           tensor=name + "_scale_inv")
    scale = np.repeat(np.repeat(np.asarray(s, np.float32), block[0], 0),
                      block[1], 1)[:rows, :cols]
    out[name] = w.astype(np.float32) * scale
  return out


def _drop_mtp(tensors: dict[str, np.ndarray],
              n_layers: int) -> dict[str, np.ndarray]:
  keep, skipped = {}, set()
  for name, w in tensors.items():
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= n_layers:
      skipped.add(int(m.group(1)))
    else:
      keep[name] = w
  if skipped:
    log.info(f"skipped layers {sorted(skipped)} (index >= num_hidden_layers="
             f"{n_layers}: multi-token prediction modules)")
  return keep


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   rope_interleave: bool = True, key: jax.Array | None = None,
                   fp8_block: tuple[int, int] = (128, 128)) -> dict[str, Any]:
  """The dsax params (numpy, cfg.param_dtype; router f32) of an HF DeepSeek
  state dict. FP8 weights are dequantised, MTP layers skipped, the rope rows
  permuted when ``rope_interleave`` is False; without indexer tensors the
  indexer is initialised from ``key`` (default PRNGKey(0))."""
  tensors = _drop_mtp(dequantize_fp8(tensors, fp8_block), cfg.n_layers)
  specs = P.param_specs(cfg)
  has_indexer = any(".self_attn.indexer." in n for n in tensors)
  entries = _entries(cfg, has_indexer)
  _check_names(tensors, {e[0] for e in entries}, cfg)
  out = jax.tree.map(
      lambda s: np.empty(s.shape, np.dtype(s.dtype or cfg.param_dtype)),
      specs, is_leaf=lambda x: isinstance(x, P.ParamSpec))
  for name, path, idx, in_axes in entries:
    arr = _get(out, path)
    shape = arr.shape[len(idx):]
    w = np.asarray(tensors[name])
    if w.shape != _hf_shape(shape, in_axes):
      raise ModelFileError(f"shape {w.shape}, the config implies "
                           f"{_hf_shape(shape, in_axes)}", tensor=name)
    arr[idx] = (w.T if in_axes else w).reshape(shape)
  if not rope_interleave:
    _permute_rope(out["layers"]["attn"], cfg,
                  rope_permutation(cfg.qk_rope_head_dim))
  if not has_indexer:
    log.info("no indexer in the checkpoint: a fresh one is initialised")
    key = jax.random.PRNGKey(0) if key is None else key
    out["layers"]["indexer"] = jax.tree.map(np.asarray, P.init_specs(
        specs["layers"]["indexer"], key, cfg.param_dtype))
  return out


def to_hf(cfg: ModelConfig, params: dict[str, Any],
          model_type: str | None = None, rope_interleave: bool = True):
  """(HF config dict, HF state dict of numpy arrays) of a dsax MLA model.
  ``model_type`` None: ``default_model_type``; deepseek_v2/v3 leave the
  indexer out. The router (and its bias) are written in f32."""
  hf = hf_config_from(cfg, model_type, rope_interleave)
  params = jax.tree.map(np.asarray, params)
  if not rope_interleave:
    attn = {k: np.array(v) for k, v in params["layers"]["attn"].items()}
    _permute_rope(attn, cfg, np.argsort(rope_permutation(
        cfg.qk_rope_head_dim)))
    params = dict(params, layers=dict(params["layers"], attn=attn))
  tensors = {}
  for name, path, idx, in_axes in _entries(
      cfg, hf["model_type"] == "deepseek_v32"):
    w = _get(params, path)[idx]
    hf_shape = _hf_shape(w.shape, in_axes)
    w = w.reshape(hf_shape[::-1]).T if in_axes else w.reshape(hf_shape)
    tensors[name] = np.ascontiguousarray(w)
  return hf, tensors
