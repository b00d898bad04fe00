"""GRPO on the largest digit, CPU: a dense MLA policy and its DSA version.

The task (``rl.task="digit_max"``): ``M: 382719=`` -> `` 9``, the largest
of six random digits, exact-match reward on held-out strings (10^6 of them,
so the held-out prompts are new).

The base policy is supervised on a file in which only ``MAX_SHARE`` of the
answers are the largest digit; the others are the smallest
(``M: 382719= 1``). The supervised model so knows both behaviours and
prefers the wrong one: its greedy reward is near 0 and its sampled
(temperature 1) reward is about its probability of the largest digit. The
right behaviour is in its support but not its mode, the regime GRPO works
in: it has to move probability onto the answers the reward prefers, on
strings it never saw. (docs/results/grpo_arith.md is the other regime: a
base that only half knows the skill, 2-digit addition; GRPO gained 0.01-0.04
there, not above the seed spread.)

Chain, per seed (``--set seed=S --set data.seed=S``; each seed pretrains
its own base):

  both    pretrain -> grpo_dense (dense attention); from the same
          pretrained parameters warmup (indexer only) -> sparse (top-4
          attention, all parameters) -> grpo_sparse (top-4 DSA sampling and
          training, index replay on). Prompts are 10 bytes, so the answer
          digit's query sees 4 of its 11 keys, fewer than the 6 digits: the
          indexer has to keep the large ones.
  ablate  one DSA grpo phase of ABLATE_STEPS from the seed-0 ``both``
          run's sparse phase: the stabiliser sweep's base
          (experiments/grpo_max_ablation.py)
  test    the same chain with a handful of steps on a width-32 model (the
          smoke test, tests/test_grpo_max.py)

  for s in 0 1 2 3; do python launch.py experiments/grpo_max.py:both \\
      --set seed=$s --set data.seed=$s --workdir work/grpo_max/both_s$s
  done
  python experiments/grpo_report.py work/grpo_max \\
      --png docs/results/grpo_max.png

Each grpo phase writes eval_reward (greedy) and eval_reward_sampled
(``EVAL_SAMPLES`` samples of each held-out prompt at the rollout
temperature, one fixed key) at its start, every ``eval.every`` steps and at
its end. Model: as grpo_arith.py (byte-level MLA, width 96, 2 layers, 4
heads, indexer 4 x 32) with top-4 selection.
"""
from __future__ import annotations

import dataclasses
import os

from dsax.config import (ConfigError, EvalConfig, ExperimentConfig,
                         OptimConfig, PhaseConfig, RLConfig)

from experiments import grpo_arith

ROOT = grpo_arith.ROOT
DATA_DIR = os.path.join(ROOT, "work", "grpo_max_data")
DIGITS = 6
# Share of the supervised answers that are the largest digit; the rest are
# the smallest.
MAX_SHARE = 0.25
TRAIN_PROBLEMS = 40000
EVAL_PROMPTS = 256
HELDOUT_SEEDS = (0, 1, 2, 3)
PRETRAIN_STEPS, WARMUP_STEPS, SPARSE_STEPS, GRPO_STEPS = 1000, 60, 60, 200
# Keys each DSA query attends to: fewer than the digits, so the indexer has
# to keep the large ones.
TOPK = 4
GRPO_LR, GRPO_WARMUP = 3e-4, 10
# The stabiliser sweep (experiments/grpo_max_ablation.py): ABLATE_STEPS of
# DSA GRPO from the seed-0 run's sparse phase.
ABLATE_STEPS = 50
ABLATE_FROM = os.path.join(ROOT, "work", "grpo_max", "both_s0", "phases",
                           "sparse")
EVAL_SAMPLES = 8
RL = RLConfig(task="digit_max", digits=DIGITS, prompts=16,
              group_size=8, max_new_tokens=3, temperature=1.0,
              kl_coef=0.01, eval_prompts=EVAL_PROMPTS,
              eval_samples=EVAL_SAMPLES)


def _draw(digits: int):
  from dsax.rl import rewards  # pylint: disable=import-outside-toplevel
  return lambda rng: rewards.digit_max(rng, digits)


def heldout_lines(seeds=HELDOUT_SEEDS, n: int = EVAL_PROMPTS,
                  digits: int = DIGITS) -> set[str]:
  """The prompts the grpo phases score on."""
  return grpo_arith.heldout_prompts(_draw(digits), seeds, n)


def data_file(n: int = TRAIN_PROBLEMS, share: float = MAX_SHARE,
              digits: int = DIGITS, data_dir: str | None = None) -> str:
  """A JSONL of ``n`` digit strings, one document each: ``M: 382719= 9\\n``
  (the largest) with probability ``share``, else ``M: 382719= 1\\n`` (the
  smallest); without the held-out prompts (grpo_arith.problem_file)."""

  def text(p, rng):
    answer = p.data["answer"] if rng.random() < share else \
        " " + min(p.prompt[3:-1])
    return p.prompt + answer + "\n"

  path = os.path.join(data_dir or DATA_DIR,
                      f"max_d{digits}_p{share:g}_{n}.jsonl")
  return grpo_arith.problem_file(path, n, _draw(digits),
                                 heldout_lines(digits=digits), text)


def phases(pretrain: int, warmup: int, sparse: int, grpo: int,
           rl: RLConfig = RL) -> tuple:
  """pretrain -> grpo_dense; warmup (from pretrain) -> sparse ->
  grpo_sparse."""
  optim = OptimConfig(lr=GRPO_LR, lr_warmup_steps=min(GRPO_WARMUP, grpo),
                      schedule="cosine")
  const = grpo_arith.const
  return (
      PhaseConfig(name="pretrain", kind="pretrain", steps=pretrain,
                  optim=OptimConfig(lr=3e-3,
                                    lr_warmup_steps=min(20, pretrain))),
      PhaseConfig(name="grpo_dense", kind="grpo", steps=grpo, rl=rl,
                  optim=optim),
      PhaseConfig(name="warmup", kind="warmup", steps=warmup,
                  init_from="pretrain", optim=const(1e-3, min(5, warmup))),
      PhaseConfig(name="sparse", kind="sparse", steps=sparse,
                  optim=const(3e-4, min(5, sparse)),
                  indexer_optim=const(1e-3, min(5, sparse))),
      PhaseConfig(name="grpo_sparse", kind="grpo", steps=grpo, optim=optim,
                  rl=dataclasses.replace(rl, attention="sparse")),
  )


def model_config(d_model: int):
  """grpo_arith's model with a top-``TOPK`` indexer."""
  cfg = grpo_arith.model_config(d_model)
  return dataclasses.replace(
      cfg, indexer=dataclasses.replace(cfg.indexer, topk=TOPK))


def get_config(arg=None) -> ExperimentConfig:
  variants = ("both", "ablate", "test")
  if arg not in variants:
    raise ConfigError(f"grpo_max: ARG must be one of {variants}, "
                      f"got {arg!r}")
  test = arg == "test"
  data = grpo_arith.data_config(
      data_file(400 if test else TRAIN_PROBLEMS), test)
  if test:
    rl = dataclasses.replace(RL, prompts=2, group_size=2, eval_prompts=8,
                             eval_samples=2)
    ph = phases(4, 2, 2, 2, rl)
  elif arg == "ablate":  # one DSA grpo phase from seed 0's sparse phase
    grpo_sparse = phases(0, 0, 0, ABLATE_STEPS)[-1]
    ph = (dataclasses.replace(grpo_sparse, name="grpo",
                              init_from=ABLATE_FROM),)
  else:
    ph = phases(PRETRAIN_STEPS, WARMUP_STEPS, SPARSE_STEPS, GRPO_STEPS)
  return ExperimentConfig(
      name=f"grpo_max_{arg}", model=model_config(32 if test else 96),
      data=data, phases=ph, eval=EvalConfig(every=0 if test else 25, batches=1,
                                            final_batches=1),
      log_every=1 if test else 5, save_every=0, compare=False)
