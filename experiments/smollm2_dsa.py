"""SmolLM2-135M-Instruct -> DeepSeek Sparse Attention at 4K context.

The imported dense model (``original``, 0 steps: its parameters as prepared,
with a fresh lightning indexer) -> dense indexer warm-up (``warmup``: main
attention dense, only the indexer trains, KL to the dense attention) -> sparse
training (``sparse``: top-k attention, all parameters; the indexer on the
sparse KL) -> the dense control (``dense``: 0 steps = the dense original;
``--set phases.dense.steps=N`` trains a dense control on the sparse phase's
data instead) -> the held-out comparison and the sparse-vs-dense eval report
(eval/report.md). Data: the CPython standard library plus the natural English
text ``prepare`` writes (natural.jsonl), SmolLM2's own tokenizer.

  python launch.py prepare smollm2                 # once: the model directory
  python launch.py experiments/smollm2_dsa.py      # the run (GPU recommended)
  python launch.py experiments/smollm2_dsa.py:cpu  # 2+2 steps, batch 1, f32
  python launch.py experiments/smollm2_dsa.py:test # tiny random GQA, no files

GPU sizing (default): batch 8 x 4096 tokens, bf16 matmuls on f32 parameters
(updates of a few 1e-6 vanish in bf16), top-k 512 (1/8 of the context; the
paper keeps 2048 of 128K), warm-up 500 steps at lr 1e-3 (the paper's), sparse
1000 steps at lr 1e-5 for the model and 1e-4 for the indexer.
"""

from __future__ import annotations

import dataclasses
import os

from dsax.config import (ConfigError, DataConfig, EvalConfig,
                         ExperimentConfig, IndexerConfig, ModelConfig,
                         OptimConfig, PhaseConfig)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "work", "models", "smollm2-135m-instruct")


def smollm2_model(model_dir: str = MODEL_DIR) -> ModelConfig:
  """The prepared model's config (model_config.json), else the same numbers
  (so --dry-run works before ``prepare``)."""
  from dsax import hf  # pylint: disable=import-outside-toplevel
  from dsax.hf import gguf  # pylint: disable=import-outside-toplevel
  if os.path.isfile(os.path.join(model_dir, "model_config.json")):
    return hf.read_converted(model_dir)
  return ModelConfig(
      attention_type="gqa", vocab_size=49152, d_model=576, n_layers=30,
      n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536, tie_embeddings=True,
      rope_theta=100000.0, norm_eps=1e-5, indexer=gguf.SMOLLM2_INDEXER)


def phases(warmup: int, sparse: int, init_from: str) -> tuple:
  def const(lr, warm):  # a constant rate after a linear lr warm-up
    return OptimConfig(lr=lr, lr_warmup_steps=warm, schedule="constant")
  return (
      PhaseConfig(name="original", kind="pretrain", steps=0,
                  init_from=init_from),
      # The paper's warm-up: lr 1e-3, main attention dense, indexer only.
      PhaseConfig(name="warmup", kind="warmup", steps=warmup,
                  optim=const(1e-3, min(10, warmup))),
      # A pretrained model: a small lr for the model (the paper: 7.3e-6),
      # the indexer keeps learning faster on its sparse KL.
      PhaseConfig(name="sparse", kind="sparse", steps=sparse,
                  optim=const(1e-5, min(20, sparse)),
                  indexer_optim=const(1e-4, min(20, sparse))),
      PhaseConfig(name="dense", kind="pretrain", steps=0,
                  optim=const(1e-5, min(20, sparse)),
                  init_from="original", data_from="sparse"),
  )


def get_config(arg=None) -> ExperimentConfig:
  if arg == "test":
    return _test_config()
  if arg not in (None, "cpu"):
    raise ConfigError(f"smollm2_dsa: ARG must be empty, 'cpu' or 'test', "
                     f"got {arg!r}")
  cpu = arg == "cpu"
  model = smollm2_model()
  model = dataclasses.replace(
      model, compute_dtype="float32" if cpu else "bfloat16",
      kernel_impl="reference" if cpu else "auto", attn_q_chunk=512,
      # Small sparse chunks keep the gathered rows in cache on a CPU.
      indexer=dataclasses.replace(model.indexer, topk=512,
                                  q_chunk=64 if cpu else 256))
  data = DataConfig(
      source="stdlib", paths=(os.path.join(MODEL_DIR, "natural.jsonl"),),
      tokenizer="file:" + os.path.join(MODEL_DIR, "tokenizer.json"),
      seq_len=4096, batch_size=1 if cpu else 8, val_fraction=0.02, seed=0)
  return ExperimentConfig(
      name="smollm2_dsa_cpu" if cpu else "smollm2_dsa", model=model,
      data=data, phases=phases(2 if cpu else 500, 2 if cpu else 1000,
                               os.path.join(MODEL_DIR, "params")),
      control="dense",
      eval=EvalConfig(every=0 if cpu else 100, batches=2 if cpu else 4,
                      final_batches=2 if cpu else 16),
      log_every=1 if cpu else 10, save_every=0 if cpu else 250,
      compare=not cpu, report=not cpu)


def _test_config() -> ExperimentConfig:
  """The same phases on a tiny random GQA model, bytes, a few stdlib files:
  what CI runs (tests/test_smollm2_experiment.py)."""
  model = ModelConfig(
      attention_type="gqa", vocab_size=256, d_model=32, n_layers=2, n_heads=4,
      n_kv_heads=2, head_dim=8, d_ff=64, tie_embeddings=True,
      rope_theta=100000.0, norm_eps=1e-5, attn_q_chunk=32,
      indexer=IndexerConfig(n_heads=2, head_dim=16, rope_dim=8, topk=16,
                            q_chunk=32))
  data = DataConfig(source="stdlib", tokenizer="bytes", seq_len=64,
                    batch_size=2, max_docs=12, val_fraction=0.25)
  # The tiny "original" is a random init (no init_from).
  return ExperimentConfig(
      name="smollm2_dsa_test", model=model, data=data,
      phases=phases(2, 2, ""), control="dense",
      eval=EvalConfig(every=0, batches=1, final_batches=1), log_every=1,
      save_every=0, compare=True, report=False)
