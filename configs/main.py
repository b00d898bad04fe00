"""The main job: pretrain -> indexer warm-up -> sparse training on the CPython
standard library (bytes), plus a dense control trained on the same data, then
the held-out comparison (summary.json, comparison.txt).

  python launch.py main                      # the built-in default, CPU
  python launch.py main --set data.seq_len=4096 --set model.indexer.topk=256

Sized to finish in about 10 minutes on a 2-core CPU; ARG "full" gives a larger
model and longer phases for an accelerator.
"""

from dsax.config import (ConfigError, DataConfig, EvalConfig,
                         ExperimentConfig, IndexerConfig, ModelConfig,
                         OptimConfig, PhaseConfig)


def get_config(arg=None) -> ExperimentConfig:
  if arg not in (None, "full"):
    raise ConfigError(f"main: ARG must be empty or 'full' (main:full), "
                      f"got {arg!r}")
  full = arg == "full"
  seq_len = 4096 if full else 1024
  topk = 256 if full else 128
  model = ModelConfig(
      vocab_size=256, d_model=256 if full else 128, n_layers=4, n_heads=4,
      q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
      qk_rope_head_dim=16, v_head_dim=32, d_ff=704 if full else 352,
      attn_q_chunk=256,
      # Four layers unrolled: on this CPU the rolled scan made the warm-up
      # step 7% and the sparse step 3-13% slower (experiments/bench_train.py
      # --set model.scan_unroll=1); compile time is small at this depth.
      scan_unroll=4,
      # Small sparse chunks keep the gathered rows in cache: on this CPU
      # q_chunk 16 made the sparse step 2.25x faster than 256
      # (experiments/bench_train.py --set model.indexer.q_chunk=16).
      indexer=IndexerConfig(n_heads=4, head_dim=32, rope_dim=16, topk=topk,
                            q_chunk=16))
  scale = 10 if full else 1

  def const(lr):  # a constant rate after 5 steps of linear lr warm-up
    return OptimConfig(lr=lr, lr_warmup_steps=5, schedule="constant")

  phases = (
      PhaseConfig(name="pretrain", kind="pretrain", steps=60 * scale,
                  optim=OptimConfig(lr=3e-3, lr_warmup_steps=20)),
      # The paper's warm-up: lr 1e-3, main attention dense, indexer only.
      PhaseConfig(name="warmup", kind="warmup", steps=30 * scale,
                  optim=const(1e-3)),
      PhaseConfig(name="sparse", kind="sparse", steps=15 * scale,
                  optim=const(3e-4), indexer_optim=const(1e-3)),
      # The dense control: the same base, steps, data and lr, dense attention.
      PhaseConfig(name="dense", kind="pretrain", steps=15 * scale,
                  optim=const(3e-4), init_from="pretrain", data_from="sparse"),
  )
  return ExperimentConfig(
      name="main_full" if full else "main", model=model,
      data=DataConfig(source="stdlib", tokenizer="bytes", seq_len=seq_len,
                      batch_size=4, val_fraction=0.02, seed=0),
      phases=phases, control="dense",
      eval=EvalConfig(every=0, batches=2, final_batches=4),
      log_every=10, save_every=50, report=True)
