"""The GRPO stabilisers, one off at a time, on the DSA policy of
experiments/grpo_max.py (6 runs), where the policy moves far from the
reference (greedy held-out reward 0 -> ~0.7 within 50 steps).

  python launch.py --sweep experiments/grpo_max_ablation.py --dry-run
  python launch.py --sweep experiments/grpo_max_ablation.py
  python experiments/grpo_report.py work/grpo_max \\
      --ablation work/grpo_max_ablation --task "largest of 6 digits"

Base: experiments/grpo_max.py:ablate, one top-4 DSA grpo phase of 50 steps
from the sparse phase of the seed-0 ``both`` run (work/grpo_max/both_s0).
As in experiments/grpo_ablation.py, sampling is truncated (top_p 0.9) so
that the sampling mask keeps something, and each rollout batch gets 4
updates so that pi_theta drifts from pi_old within a batch. keep_routing is
not swept (no MoE). Rows: all on; unbiased_kl, seq_mask,
keep_sampling_mask, index_replay each off; all four off.
"""

CONFIG = "experiments/grpo_max.py:ablate"

# The same six rows and settings as experiments/grpo_ablation.py.
from experiments.grpo_ablation import BASE, ZIP  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
