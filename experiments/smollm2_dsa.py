"""SmolLM2-135M-Instruct -> DeepSeek Sparse Attention, and its results page.

The imported dense model (``original``, 0 steps: its parameters as prepared,
with a fresh lightning indexer) -> dense indexer warm-up (``warmup``: main
attention dense, only the indexer trains, KL to the dense attention) -> sparse
training (``sparse``: top-k attention, all parameters; the indexer on the
sparse KL) [-> ``sparse_lm``: the same from the warm-up, the indexer trained
by the LM loss through the router-style gate] -> the dense control
(``dense``: from ``original``, the sparse phase's data and steps). Data: the
CPython standard library plus the natural English text ``prepare`` writes
(natural.jsonl), SmolLM2's own tokenizer.

  python launch.py prepare smollm2                  # once: the model directory
  python experiments/smollm2_dsa.py                 # CPU: train, evaluate, page
  python launch.py experiments/smollm2_dsa.py       # the GPU-sized run
  python launch.py experiments/smollm2_dsa.py:cpu   # the CPU run's training only
  python launch.py experiments/smollm2_dsa.py:test  # tiny random GQA, no files

Run as a script it trains the ``cpu`` variant (T = 2048, k = 128, batch 1,
f32; resumable: rerun the same command), evaluates every row of the page
(each finished row is kept under WORKDIR/page, so a killed evaluation resumes
too) and writes docs/results/smollm2_dsa_cpu.md with its PNGs.

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


def phases(warmup: int, sparse: int, init_from: str,
           router: bool = False) -> tuple:
  """original -> warmup -> sparse (indexer on its KL) [-> sparse_lm: the
  same steps from the warm-up with the indexer trained by the LM loss
  through the router-style gate] -> dense (the control, from original, on
  the sparse phase's data)."""
  def const(lr, warm):  # a constant rate after a linear lr warm-up
    return OptimConfig(lr=lr, lr_warmup_steps=warm, schedule="constant")
  sparse_optim = dict(optim=const(1e-5, min(20, sparse)),
                      indexer_optim=const(1e-4, min(20, sparse)))
  lm = (PhaseConfig(name="sparse_lm", kind="sparse", steps=sparse,
                    indexer_grad="lm", init_from="warmup", data_from="sparse",
                    **sparse_optim),) if router else ()
  return (
      PhaseConfig(name="original", kind="pretrain", steps=0,
                  init_from=init_from),
      # The paper's warm-up: lr 1e-3, main attention dense, indexer only.
      PhaseConfig(name="warmup", kind="warmup", steps=warmup,
                  optim=const(1e-3, min(10, warmup))),
      # A pretrained model: a small lr for the model (the paper: 7.3e-6),
      # the indexer keeps learning faster on its sparse KL.
      PhaseConfig(name="sparse", kind="sparse", steps=sparse,
                  **sparse_optim),
  ) + lm + (
      PhaseConfig(name="dense", kind="pretrain", steps=sparse,
                  optim=const(1e-5, min(20, sparse)),
                  init_from="original", data_from="sparse"),
  )


def _real(compute_dtype: str, kernel_impl: str, topk: int, q_chunk: int,
          seq_len: int, batch_size: int, val_fraction: float,
          attn_q_chunk: int = 512):
  """The prepared SmolLM2 with its indexer's k and query chunk, and the
  stdlib + natural-text data under its own tokenizer."""
  model = smollm2_model()
  model = dataclasses.replace(
      model, compute_dtype=compute_dtype, kernel_impl=kernel_impl,
      attn_q_chunk=attn_q_chunk, indexer=dataclasses.replace(
          model.indexer, topk=topk, q_chunk=q_chunk))
  data = DataConfig(
      source="stdlib", paths=(os.path.join(MODEL_DIR, "natural.jsonl"),),
      tokenizer="file:" + os.path.join(MODEL_DIR, "tokenizer.json"),
      seq_len=seq_len, batch_size=batch_size, val_fraction=val_fraction,
      seed=0)
  return model, data


def get_config(arg=None) -> ExperimentConfig:
  if arg == "test":
    return _test_config()
  if arg == "cpu":
    return _cpu_config()
  if arg is not None:
    raise ConfigError(f"smollm2_dsa: ARG must be empty, 'cpu' or 'test', "
                     f"got {arg!r}")
  model, data = _real(compute_dtype="bfloat16", kernel_impl="auto",
                      topk=512, q_chunk=256, seq_len=4096, batch_size=8,
                      val_fraction=0.02)
  return ExperimentConfig(
      name="smollm2_dsa", model=model, data=data,
      phases=phases(500, 1000, os.path.join(MODEL_DIR, "params")),
      control="dense", eval=EvalConfig(every=100, batches=4, final_batches=16),
      log_every=10, save_every=250, compare=True, report=True)


# The CPU experiment (``main``): its step counts fit 90 minutes on 2 cores
# with the page's evaluation (measured: see docs/results/smollm2_dsa_cpu.md).
CPU_WARMUP_STEPS = 200
CPU_SPARSE_STEPS = 10


def _cpu_config() -> ExperimentConfig:
  """T = 2048, k = 128 (T/k = 16), batch 1, f32: the warm-up, sparse
  training with the KL-trained indexer and with the router-style one, and
  the dense control, each sparse phase at equal steps."""
  # Small sparse chunks keep the gathered rows in cache on a CPU; dense
  # blocks of 256 rows (one SmolLM2 layer's dense attention at T = 2048,
  # forward + backward, 2 cores: 221 ms at 256, 333 ms at 512).
  model, data = _real(compute_dtype="float32", kernel_impl="reference",
                      topk=128, q_chunk=64, seq_len=2048, batch_size=1,
                      val_fraction=0.05, attn_q_chunk=256)
  return ExperimentConfig(
      name="smollm2_dsa_cpu", model=model, data=data,
      phases=phases(CPU_WARMUP_STEPS, CPU_SPARSE_STEPS,
                    os.path.join(MODEL_DIR, "params"), router=True),
      control="dense", eval=EvalConfig(every=0, batches=1, final_batches=2),
      log_every=1, save_every=10, compare=False, report=False)


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
      phases=phases(2, 2, "", router=True), control="dense",
      eval=EvalConfig(every=0, batches=1, final_batches=1), log_every=1,
      save_every=0, compare=True, report=False)


def main(argv=None) -> int:
  """Trains the ``cpu`` variant (resumable), evaluates the page's rows and
  writes the page. ``--variant test`` runs the same on the tiny model (the
  smoke test)."""
  import argparse  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ROOT)
  import launch  # pylint: disable=import-outside-toplevel
  from experiments import smollm2_page  # pylint: disable=import-outside-toplevel
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variant", default="cpu", choices=("cpu", "test"))
  ap.add_argument("--workdir", default=None,
                  help="run directory (default work/smollm2_dsa_<variant>)")
  ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results"),
                  help="where the page and its PNGs go")
  ap.add_argument("--set", dest="overrides", action="append", default=[],
                  metavar="KEY=VALUE", help="config override, repeatable")
  args = ap.parse_args(argv)
  workdir = args.workdir or os.path.join("work", f"smollm2_dsa_{args.variant}")
  if args.variant == "cpu" and not os.path.isdir(os.path.join(MODEL_DIR,
                                                              "params")):
    print(f"error: no prepared model at {MODEL_DIR}; run `python launch.py "
          "prepare smollm2` first", file=sys.stderr)
    return 2
  sets = [a for kv in args.overrides for a in ("--set", kv)]
  rc = launch.main([os.path.abspath(__file__) + ":" + args.variant,
                    "--workdir", workdir] + sets)
  if rc:
    return rc
  cfg = get_config(args.variant)
  missing = [p.name for p in cfg.phases
             if not os.path.isdir(os.path.join(workdir, "phases", p.name))]
  if missing:  # a clean interrupt (exit 0) before the last phase ended
    print(f"stopped before phases {missing} ended; rerun the same command "
          "to resume", file=sys.stderr)
    return 0
  command = "python launch.py prepare smollm2 && python " \
            "experiments/smollm2_dsa.py" + "".join(
                f" --set {kv}" for kv in args.overrides)
  smollm2_page.main(workdir, args.out, f"smollm2_dsa_{args.variant}",
                    command, quick=args.variant == "test")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
