"""DeepSeek-V2-Lite's shape, scaled down to a CPU, on a simulated mesh with
every parallel axis in use: data 2 x fsdp 2 x expert 2 x sequence 2 (16
devices; four axes of size >= 2 need at least 16).

Kept from V2-Lite (its config.json): MLA without a query latent (q_lora_rank
0), 64 routed experts with 6 active and 2 shared, the first layer dense,
softmax routing, greedy top-k (one group), no renormalisation of the top-k
weights, routed scaling 1. Scaled down: widths, depth, heads, vocabulary
(bytes), context. Phases: the indexer warm-up from a random model, then
sparse training (this checks the mesh path, not what the model learns).

  XLA_FLAGS=--xla_force_host_platform_device_count=16 \\
      python launch.py v2_lite_cpu --workdir work/v2_lite_cpu
  python launch.py v2_lite_cpu:one      # the same on one device
"""

from dsax.config import (ConfigError, DataConfig, EvalConfig,
                         ExperimentConfig, IndexerConfig, MeshConfig,
                         ModelConfig, MoEConfig, OptimConfig, PhaseConfig)


def model_config() -> ModelConfig:
  return ModelConfig(
      vocab_size=256, d_model=64, n_layers=2, n_heads=4, q_lora_rank=0,
      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
      v_head_dim=16, d_ff=96,
      moe=MoEConfig(n_routed_experts=64, n_shared_experts=2, n_activated=6,
                    d_expert=8, first_k_dense=1, score_func="softmax",
                    topk_method="greedy", n_group=1, topk_group=1,
                    norm_topk_prob=False, routed_scaling_factor=1.0),
      indexer=IndexerConfig(n_heads=4, head_dim=16, rope_dim=8, topk=16,
                            q_chunk=32),
      attn_q_chunk=32)


MESHES = {
    None: MeshConfig(data=2, fsdp=2, expert=2, sequence=2, tensor=1),
    "one": MeshConfig(data=1),
}


def get_config(arg=None) -> ExperimentConfig:
  if arg not in MESHES:
    raise ConfigError(f"v2_lite_cpu: ARG must be empty or 'one', got {arg!r}")
  return ExperimentConfig(
      name="v2_lite_cpu", model=model_config(),
      data=DataConfig(source="stdlib", max_docs=16, tokenizer="bytes",
                      seq_len=128, batch_size=8, val_fraction=0.25),
      phases=(
          PhaseConfig(name="warmup", kind="warmup", steps=3,
                      optim=OptimConfig(lr=1e-3, lr_warmup_steps=1,
                                        schedule="constant")),
          PhaseConfig(name="sparse", kind="sparse", steps=3,
                      optim=OptimConfig(lr=1e-3, lr_warmup_steps=1),
                      indexer_optim=OptimConfig(lr=1e-3, lr_warmup_steps=1)),
      ),
      mesh=MESHES[arg],
      eval=EvalConfig(every=0, batches=1, final_batches=1),
      log_every=1, save_every=0, compare=False, report=False)
