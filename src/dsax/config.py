"""The dsax configs: typed, frozen dataclasses, their checks, and overrides.

Configs are frozen dataclasses grouped by concern: ``ModelConfig`` (with
``RopeScaling``, ``IndexerConfig``, ``MoEConfig``), ``DataConfig``,
``PhaseConfig`` (with ``OptimConfig``, ``LossConfig``), ``EvalConfig``,
``MeshConfig``, all in one ``ExperimentConfig``. ``validate`` checks values
that types cannot express (``dsax.config_checks``, ``ExperimentConfig.check``).

``override(cfg, {"a.b": "3"})`` returns a new, validated config; an unknown
key, a value of the wrong type, or an impossible value raises ``ConfigError``
naming the key. The generic machinery (parsing a value into a field's type,
dotted keys through nested dataclasses and named tuple entries, ``to_dict`` /
``from_dict`` / ``dumps``, ``ConfigError``) is ``dsax.overrides``; the names
callers use are re-exported here. Phases are addressed by name or by index:
``phases.warmup.steps=200`` or ``phases.1.steps=200``.

A phase's fields mean something by its kind (``PhaseConfig``,
``PHASE_FIELDS``): a key that means nothing for the kind is an error naming
both. A replaced key (``RENAMED``: ``phases.sparse.lr``) is an error naming
its replacement (``phases.sparse.optim.lr``), from an override or an old
config.json alike.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from dsax import config_checks as checks
from dsax import overrides as dotted
from dsax.overrides import ConfigError, dumps, leaves, to_dict


class DataError(ValueError):
  """A data source is missing, empty, unreadable or malformed (not a bad
  value of a ``data.*`` key, which is a ConfigError); the message names the
  file (and line) or the key. launch.py exits 4 on it."""

__all__ = [
    "ConfigError", "DataConfig", "DataError", "EvalConfig", "ExperimentConfig",
    "INDEXER_GRADS", "IndexerConfig", "LossConfig", "MeshConfig",
    "MoEConfig", "ModelConfig", "OptimConfig", "PHASE_COMMON",
    "PHASE_FIELDS", "PHASE_KINDS", "PHASE_SELECTIONS", "PhaseConfig",
    "RENAMED", "RLConfig", "RopeScaling", "dumps", "from_dict",
    "meaningless", "means_something", "override", "resolve_topk", "to_dict",
    "validate",
]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Context extension of the RoPE frequencies, applied only when ``enabled``.

  ``kind="yarn"`` (DeepSeek-V3's inference code): frequencies below the
  correction range are divided by ``factor`` and the softmax scale is
  multiplied by ``mscale**2`` with ``mscale = 0.1 * mscale_all_dim_coeff *
  ln(factor) + 1``. ``kind="llama3"`` (Llama 3.1): wavelengths longer than
  ``original_max_position / low_freq_factor`` are divided by ``factor``,
  shorter than ``original_max_position / high_freq_factor`` kept, and blended
  in between; the softmax scale is unchanged. See ``dsax.rope``.
  """
  enabled: bool = False
  factor: float = 40.0
  original_max_position: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  kind: str = "yarn"            # "yarn" | "llama3"
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3


@dataclasses.dataclass(frozen=True)
class IndexerConfig:
  """Lightning indexer and top-k selection (DeepSeek-V3.2)."""
  n_heads: int = 4           # I
  head_dim: int = 32         # J
  rope_dim: int = 16         # R_I: first R_I dims of q_I/k_I, half-split RoPE
  topk: int = 64             # k
  hadamard: bool = False     # rotate q_I/k_I by a normalised Hadamard matrix
  fp8: bool = False          # simulate e4m3 quantisation, one scale per 128-vector
  q_chunk: int = 256         # queries per chunk in scores/top-k/sparse attention


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """DeepSeekMoE feed-forward (dsax.moe); n_routed_experts=0: a dense SwiGLU
  in every layer. The first ``first_k_dense`` layers keep the dense MLP
  (width model.d_ff); the others route each token to ``n_activated`` of the
  routed experts (width ``d_expert``) and add the shared experts."""
  n_routed_experts: int = 0    # X; 0 = no MoE
  n_shared_experts: int = 1    # one shared SwiGLU of width n_shared * d_expert
  n_activated: int = 2         # experts per token (HF num_experts_per_tok)
  d_expert: int = 32           # routed expert width (HF moe_intermediate_size)
  first_k_dense: int = 1       # HF first_k_dense_replace
  score_func: str = "softmax"  # "softmax" (V2) | "sigmoid" (V3)
  # "greedy" | "group_limited_greedy" (V2: groups by max score) | "noaux_tc"
  # (V3: groups by the sum of their top-2 biased scores; adds the selection-
  # only bias e_score_correction_bias)
  topk_method: str = "greedy"
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  # "grouped": tokens sorted by expert, one grouped matmul per projection;
  # "dense": every expert on every token (the reference). dsax.moe.
  dispatch: str = "grouped"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer (MLA or GQA attention) with an optional
  lightning indexer. ``attention_type="gqa"`` is the Llama/Qwen2 family:
  n_kv_heads, head_dim and qkv_bias apply, the MLA ranks and dims do not."""
  vocab_size: int = 256
  d_model: int = 64          # D
  n_layers: int = 2          # L
  n_heads: int = 4           # N
  attention_type: str = "mla"  # "mla" | "gqa"
  n_kv_heads: int = 2        # G (gqa): query heads per kv head = N / G
  head_dim: int = 16         # H (gqa): q/k/v head dim, RoPE half-split on all
  qkv_bias: bool = False     # gqa: biases on the q/k/v projections (Qwen2)
  q_lora_rank: int = 32      # Q; 0 = direct query projection (DeepSeek-V2-Lite)
  kv_lora_rank: int = 32     # C
  qk_nope_head_dim: int = 16 # H
  qk_rope_head_dim: int = 8  # R
  v_head_dim: int = 16       # E
  d_ff: int = 128            # F
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  norm_eps: float = 1e-6
  init_std: float = 0.02
  param_dtype: str = "float32"    # "bfloat16" on accelerators
  compute_dtype: str = "float32"  # matmul inputs; softmax and norms are f32
  attn_q_chunk: int = 512         # queries per chunk in dense attention
  lm_loss_chunk: int = 512        # positions per chunk of the LM loss's logits
  remat: bool = False             # rematerialise each layer in the backward
  # Layers per iteration of the layer scan: 1 compiles one body per layer
  # kind (compile time independent of depth); n_layers unrolls fully.
  scan_unroll: int = 1
  # Attention kernels (dsax.kernels): "reference" (jnp), "pallas", or "auto"
  # (pallas on GPU/TPU, reference on CPU); AttentionMode.of defaults to it.
  kernel_impl: str = "reference"
  indexer: IndexerConfig = IndexerConfig()
  moe: MoEConfig = MoEConfig()

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim


def resolve_topk(cfg: ModelConfig, topk: int | None = 0) -> int:
  """The top-k a run uses: ``topk``, or ``cfg.indexer.topk`` when 0/None.
  The one place this default is resolved (phases, modes, evals)."""
  return int(topk or cfg.indexer.topk)


def validate(cfg: Any) -> Any:
  """Checks values that types cannot express; returns cfg unchanged."""
  model = cfg if isinstance(cfg, ModelConfig) else getattr(cfg, "model", None)
  if isinstance(model, ModelConfig):
    checks.finite(model, "model.")
    checks.model(model)
  check = getattr(cfg, "check", None)
  if callable(check):
    check()
  return cfg


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training and held-out text, tokenised and packed (see dsax.data)."""
  source: str = "stdlib"          # "stdlib" | "files" | "hf"
  paths: tuple[str, ...] = ()     # .txt/.jsonl globs (files; stdlib: extra)
  text_field: str = "text"        # JSONL / HF field holding the text
  hf_name: str = ""               # a cached Hugging Face dataset for "hf"
  hf_split: str = "train"
  tokenizer: str = "bytes"        # "bytes" | "bpe" | "file:PATH" (json)
  bpe_vocab_size: int = 4096
  seq_len: int = 1024             # tokens per packed sequence
  batch_size: int = 8
  val_fraction: float = 0.05      # share of documents held out
  max_docs: int = 0               # 0: every document
  seed: int = 0
  retrieval_rate: float = 0.0     # share of sequences that are synthetic tasks
  retrieval_tasks: tuple[str, ...] = ("passkey", "mqar")
  cache_dir: str = ""             # tokenizer cache; "" = <workdir>/cache


PHASE_KINDS = ("pretrain", "warmup", "sparse", "grpo")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW on one parameter group: global-norm clipping, then a linear
  learning-rate warm-up over ``lr_warmup_steps`` (at most the phase's steps)
  into ``schedule``: "constant", or "cosine" decay to ``lr * min_lr_ratio`` at
  the phase's last step. Norms and biases do not decay (train.decayed)."""
  lr: float = 3e-3
  lr_warmup_steps: int = 10
  schedule: str = "cosine"        # "cosine" | "constant"
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  grad_clip: float = 1.0          # per group
  b1: float = 0.9
  b2: float = 0.95


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights of the loss terms (see dsax.train): the LM loss and the sum over
  layers of the indexer KL; MoE load balance as DeepSeek-V3 does it: the
  sequence-wise balance loss (summed over MoE layers, weight alpha; V3 1e-4)
  and the rate gamma of the selection-only router bias update from each
  step's expert load (V3 1e-3; needs model.moe.topk_method=noaux_tc)."""
  lm_weight: float = 1.0
  indexer_weight: float = 1.0
  moe_balance_weight: float = 0.0
  moe_bias_rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """A grpo phase (dsax.rl.trainer; the maths: shared/RL.md). Each step
  draws ``prompts`` problems of ``task``, samples ``group_size``
  completions of at most ``max_new_tokens`` tokens for each with the
  current parameters (``temperature``, ``top_k``, ``top_p``), scores them
  and takes ``epochs`` updates of the GRPO loss on that batch. The
  reference policy is the phase's starting parameters (``init_from``, else
  the previous phase's), frozen. The five stabilisers are switches
  (dsax.rl.grpo.GRPOConfig). ``eval_prompts`` held-out problems are
  answered greedily at the phase's start, every ``eval.every`` steps and at
  its end (``eval_reward``); with ``eval_samples`` > 0 each is also sampled
  that many times as the rollouts are, with a fixed key
  (``eval_reward_sampled``: the policy's expected reward)."""
  task: str = "arithmetic"     # "arithmetic" | "digit_max" | a
                               # dsax.tasks.TASKS name
  digits: int = 2              # arithmetic: d-digit operands; digit_max:
                               # digits in the string
  ops: str = "+"               # arithmetic: operators drawn from "+-*"
  reverse: bool = False        # arithmetic: answers least significant first
  length: int = 256            # retrieval: tokens per example
  prompts: int = 4             # prompts per step
  group_size: int = 4          # G samples per prompt
  max_new_tokens: int = 8      # length cap (EOS: the newline token)
  temperature: float = 1.0     # 0: greedy
  top_k: int = 0               # 0: off
  top_p: float = 1.0           # >= 1: off
  epochs: int = 1              # updates per rollout batch
  attention: str = "dense"     # "dense" | "sparse" (DSA at the phase's topk)
  clip_eps: float = 0.2
  kl_coef: float = 0.01
  std_normalise: bool = True
  adv_eps: float = 1e-6
  unbiased_kl: bool = True
  seq_mask: bool = True
  seq_mask_delta: float = 0.5
  keep_routing: bool = True
  keep_sampling_mask: bool = True
  index_replay: bool = True
  eval_prompts: int = 0        # held-out problems (0: no eval_reward)
  eval_samples: int = 0        # samples per held-out problem at the rollout's
                               # temperature/top_k/top_p (eval_reward_sampled;
                               # 0: off)


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
  """One phase of a run: its own steps, optimizers and losses, by kind.

  kind (fields that mean something for it; name, kind, steps, init_from and
  data_from mean something for every kind):
    pretrain  dense attention; the ``trainable`` parameters learn
              ``loss.lm_weight`` x the LM loss with ``optim``. Fields:
              trainable, optim, loss.lm_weight. No topk: a pretrain phase
              runs and evaluates dense attention only (dsax.evals measures
              its indexer's recall at its own k).
    warmup    dense attention; only the ``indexer_trainable`` parameters learn,
              ``loss.indexer_weight`` x the KL to the dense attention, with
              ``optim`` (the only group); the LM loss is reported. Fields:
              indexer_trainable, optim, loss.indexer_weight, topk (the k of
              the recall metrics).
    sparse    top-``topk`` attention; the ``trainable`` (main) parameters learn
              the LM loss with ``optim``, the ``indexer_trainable`` ones the
              sparse KL with ``indexer_optim``; the indexer's inputs are
              detached. ``selection`` picks each query's keys: "indexer"
              (DSA), or a baseline: "local" (the first ``sinks`` keys of
              the segment plus the most recent ones, ``sinks`` counted in
              k) or "oracle" (the top-k of the dense attention); with a
              baseline the KL still trains the indexer on the selected
              set. ``indexer_grad``: "kl" (the KL only), "lm" (the LM loss
              through the router-style gate only, dsax.dsa.gate_delta; the
              KL is reported, not trained on) or "both". Fields: all but
              rl.
    grpo      RL post-training (``rl``, RLConfig; dsax.rl.trainer): the
              ``trainable`` parameters learn the GRPO loss on sampled
              completions with ``optim``; ``rl.attention="sparse"`` samples
              and trains with top-``topk`` DSA. Fields: trainable, optim,
              topk, rl. No data stream is read.
  A field that means nothing for the kind is refused: a dotted override of it
  (whatever the value; judged against the phase's kind after every override of
  the command, so ``phases.x.kind=sparse`` may come before or after
  ``phases.x.indexer_optim.lr=...``), and a config that sets it to anything
  but its default (``ExperimentConfig.check``).
  topk: 0 = model.indexer.topk. init_from: "" = the previous phase's
  parameters; a phase name of this run; or a checkpoint directory. data_from:
  "" = continue the data stream; a phase name = replay the data that phase
  started from (a fair control).
  """
  name: str = "pretrain"
  kind: str = "pretrain"
  steps: int = 100
  trainable: str = r"^(?!layers/indexer/)"   # path regex of the main group
  indexer_trainable: str = r"^layers/indexer/"
  optim: OptimConfig = OptimConfig()         # the main group, or warmup's only
  indexer_optim: OptimConfig = OptimConfig(lr=1e-3)  # sparse: the indexer's
  loss: LossConfig = LossConfig()
  topk: int = 0                   # 0: model.indexer.topk
  selection: str = "indexer"      # sparse: "indexer" | "local" | "oracle"
  sinks: int = 4                  # sparse, selection="local": sinks in k
  indexer_grad: str = "kl"        # sparse: "kl" | "lm" | "both"
  rl: RLConfig = RLConfig()       # grpo
  init_from: str = ""
  data_from: str = ""


# The PhaseConfig fields (dotted below the phase) each kind gives a meaning.
PHASE_COMMON = ("name", "kind", "steps", "init_from", "data_from")
PHASE_FIELDS = {
    "pretrain": ("trainable", "optim", "loss.lm_weight",
                 "loss.moe_balance_weight", "loss.moe_bias_rate"),
    "warmup": ("indexer_trainable", "optim", "loss.indexer_weight", "topk"),
    "sparse": ("trainable", "indexer_trainable", "optim", "indexer_optim",
               "loss.lm_weight", "loss.indexer_weight", "topk", "selection",
               "sinks", "indexer_grad", "loss.moe_balance_weight",
               "loss.moe_bias_rate"),
    "grpo": ("trainable", "optim", "topk", "rl"),
}
# Values of the sparse phase's selection and indexer-gradient fields
# (dsax.attention.AttentionMode: selection, indexer_gate).
PHASE_SELECTIONS = ("indexer", "local", "oracle")
INDEXER_GRADS = ("kl", "lm", "both")

# Keys that were replaced (dotted below the class): old -> new.
RENAMED = {
    "PhaseConfig": {
        **{k: "optim." + k for k in ("lr", "schedule", "min_lr_ratio",
                                      "weight_decay", "grad_clip", "b1",
                                      "b2")},
        "warmup_steps": "optim.lr_warmup_steps",
        "indexer_lr": "indexer_optim.lr",
        "lm_weight": "loss.lm_weight",
        "indexer_weight": "loss.indexer_weight",
    },
    "OptimConfig": {"warmup_steps": "lr_warmup_steps"},
}


def means_something(kind: str, field: str) -> bool:
  """Whether a PhaseConfig field (dotted: ``optim.lr``) has a meaning in a
  phase of ``kind`` (unknown kinds: every field, check() names the kind)."""
  if kind not in PHASE_FIELDS:
    return True
  return any(field == f or field.startswith(f + ".")
             for f in PHASE_COMMON + PHASE_FIELDS[kind])


def meaningless(key: str, kind: str, value: str) -> str:
  """The error for ``key=value`` that means nothing for a phase's kind."""
  uses = ", ".join(PHASE_FIELDS[kind])
  return (f"{key}={value} means nothing for a {kind} phase "
          f"(kind={kind}): a {kind} phase uses {uses} (and "
          f"{', '.join(PHASE_COMMON)})")


def _check_phase_fields(p: PhaseConfig, key: str) -> None:
  """A field that means nothing for the phase's kind keeps its default."""
  default = leaves(PhaseConfig())
  for field, value in leaves(p).items():
    if value != default[field] and not means_something(p.kind, field):
      raise ConfigError(meaningless(f"{key}.{field}", p.kind, repr(value)))


def _check_phase_values(p: PhaseConfig, key: str) -> None:
  """The values of one phase that need no other part of the config."""
  if p.steps < 0:
    raise ConfigError(f"{key}.steps must be >= 0, got {p.steps}")
  if p.topk < 0:
    raise ConfigError(f"{key}.topk must be >= 0 (0: model.indexer.topk), "
                      f"got {p.topk}")
  for group in ("optim", "indexer_optim"):
    checks.optim(getattr(p, group), f"{key}.{group}")
  for name in ("lm_weight", "indexer_weight", "moe_balance_weight",
               "moe_bias_rate"):
    if getattr(p.loss, name) < 0:
      raise ConfigError(f"{key}.loss.{name} must be >= 0, "
                        f"got {getattr(p.loss, name)}")
  for field in ("trainable", "indexer_trainable"):
    rx = getattr(p, field)
    if not rx and means_something(p.kind, field):
      raise ConfigError(f"{key}.{field} is empty: an empty regex matches "
                        "every parameter; name the ones to train (default "
                        f"{getattr(PhaseConfig(), field)!r})")
    try:
      re.compile(rx)
    except re.error as e:
      raise ConfigError(f"{key}.{field}: bad regex ({e})") from None
  if p.selection not in PHASE_SELECTIONS:
    raise ConfigError(f"{key}.selection={p.selection!r} must be one of "
                      f"{PHASE_SELECTIONS}")
  if p.indexer_grad not in INDEXER_GRADS:
    raise ConfigError(f"{key}.indexer_grad={p.indexer_grad!r} must be "
                      f"one of {INDEXER_GRADS}")
  if p.kind == "grpo":
    checks.rl(p.rl, f"{key}.rl")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation during and after training."""
  every: int = 50                 # steps between held-out evals (0: never)
  batches: int = 4                # held-out batches per eval
  final_batches: int = 8          # held-out batches for the final comparison
  seq_len: int = 0                # 0: data.seq_len


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (dsax.sharding); -1 takes the remaining devices. data and
  fsdp split the batch rows (fsdp also the parameters), expert the batch rows
  and the routed MoE experts (expert parallelism), sequence the positions of
  each row (context parallelism), tensor the heads and widths."""
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  sequence: int = 1


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  name: str = "experiment"
  seed: int = 0
  workdir: str = ""               # "" = work/<name>
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  phases: tuple[PhaseConfig, ...] = (PhaseConfig(),)
  eval: EvalConfig = EvalConfig()
  mesh: MeshConfig = MeshConfig()
  log_every: int = 10
  save_every: int = 100           # steps between checkpoints (0: phase ends)
  keep_checkpoints: int = 2
  control: str = ""               # a dense phase compared with the sparse one
  compare: bool = True            # held-out comparison and summary.json
  report: bool = False            # then dsax.evals' quick report in eval/

  def check(self) -> None:
    names = [p.name for p in self.phases]
    if not names:
      raise ConfigError("phases is empty: a run needs at least one phase")
    if len(set(names)) != len(names):
      raise ConfigError(f"phases: names must be unique, got {names}")
    checks.finite(self)
    checks.run(self)
    import os
    for i, p in enumerate(self.phases):
      key = f"phases.{p.name}"
      if p.kind not in PHASE_KINDS:
        raise ConfigError(f"{key}.kind must be one of {PHASE_KINDS}, "
                          f"got {p.kind!r}")
      _check_phase_fields(p, key)
      _check_phase_values(p, key)
      if p.init_from and p.init_from not in names[:i] and not os.path.isdir(
          p.init_from):
        raise ConfigError(f"{key}.init_from={p.init_from!r} is neither an "
                          f"earlier phase {names[:i]} nor a checkpoint "
                          "directory")
      if p.data_from and p.data_from not in names:
        raise ConfigError(f"{key}.data_from={p.data_from!r} is not a phase "
                          f"of this run {names}")
      if p.loss.moe_bias_rate and self.model.moe.topk_method != "noaux_tc":
        raise ConfigError(
            f"{key}.loss.moe_bias_rate={p.loss.moe_bias_rate} updates the "
            "selection-only router bias, which only model.moe.topk_method="
            f"noaux_tc has (got {self.model.moe.topk_method!r}); set it to 0")
      k = resolve_topk(self.model, p.topk)
      if p.sinks < 0 or (p.selection == "local" and p.sinks >= k):
        raise ConfigError(f"{key}.sinks={p.sinks} must be >= 0 and, with "
                          f"selection='local', < topk={k} (the sinks are "
                          "counted inside k)")
      if p.kind == "sparse" and k >= self.data.seq_len:
        what = (f"{key}.topk={k}" if p.topk else
                f"model.indexer.topk={k} (the top-k of {key}, whose topk "
                "is 0)")
        raise ConfigError(
            f"{what} must be smaller than data.seq_len={self.data.seq_len} "
            "in a sparse phase, else nothing is sparse")
    if self.control and self.control not in names:
      raise ConfigError(f"control={self.control!r} is not a phase {names}")
    if self.data.seq_len <= 0 or self.data.batch_size <= 0:
      raise ConfigError("data.seq_len and data.batch_size must be > 0")
    if self.model.vocab_size < 256 and self.data.tokenizer == "bytes":
      raise ConfigError(f"model.vocab_size={self.model.vocab_size} is below "
                        "256, the bytes tokenizer's vocabulary")


# ----------------------------------------------------------------- overrides


def _phase_index(cfg: Any, parts: list[str], full: str) -> int | None:
  """The phase a key ``phases.<name|index>.<field>`` of an experiment
  addresses, or None for any other key."""
  phases = getattr(cfg, "phases", None)
  if (parts[0] != "phases" or len(parts) < 3 or not isinstance(phases, tuple)
      or not all(isinstance(p, PhaseConfig) for p in phases)):
    return None
  return dotted.entry(phases, parts[1], full)


def override(cfg: Any, overrides: dict[str, Any] | list[str] | None) -> Any:
  """Applies dotted overrides (a dict, or ``["a.b=v", ...]``) and validates.

  A replaced key (``RENAMED``) is refused naming its replacement. A phase key
  that means nothing for its phase's kind (``PHASE_FIELDS``) is refused
  whatever its value; the kind is the one after every override, so the order
  of a ``phases.x.kind=...`` override and the keys it gives a meaning to does
  not matter.
  """
  if not overrides:
    return validate(cfg)
  touched = []
  for key, value in dotted.pairs(overrides).items():
    parts = key.split(".")
    index = _phase_index(cfg, parts, key)  # before a rename of the phase
    cfg = dotted.apply(cfg, key, value, RENAMED)
    if index is not None:
      touched.append((key, index, ".".join(parts[2:]), value))
  for key, index, field, value in touched:
    kind = cfg.phases[index].kind
    if not means_something(kind, field):
      raise ConfigError(meaningless(key, kind, value))
  return validate(cfg)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
  """Inverse of ``to_dict`` for a dataclass type; unknown keys are errors
  (a replaced key's names its replacement, from ``RENAMED``). ``prefix``: the
  dotted key of ``data`` in the whole config, for the messages."""
  return dotted.from_dict(cls, data, prefix, RENAMED)
