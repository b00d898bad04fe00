"""Value checks of config groups that need nothing but the group: the
model (with its indexer, MoE and RoPE scaling), an optimizer group, the
run-level values (logging, checkpoints, eval, mesh, held-out share) and the
finiteness of every float. ``dsax.config`` calls them from ``validate`` and
``ExperimentConfig.check``; each raises ``ConfigError`` naming the dotted key.
Duck-typed on the config dataclasses, so this module imports no config class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dsax.overrides import ConfigError, leaves


def model(cfg: Any) -> None:
  """The model group (``model.*``, indexer, MoE and RoPE scaling included)."""
  positive = ["vocab_size", "d_model", "n_layers", "n_heads", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "d_ff",
              "attn_q_chunk", "lm_loss_chunk", "n_kv_heads", "head_dim",
              "scan_unroll"]
  for name in positive:
    if getattr(cfg, name) <= 0:
      raise ConfigError(f"model.{name} must be > 0, got {getattr(cfg, name)}")
  for name in ("rope_theta", "norm_eps", "init_std"):
    if not getattr(cfg, name) > 0:
      raise ConfigError(f"model.{name} must be > 0, got {getattr(cfg, name)}")
  if cfg.attention_type not in ("mla", "gqa"):
    raise ConfigError(f"model.attention_type must be mla or gqa, "
                      f"got {cfg.attention_type!r}")
  if cfg.attention_type == "gqa" and cfg.n_heads % cfg.n_kv_heads:
    raise ConfigError(f"model.n_kv_heads={cfg.n_kv_heads} must divide "
                      f"model.n_heads={cfg.n_heads}")
  if cfg.head_dim % 2:
    raise ConfigError(f"model.head_dim must be even (RoPE), got {cfg.head_dim}")
  if cfg.q_lora_rank < 0:
    raise ConfigError(f"model.q_lora_rank must be >= 0, got {cfg.q_lora_rank}")
  if cfg.qk_rope_head_dim % 2:
    raise ConfigError(
        f"model.qk_rope_head_dim must be even, got {cfg.qk_rope_head_dim}")
  for name in ("param_dtype", "compute_dtype"):
    if getattr(cfg, name) not in ("float32", "bfloat16"):
      raise ConfigError(f"model.{name} must be float32 or bfloat16, "
                        f"got {getattr(cfg, name)!r}")
  if cfg.kernel_impl not in ("reference", "pallas", "auto"):
    raise ConfigError(f"model.kernel_impl must be reference, pallas or auto, "
                      f"got {cfg.kernel_impl!r}")
  ix = cfg.indexer
  for name in ("n_heads", "head_dim", "topk", "q_chunk"):
    if getattr(ix, name) <= 0:
      raise ConfigError(
          f"model.indexer.{name} must be > 0, got {getattr(ix, name)}")
  if ix.rope_dim % 2 or not 0 <= ix.rope_dim <= ix.head_dim:
    raise ConfigError(f"model.indexer.rope_dim must be even and <= head_dim "
                      f"({ix.head_dim}), got {ix.rope_dim}")
  if ix.hadamard and ix.head_dim & (ix.head_dim - 1):
    raise ConfigError(f"model.indexer.hadamard needs a power-of-two head_dim, "
                      f"got {ix.head_dim}")
  if ix.fp8 and ix.head_dim > 128 and ix.head_dim % 128:
    raise ConfigError(f"model.indexer.fp8 scales 128-vectors: head_dim must be "
                      f"<= 128 or a multiple of 128, got {ix.head_dim}")
  moe(cfg)
  rs = cfg.rope_scaling
  if rs.kind not in ("yarn", "llama3"):
    raise ConfigError(
        f"model.rope_scaling.kind must be yarn or llama3, got {rs.kind!r}")
  if rs.kind == "llama3" and not 0 < rs.low_freq_factor < rs.high_freq_factor:
    raise ConfigError(
        "model.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
        f"{rs.low_freq_factor} and {rs.high_freq_factor}")
  if rs.enabled and rs.factor <= 1.0:
    raise ConfigError(
        f"model.rope_scaling.factor must be > 1 when enabled, got {rs.factor}")


def moe(cfg: Any) -> None:
  m = cfg.moe
  if m.n_routed_experts < 0:
    raise ConfigError(
        f"model.moe.n_routed_experts must be >= 0, got {m.n_routed_experts}")
  if not m.n_routed_experts:
    return
  if not 1 <= m.n_activated <= m.n_routed_experts:
    raise ConfigError(f"model.moe.n_activated must be in [1, n_routed_experts="
                      f"{m.n_routed_experts}], got {m.n_activated}")
  if m.d_expert <= 0 or m.n_shared_experts < 0:
    raise ConfigError(f"model.moe.d_expert must be > 0 and n_shared_experts "
                      f">= 0, got {m.d_expert} and {m.n_shared_experts}")
  if not 0 <= m.first_k_dense < cfg.n_layers:
    raise ConfigError(f"model.moe.first_k_dense must be in [0, n_layers="
                      f"{cfg.n_layers}), got {m.first_k_dense}")
  if m.score_func not in ("softmax", "sigmoid"):
    raise ConfigError(f"model.moe.score_func must be softmax or sigmoid, "
                      f"got {m.score_func!r}")
  methods = ("greedy", "group_limited_greedy", "noaux_tc")
  if m.topk_method not in methods:
    raise ConfigError(f"model.moe.topk_method must be one of {methods}, "
                      f"got {m.topk_method!r}")
  if m.n_group <= 0 or m.n_routed_experts % m.n_group:
    raise ConfigError(f"model.moe.n_group must divide n_routed_experts="
                      f"{m.n_routed_experts}, got {m.n_group}")
  if not 1 <= m.topk_group <= m.n_group:
    raise ConfigError(f"model.moe.topk_group must be in [1, n_group="
                      f"{m.n_group}], got {m.topk_group}")
  per_group = m.n_routed_experts // m.n_group
  if m.topk_method != "greedy" and m.topk_group * per_group < m.n_activated:
    raise ConfigError(f"model.moe.topk_group={m.topk_group} groups of "
                      f"{per_group} experts hold fewer than n_activated="
                      f"{m.n_activated}")
  if m.dispatch not in ("grouped", "dense"):
    raise ConfigError(f"model.moe.dispatch must be grouped or dense, got "
                      f"{m.dispatch!r}")
  if m.topk_method == "noaux_tc" and per_group < 2:
    raise ConfigError(f"model.moe.topk_method=noaux_tc ranks groups by their "
                      f"top-2 scores: n_routed_experts / n_group must be >= 2, "
                      f"got {per_group}")


def optim(o: Any, key: str) -> None:
  """Values of one optimizer group (non-finite ones: ``finite``)."""
  if o.lr <= 0:
    raise ConfigError(f"{key}.lr must be > 0, got {o.lr}")
  if o.lr_warmup_steps < 0:
    raise ConfigError(f"{key}.lr_warmup_steps must be >= 0, "
                      f"got {o.lr_warmup_steps}")
  if o.schedule not in ("cosine", "constant"):
    raise ConfigError(f"{key}.schedule must be cosine or constant, "
                      f"got {o.schedule!r}")
  if not 0 <= o.min_lr_ratio <= 1:
    raise ConfigError(f"{key}.min_lr_ratio must be in [0, 1], "
                      f"got {o.min_lr_ratio}")
  if o.grad_clip <= 0:
    raise ConfigError(f"{key}.grad_clip must be > 0, got {o.grad_clip}")
  if o.weight_decay < 0:
    raise ConfigError(f"{key}.weight_decay must be >= 0, "
                      f"got {o.weight_decay}")
  for name in ("b1", "b2"):
    if not 0 <= getattr(o, name) < 1:
      raise ConfigError(f"{key}.{name} must be in [0, 1), "
                        f"got {getattr(o, name)}")


def finite(cfg: Any, prefix: str = "") -> None:
  """Every float field is a finite number (a NaN or infinite learning rate,
  loss weight or clip norm would only show as a NaN loss mid-run);
  ``prefix``: the dotted key of ``cfg`` in the whole config."""
  for key, value in leaves(cfg, prefix).items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"{key} must be a finite number, got {value}")


def run(cfg: Any) -> None:
  """Logging, checkpoint, eval, mesh and held-out values of a run."""
  if cfg.log_every < 1:
    raise ConfigError(f"log_every must be >= 1, got {cfg.log_every}")
  if cfg.save_every < 0:
    raise ConfigError(f"save_every must be >= 0 (0: at the end of each "
                      f"phase only), got {cfg.save_every}")
  if cfg.keep_checkpoints < 1:
    raise ConfigError(f"keep_checkpoints must be >= 1 (the checkpoint a "
                      f"resume starts from), got {cfg.keep_checkpoints}")
  ev = cfg.eval
  for name, low in (("every", 0), ("batches", 1), ("final_batches", 1),
                    ("seq_len", 0)):
    if getattr(ev, name) < low:
      raise ConfigError(f"eval.{name} must be >= {low}, "
                        f"got {getattr(ev, name)}")
  sizes = dataclasses.asdict(cfg.mesh)
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis} must be >= 1 or -1 (the remaining "
                        f"devices), got {size}")
  if sum(size == -1 for size in sizes.values()) > 1:
    raise ConfigError(f"only one mesh axis may be -1, got {sizes}")
  x = cfg.model.moe.n_routed_experts
  if x and cfg.mesh.expert > 1 and x % cfg.mesh.expert:
    raise ConfigError(f"mesh.expert={cfg.mesh.expert} must divide "
                      f"model.moe.n_routed_experts={x} (each expert shard "
                      "holds the same number of experts)")
  if not 0 < cfg.data.val_fraction < 1:
    raise ConfigError(
        f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}: "
        "a run holds documents out for its held-out evaluation")


def rl(r: Any, key: str) -> None:
  """Values of a grpo phase's ``rl`` group (config.RLConfig)."""
  # pylint: disable=import-outside-toplevel
  from dsax import tasks
  from dsax.rl import rewards
  names = rewards.GENERATED + tuple(tasks.TASKS)
  if r.task not in names:
    raise ConfigError(f"{key}.task={r.task!r} must be one of {names}")
  if not r.ops or set(r.ops) - set("+-*"):
    raise ConfigError(f"{key}.ops={r.ops!r} must be drawn from '+-*'")
  for name, low in (("digits", 1), ("length", 1), ("prompts", 1),
                    ("max_new_tokens", 1), ("epochs", 1), ("top_k", 0),
                    ("eval_prompts", 0), ("eval_samples", 0)):
    if getattr(r, name) < low:
      raise ConfigError(f"{key}.{name} must be >= {low}, "
                        f"got {getattr(r, name)}")
  if r.group_size < 2:
    raise ConfigError(f"{key}.group_size must be >= 2 (a group of one has "
                      f"no advantage), got {r.group_size}")
  if r.temperature < 0:
    raise ConfigError(f"{key}.temperature must be >= 0 (0: greedy), "
                      f"got {r.temperature}")
  if not r.top_p > 0:
    raise ConfigError(f"{key}.top_p must be > 0 (>= 1: off), got {r.top_p}")
  if r.attention not in ("dense", "sparse"):
    raise ConfigError(f"{key}.attention must be dense or sparse, "
                      f"got {r.attention!r}")
  if not 0 <= r.clip_eps < 1:
    raise ConfigError(f"{key}.clip_eps must be in [0, 1), got {r.clip_eps}")
  if r.kl_coef < 0:
    raise ConfigError(f"{key}.kl_coef must be >= 0, got {r.kl_coef}")
  if not r.adv_eps > 0:
    raise ConfigError(f"{key}.adv_eps must be > 0, got {r.adv_eps}")
