"""Held-out rewards of saved policies of the GRPO experiment
(experiments/grpo_arith.py): for each phase directory given, eval_reward
(greedy) and eval_reward_sampled (``EVAL_SAMPLES`` samples per problem at
the rollout temperature, the grpo phase's fixed key) on the ``EVAL_PROMPTS``
held-out problems of ``--seed``, exactly as a grpo phase computes them
(dsax.rl.trainer.Stepper.heldout); dense attention, or top-k DSA with
``--sparse``.

  python experiments/grpo_heldout.py --seed 0 [--sparse] DIR [DIR ...]

It re-measures runs written before the sampled reward existed (a ``both``
run's phases/pretrain_more, grpo_dense; phases/sparse, grpo_sparse). Each
directory after the first also gets sampled_gain and its SE: the mean and
the standard error of the per-problem difference from the first directory
(paired: the same problems and the same sampling key).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "src"), ROOT]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("dirs", nargs="+", help="parameter checkpoints (phases/X)")
  ap.add_argument("--seed", type=int, required=True)
  ap.add_argument("--sparse", action="store_true", help="DSA (grpo_sparse)")
  args = ap.parse_args(argv)
  # pylint: disable=import-outside-toplevel
  from dsax import checkpoint, train
  from dsax import sharding as S
  from dsax.rl import trainer
  from dsax.tokenizer import Tokenizer
  from experiments import grpo_arith
  cfg = grpo_arith.get_config("grpo")
  cfg = dataclasses.replace(cfg, seed=args.seed)
  phase = cfg.phases[1 if args.sparse else 0]
  mesh = S.make_mesh(cfg.mesh)
  abstract = train.abstract_params(cfg, mesh)
  first = None
  for d in args.dirs:
    params = checkpoint.load_params(d, abstract)
    state, frozen, _, _ = train.init_state(cfg, phase, params, mesh)
    stepper = trainer.Stepper(cfg, phase, Tokenizer("bytes"),
                              trainer.reference_copy(params,
                                                     state["trainable"]))
    out = stepper.heldout(state, frozen)
    per_O = stepper.sampled_per_problem(params)
    if first is None:
      first = per_O
    else:  # paired with the first directory: same problems, same key
      out["sampled_gain"], out["sampled_gain_se"] = trainer.mean_se(
          per_O - first)
    print(json.dumps({"dir": d, "seed": args.seed, "phase": phase.name,
                      **out}), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
