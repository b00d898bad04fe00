"""What the policies of experiments/grpo_max.py answer, by the largest digit.

For each ``both_s<seed>`` run under WORKDIR, the greedy answers of the four
saved policies (pretrain and grpo_dense with dense attention; sparse and
grpo_sparse with top-4 DSA) to that seed's held-out prompts, exactly as a
grpo phase draws them. Pooled over seeds, per policy: the share of answers
that are the largest digit, the smallest, or another digit, and the
accuracy by the largest digit's value (9, 8, 7, <= 6). It separates
computing the maximum from a prior on high digits: a policy that says "9"
whatever the string scores P(max = 9) = 1 - 0.9^6 = 0.47.

  python experiments/grpo_max_answers.py work/grpo_max [--out FILE.json]
      [--variant test]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "src"), ROOT]

POLICIES = (("dense before", "pretrain", "grpo_dense"),
            ("dense after", "grpo_dense", "grpo_dense"),
            ("dsa before", "sparse", "grpo_sparse"),
            ("dsa after", "grpo_sparse", "grpo_sparse"))
BUCKETS = ("9", "8", "7", "<=6")


def bucket(largest: int) -> str:
  return str(largest) if largest >= 7 else "<=6"


def answers(run_dir: str, seed: int, variant: str = "both"
            ) -> dict[str, list[tuple]]:
  """{policy: [(largest, smallest, answer text), ...]} for one run."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from dsax import checkpoint, train
  from dsax import sharding as S
  from dsax.rl import rewards, rollout as R, trainer
  from dsax.tokenizer import Tokenizer
  from experiments import grpo_max
  cfg = dataclasses.replace(grpo_max.get_config(variant), seed=seed)
  phases = {p.name: p for p in cfg.phases}
  mesh = S.make_mesh(cfg.mesh)
  abstract = train.abstract_params(cfg, mesh)
  tok = Tokenizer("bytes")
  # Both grpo phases draw the same held-out problems (one task, one seed).
  dense = phases["grpo_dense"]
  probs = trainer.problems(dense, tok, np.random.default_rng(
      [seed, trainer.HELDOUT_STREAM]), dense.rl.eval_prompts)
  out = {}
  for name, saved, as_phase in POLICIES:
    phase = phases[as_phase]
    params = checkpoint.load_params(
        os.path.join(run_dir, "phases", saved), abstract)
    rcfg = trainer.rollout_config(phase, tok, greedy=True)
    ro = R.rollout(params, trainer.prompt_tokens(phase, tok, probs),
                   trainer.heldout_key(seed), cfg.model, rcfg,
                   trainer.attention_mode(cfg, phase))
    rows = []
    for p, ids in zip(probs, np.asarray(ro.completion)):
      text = rewards.completion_text(ids, trainer.safe_decode(tok),
                                     rcfg.eos_id)
      digits = [int(c) for c in p.prompt[3:-1]]
      rows.append((max(digits), min(digits), rewards.first_line(text).strip()))
    out[name] = rows
  return out


def table(by_policy: dict[str, list[tuple]]) -> list[str]:
  lines = ["| policy | prompts | largest | smallest | other | "
           + " | ".join(f"acc. max {b} (n)" for b in BUCKETS) + " |",
           "|---" * (5 + len(BUCKETS)) + "|"]
  for name, rows in by_policy.items():
    kind = collections.Counter(
        "largest" if a == str(hi) else "smallest" if a == str(lo) else "other"
        for hi, lo, a in rows)
    n = len(rows)
    cells = []
    for b in BUCKETS:
      got = [a == str(hi) for hi, _, a in rows if bucket(hi) == b]
      cells.append(f"{sum(got) / len(got):.2f} ({len(got)})" if got
                   else "- (0)")
    lines.append(f"| {name} | {n} | {kind['largest'] / n:.2f} | "
                 f"{kind['smallest'] / n:.2f} | {kind['other'] / n:.2f} | "
                 + " | ".join(cells) + " |")
  return lines


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("workdir")
  ap.add_argument("--out", default=None, help="write the answers as JSON")
  ap.add_argument("--variant", default="both",
                  help="the grpo_max.py variant the runs were made with")
  args = ap.parse_args(argv)
  pooled: dict[str, list[tuple]] = {name: [] for name, _, _ in POLICIES}
  runs = sorted(glob.glob(os.path.join(args.workdir, "both_s*")))
  if not runs:
    print(f"error: no both_s<seed> runs under {args.workdir}; run "
          "experiments/grpo_max.py:both first", file=sys.stderr)
    return 2
  for run_dir in runs:
    seed = int(re.search(r"both_s(\d+)$", run_dir).group(1))
    if not os.path.isdir(os.path.join(run_dir, "phases", "grpo_sparse")):
      print(f"skipped {run_dir}: not finished (no phases/grpo_sparse)",
            file=sys.stderr)
      continue
    for name, rows in answers(run_dir, seed, args.variant).items():
      pooled[name] += rows
  print("\n".join(table(pooled)))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(pooled, f)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
