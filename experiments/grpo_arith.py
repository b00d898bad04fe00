"""GRPO on 2-digit addition, CPU: a dense MLA policy and its DSA version.

A byte-level MLA model with a lightning indexer is supervised on lines
"Q: 47+85= 132\\n" (one problem per document; the file is generated here,
under work/grpo_arith_data/, without the held-out problems of seeds 0-3):
``pretrain`` (600 steps, 3e-3, cosine) then ``pretrain_more`` (300 steps,
1e-3, cosine), so that its greedy exact-match reward is about 0.25: low,
but most groups of 8 samples hold a correct answer. Then:

  both    pretrain -> pretrain_more -> grpo_dense (dense attention); then,
          from the same pretrained parameters, warmup (indexer only, dense
          attention) -> sparse (top-k attention, all parameters) ->
          grpo_sparse (rl.attention=sparse, top-8 keys of prompts of 9
          bytes + up to 5 answer bytes, index replay on): one pretraining
          per seed
  dense   pretrain -> pretrain_more -> grpo;  sparse  pretrain ->
          pretrain_more -> warmup -> sparse -> grpo
  grpo    grpo_dense and grpo_sparse alone, from copies of a ``both``
          run's pretrain_more and sparse phases (``BASES``/s0; other
          seeds: --set phases.grpo_dense.init_from=... and
          phases.grpo_sparse.init_from=...)
  ablate  one sparse grpo phase (ABLATE_STEPS) from the seed-0 ``both``
          run's sparse phase (``ABLATE_FROM``): the stabiliser sweep's
          base, experiments/grpo_ablation.py
  test    the ``both`` chain with a handful of steps on a width-32 model
          (the smoke test, tests/test_grpo_experiment.py)

Each grpo phase writes eval_reward (greedy answers to ``EVAL_PROMPTS``
held-out problems) and eval_reward_sampled (``EVAL_SAMPLES`` samples of
each at the rollout temperature, the same sampling key every time) at its
start and at its end: the before/after of the report. ``REVERSE`` (answers least significant digit
first) is off: this model did not learn that format in 900 steps
(docs/results/grpo_arith.md).

  for s in 0 1; do python launch.py experiments/grpo_arith.py:both \\
      --set seed=$s --set data.seed=$s --workdir work/grpo_arith/both_s$s; done
  python launch.py --sweep experiments/grpo_ablation.py
  python experiments/grpo_report.py work/grpo_arith \\
      --ablation work/grpo_ablation \\
      --png docs/results/grpo_arith.png           # tables + PNG

The model is MLA (Q 32, C 32, H 16, R 8, E 16), width 96, 2 layers, 4
heads; the indexer 4 heads of dim 32. Pretraining rows are 128 bytes,
batch 16 (about 9 problems a row). keep_routing is a no-op here (no MoE).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from dsax.config import (ConfigError, DataConfig, EvalConfig,
                         ExperimentConfig, IndexerConfig, ModelConfig,
                         OptimConfig, PhaseConfig, RLConfig)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "work", "grpo_arith_data")
# The sweep's starting point: the sparse phase of the seed-0 sparse run.
ABLATE_FROM = os.path.join(ROOT, "work", "grpo_arith", "both_s0", "phases",
                           "sparse")

DIGITS, OPS = 2, "+"
# Answers least significant digit first (" 231" for 47+85): the order in
# which the carries arrive.
REVERSE = False
TRAIN_PROBLEMS = 20000
EVAL_PROMPTS = 256
HELDOUT_SEEDS = (0, 1, 2, 3)   # their held-out problems stay out of the file
ABLATE_STEPS = 20
# GRPO: Adam at 3e-4 after a 10-step warm-up, cosine to 3e-5. At a
# constant 1e-3 the policy collapsed; at 1e-4 for 60 steps it barely moved.
GRPO_LR, GRPO_WARMUP = 1e-4, 10
TOPK = 8                       # < 9 prompt bytes + up to 5 completion bytes
# pretrain (3e-3, cosine) alone left a greedy held-out reward of 0.05-0.09:
# too few groups of 8 samples hold a correct one. pretrain_more (1e-3,
# cosine) brings it to about 0.25.
PRETRAIN_STEPS, PRETRAIN_MORE_STEPS = 600, 300
# Sampling at temperature 1 raised the rollout reward but not the greedy
# held-out reward; at 0.5 the samples are closer to the greedy answer.
SAMPLE_TEMPERATURE = 0.5
WARMUP_STEPS, SPARSE_STEPS, GRPO_STEPS = 60, 60, 150
# eval_reward_sampled: 8 samples of each held-out problem at the rollout's
# temperature (the policy's expected reward, what GRPO raises).
EVAL_SAMPLES = 8
# The grpo variant's bases: BASES/s<seed>/{pretrain_more,sparse}, copies of
# a ``both`` run's phases/ (docs/results/grpo_arith.md, Reproduce).
BASES = os.path.join(ROOT, "work", "grpo_bases")
RL = RLConfig(task="arithmetic", digits=DIGITS, ops=OPS, reverse=REVERSE,
              prompts=16,
              group_size=8, max_new_tokens=5, temperature=SAMPLE_TEMPERATURE,
              kl_coef=0.01, eval_prompts=EVAL_PROMPTS,
              eval_samples=EVAL_SAMPLES)


def heldout_prompts(draw, seeds=HELDOUT_SEEDS,
                    n: int = EVAL_PROMPTS) -> set[str]:
  """The prompts the grpo phases score on for each seed: ``n`` problems
  ``draw(rng)`` from default_rng([seed, HELDOUT_STREAM]), as
  dsax.rl.trainer draws them."""
  from dsax.rl import trainer  # pylint: disable=import-outside-toplevel
  out = set()
  for seed in seeds:
    rng = np.random.default_rng([seed, trainer.HELDOUT_STREAM])
    out.update(draw(rng).prompt for _ in range(n))
  return out


def problem_file(path: str, n: int, draw, held: set[str], text=None) -> str:
  """``path``: a JSONL of ``n`` problems ``draw(rng)`` (seed 12345), one
  document each, skipping the prompts in ``held``; the document is
  ``text(problem, rng)``, by default the prompt, its answer and a newline.
  Written once (atomically), then reused."""
  if os.path.isfile(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(12345)
  lines = []
  while len(lines) < n:
    p = draw(rng)
    if p.prompt in held:
      continue
    doc = text(p, rng) if text else p.prompt + p.data["answer"] + "\n"
    lines.append(json.dumps({"text": doc}))
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)
  return path


def _arith(digits: int, ops: str, reverse: bool):
  from dsax.rl import rewards  # pylint: disable=import-outside-toplevel
  return lambda rng: rewards.arithmetic(rng, digits, ops, reverse)


def heldout_lines(seeds=HELDOUT_SEEDS, n: int = EVAL_PROMPTS,
                  digits: int = DIGITS, ops: str = OPS,
                  reverse: bool = REVERSE) -> set[str]:
  """The arithmetic prompts the grpo phases score eval_reward on."""
  return heldout_prompts(_arith(digits, ops, reverse), seeds, n)


def data_file(n: int = TRAIN_PROBLEMS, digits: int = DIGITS, ops: str = OPS,
              data_dir: str | None = None, reverse: bool = REVERSE) -> str:
  """A JSONL of ``n`` problems with their answers, one document each
  ("Q: 47+85= 132\\n"), without the held-out prompts."""
  name = f"arith_d{digits}_{''.join('asm'['+-*'.index(o)] for o in ops)}" \
         f"{'_rev' if reverse else ''}_{n}.jsonl"
  return problem_file(os.path.join(data_dir or DATA_DIR, name), n,
                      _arith(digits, ops, reverse),
                      heldout_lines(digits=digits, ops=ops, reverse=reverse))


def data_config(path: str, test: bool) -> DataConfig:
  """One problem per document from ``path``, bytes, rows of 128 (64 for the
  smoke test), batch 16 (4)."""
  return DataConfig(source="files", paths=(path,), tokenizer="bytes",
                    seq_len=64 if test else 128,
                    batch_size=4 if test else 16, val_fraction=0.02)


def model_config(d_model: int = 96, n_layers: int = 2) -> ModelConfig:
  return ModelConfig(
      vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=4,
      q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
      qk_rope_head_dim=8, v_head_dim=16, d_ff=4 * d_model, attn_q_chunk=64,
      indexer=IndexerConfig(n_heads=4, head_dim=32, rope_dim=16, topk=TOPK,
                            q_chunk=32))


def const(lr: float, warm: int) -> OptimConfig:
  return OptimConfig(lr=lr, lr_warmup_steps=warm, schedule="constant")


def grpo_optim(steps: int) -> OptimConfig:
  return OptimConfig(lr=GRPO_LR, lr_warmup_steps=min(GRPO_WARMUP, steps),
                     schedule="cosine")


def phases(variant: str, pretrain: int, more: int, warmup: int, sparse: int,
           grpo: int, rl: RLConfig = RL) -> tuple:
  """dense: pretrain -> pretrain_more -> grpo; sparse: pretrain ->
  pretrain_more -> warmup -> sparse -> grpo (sparse); both: pretrain ->
  pretrain_more -> grpo_dense, then from the same pretrained parameters
  warmup -> sparse -> grpo_sparse (one pretraining per seed)."""
  pre = (PhaseConfig(name="pretrain", kind="pretrain", steps=pretrain,
                     optim=OptimConfig(lr=3e-3, lr_warmup_steps=min(
                         20, pretrain))),
         PhaseConfig(name="pretrain_more", kind="pretrain", steps=more,
                     optim=OptimConfig(lr=1e-3, lr_warmup_steps=min(
                         10, more))))
  dense = PhaseConfig(name="grpo", kind="grpo", steps=grpo, rl=rl,
                      optim=grpo_optim(grpo))
  dsa = (
      PhaseConfig(name="warmup", kind="warmup", steps=warmup,
                  optim=const(1e-3, min(5, warmup))),
      PhaseConfig(name="sparse", kind="sparse", steps=sparse,
                  optim=const(3e-4, min(5, sparse)),
                  indexer_optim=const(1e-3, min(5, sparse))),
      PhaseConfig(name="grpo", kind="grpo", steps=grpo,
                  optim=grpo_optim(grpo),
                  rl=dataclasses.replace(rl, attention="sparse")),
  )
  if variant == "dense":
    return pre + (dense,)
  if variant == "sparse":
    return pre + dsa
  return pre + (dataclasses.replace(dense, name="grpo_dense"),
                dataclasses.replace(dsa[0], init_from="pretrain_more"),
                dsa[1], dataclasses.replace(dsa[2], name="grpo_sparse"))


def get_config(arg=None) -> ExperimentConfig:
  variants = ("both", "dense", "sparse", "ablate", "grpo", "test")
  if arg not in variants:
    raise ConfigError(f"grpo_arith: ARG must be one of {variants}, "
                      f"got {arg!r}")
  test = arg == "test"
  data = data_config(data_file(400 if test else TRAIN_PROBLEMS), test)
  model = model_config(32 if test else 96)
  if test:  # the ``both`` chain, a few steps of each phase
    rl = dataclasses.replace(RL, prompts=2, group_size=2, eval_prompts=8)
    ph = phases("both", 4, 2, 2, 2, 2, rl)
  elif arg == "ablate":
    ph = (PhaseConfig(name="grpo", kind="grpo", steps=ABLATE_STEPS,
                      optim=grpo_optim(ABLATE_STEPS), init_from=ABLATE_FROM,
                      rl=dataclasses.replace(RL, attention="sparse")),)
  elif arg == "grpo":  # the two grpo phases of ``both``, from its bases
    _, _, dense, _, _, sparse = phases("both", 0, 0, 0, 0, GRPO_STEPS)
    base = os.path.join(BASES, "s0")  # --set ...init_from= for other seeds
    ph = (dataclasses.replace(dense, init_from=os.path.join(
              base, "pretrain_more")),
          dataclasses.replace(sparse, init_from=os.path.join(base, "sparse")))
  else:
    ph = phases(arg, PRETRAIN_STEPS, PRETRAIN_MORE_STEPS, WARMUP_STEPS,
                SPARSE_STEPS, GRPO_STEPS)
  return ExperimentConfig(
      name=f"grpo_arith_{arg}", model=model, data=data, phases=ph,
      eval=EvalConfig(every=0, batches=1, final_batches=1),
      log_every=1 if test else 5, save_every=0, compare=False)
