"""The GRPO stabilisers, one off at a time, on the DSA policy (6 runs).

  python launch.py --sweep experiments/grpo_ablation.py --dry-run
  python launch.py --sweep experiments/grpo_ablation.py
  python experiments/grpo_report.py work/grpo_arith --ablation work/grpo_ablation

Base: experiments/grpo_arith.py:ablate, one sparse grpo phase of 20 steps
from the sparse phase of the seed-0 ``both`` run (run
experiments/grpo_arith.py:both with seed 0 into work/grpo_arith/both_s0
first). Sampling is truncated (top_p 0.9) so that the sampling
mask has something to keep, and each rollout batch gets 4 updates so that
pi_theta drifts from pi_old within a batch (with 1 update the ratio is 1,
nothing is clipped and no sequence is masked). keep_routing is not swept: the
model has no MoE. Rows: all on; unbiased_kl, seq_mask, keep_sampling_mask,
index_replay each off; all four off.
"""

CONFIG = "experiments/grpo_arith.py:ablate"

ZIP = {
    "phases.grpo.rl.unbiased_kl": [True, False, True, True, True, False],
    "phases.grpo.rl.seq_mask": [True, True, False, True, True, False],
    "phases.grpo.rl.keep_sampling_mask": [True, True, True, False, True,
                                          False],
    "phases.grpo.rl.index_replay": [True, True, True, True, False, False],
}

BASE = {
    "phases.grpo.rl.top_p": 0.9,
    "phases.grpo.rl.epochs": 4,
}
