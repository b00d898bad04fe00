"""The GRPO experiments' tables and reward curves (experiments/grpo_arith.py,
experiments/grpo_max.py).

  python experiments/grpo_report.py work/grpo_arith \\
      [--ablation work/grpo_ablation] [--png docs/results/grpo_arith.png]
  python experiments/grpo_report.py work/grpo_max --task "largest of 6 digits" \\
      --png docs/results/grpo_max.png

Reads each run directory's metrics.jsonl (runs named both_s<seed> or
grpo_s<seed>: the phases grpo_dense and grpo_sparse are the dense and the
DSA policy; or <model>_s<seed> with one phase named grpo) and prints, per
model and seed, the held-out rewards at the start and the end of the
``grpo`` phase (eval_reward: greedy exact match on the held-out problems;
eval_reward_sampled: the mean over samples at the rollout temperature, when
the run has it), then per model and metric the mean over seeds and the
range (max - min) of the before and after values,
the mean and the smallest per-seed gain, and the seed spread of the gain:
its range (max - min over seeds) and its standard deviation; with ``--ablation``, one
row per sweep run (before, after, and the means over the phase's steps of
reward, kl, clip_frac, masked_frac, mismatch). The PNG: the rollout reward
per grpo step (a moving average of 5) of every run, the held-out rewards as
markers (circles greedy, squares sampled). With ``--paired LABEL=FILE``
(outputs of experiments/grpo_heldout.py), a table of paired sampled gains
and their standard errors.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_rows(workdir: str) -> list[dict]:
  sys.path.insert(0, os.path.join(ROOT, "src"))
  from dsax import metrics  # pylint: disable=import-outside-toplevel
  return metrics.read_metrics(workdir)


def grpo_rows(workdir: str, phase: str = "grpo") -> list[dict]:
  return sorted((r for r in read_rows(workdir) if r.get("phase") == phase),
                key=lambda r: r["step"])


def before_after(rows: list[dict], key: str = "eval_reward"
                 ) -> tuple[float, float]:
  evals = [r[key] for r in rows if key in r]
  if not evals:
    return math.nan, math.nan
  return evals[0], (evals[-1] if len(evals) > 1 else math.nan)


def mean(xs) -> float:
  xs = [x for x in xs if not math.isnan(x)]
  return sum(xs) / len(xs) if xs else math.nan


def spread(xs) -> float:
  """The seed spread: max - min (nan for no values)."""
  xs = [x for x in xs if not math.isnan(x)]
  return max(xs) - min(xs) if xs else math.nan


def std(xs) -> float:
  """The sample standard deviation (n - 1; nan below two values)."""
  xs = [x for x in xs if not math.isnan(x)]
  if len(xs) < 2:
    return math.nan
  m = sum(xs) / len(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# Runs of the ``both`` variant hold both models: phase -> model.
BOTH = {"grpo_dense": "dense", "grpo_sparse": "dsa"}


def main_table(root: str) -> tuple[list[str], dict]:
  runs: dict[str, list] = {}
  for d in sorted(glob.glob(os.path.join(root, "*_s*"))):
    m = re.fullmatch(r"(.+)_s(\d+)", os.path.basename(d))
    if not (m and os.path.isdir(d)):
      continue
    pairs = (BOTH.items() if m.group(1) in ("both", "grpo", "test")
             else [("grpo", m.group(1))])
    for phase, model in pairs:
      rows = grpo_rows(d, phase)
      if not rows:
        continue
      b, a = before_after(rows)
      sb, sa = before_after(rows, "eval_reward_sampled")
      steps = [r for r in rows if "reward_mean" in r]
      n = steps[-1]["step"] - rows[0]["step"] if steps else 0
      runs.setdefault(model, []).append(
          (int(m.group(2)), b, a, n, d, phase, sb, sa))
  lines = ["| model | seed | grpo steps | greedy before | after | gain | "
           "sampled before | after | gain |", "|---|---|---|---|---|---|---|"
           "---|---|"]
  for model, rs in runs.items():
    for seed, b, a, n, _, _, sb, sa in sorted(rs):
      lines.append(f"| {model} | {seed} | {n} | {b:.3f} | {a:.3f} | "
                   f"{a - b:+.3f} | {sb:.3f} | {sa:.3f} | {sa - sb:+.3f} |")
  lines += ["", "| model | metric | seeds | before: mean (range) | after: "
            "mean (range) | gain: mean | gain: min | seed spread of the "
            "gain: range (std) | mean gain > range? |",
            "|---|---|---|---|---|---|---|---|---|"]
  for model, rs in runs.items():
    for metric, (ib, ia) in (("greedy", (1, 2)), ("sampled", (6, 7))):
      done = [r for r in rs if not math.isnan(r[ia])]  # finished runs only
      bs = [r[ib] for r in done]
      as_ = [r[ia] for r in done]
      gains = [a - b for b, a in zip(bs, as_)]
      if not gains:
        continue
      lines.append(
          f"| {model} | {metric} | {len(done)} | {mean(bs):.3f} "
          f"({spread(bs):.3f}) | {mean(as_):.3f} ({spread(as_):.3f}) | "
          f"{mean(gains):+.3f} | {min(gains):+.3f} | "
          f"{spread(gains):.3f} ({std(gains):.3f}) | "
          f"{'yes' if mean(gains) > spread(gains) else 'no'} |")
  return lines, runs


SWITCHES = ("unbiased_kl", "seq_mask", "keep_sampling_mask", "index_replay")


def ablation_table(root: str) -> tuple[list[str], dict]:
  lines = ["| run (switches off) | before | after | reward | kl | clip_frac "
           "| masked_frac | mismatch |", "|---|---|---|---|---|---|---|---|"]
  runs = {}
  for d in sorted(glob.glob(os.path.join(root, "*"))):
    if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
      continue
    name = os.path.basename(d)
    off = [s for s in SWITCHES if f"{s}-false" in name]
    label = ("all on" if not off else "all off" if len(off) == len(SWITCHES)
             else ", ".join(off))
    rows = grpo_rows(d)
    b, a = before_after(rows)
    steps = [r for r in rows if "reward_mean" in r]
    avg = {k: mean([r.get(k, math.nan) for r in steps])
           for k in ("reward_mean", "kl", "clip_frac", "masked_frac",
                     "mismatch")}
    runs[label] = (rows, d)
    lines.append(f"| {label} | {b:.3f} | {a:.3f} | {avg['reward_mean']:.3f}"
                 f" | {avg['kl']:.2e} | {avg['clip_frac']:.3f} | "
                 f"{avg['masked_frac']:.3f} | {avg['mismatch']:.2e} |")
  return lines, runs


def paired_table(specs: list[str]) -> list[str]:
  """The paired gains of experiments/grpo_heldout.py outputs, given as
  LABEL=FILE (JSONL; in each seed and phase, the first line is the base):
  per model, seed and label the base's sampled reward, the sampled gain
  with its paired SE, and the greedy gain."""
  import json  # pylint: disable=import-outside-toplevel
  got: dict = {}
  for spec in specs:
    label, path = spec.split("=", 1)
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
    base = {}
    for r in rows:
      key = (BOTH[r["phase"]], r["seed"])
      if "sampled_gain" not in r:
        base[key] = r
        continue
      b = base[key]
      got.setdefault(key, []).append(
          (label, b["eval_reward_sampled"], r["sampled_gain"],
           r["sampled_gain_se"], r["eval_reward"] - b["eval_reward"]))
  lines = ["| model | seed | run | sampled before | sampled gain (paired SE)"
           " | gain / SE | greedy gain |", "|---|---|---|---|---|---|---|"]
  for (model, seed), rs in sorted(got.items()):
    for label, sb, g, se, gg in rs:
      lines.append(f"| {model} | {seed} | {label} | {sb:.3f} | {g:+.3f} "
                   f"({se:.3f}) | {g / se if se else math.nan:+.1f} | "
                   f"{gg:+.3f} |")
  return lines


def smooth(xs: list[float], w: int = 5) -> list[float]:
  return [mean(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def plot(runs: dict, ablation: dict, path: str,
         task: str = "2-digit addition") -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  n = 2 if ablation else 1
  fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.2), squeeze=False)
  ax = axes[0][0]
  colours = {"dense": "tab:blue", "dsa": "tab:orange", "sparse": "tab:orange"}
  for model, rs in runs.items():
    for seed, _, _, _, d, phase, *_ in sorted(rs):
      rows = grpo_rows(d, phase)
      base = rows[0]["step"] if rows else 0
      st = [r for r in rows if "reward_mean" in r]
      c = colours.get(model)
      order = sorted({x[0] for x in rs}).index(seed)
      ls = ("-", "--", ":", "-.")[order % 4]
      ax.plot([r["step"] - base for r in st],
              smooth([r["reward_mean"] for r in st]), ls, color=c,
              label=f"{model} s{seed} rollout reward")
      ev = [r for r in rows if "eval_reward" in r]
      ax.plot([r["step"] - base for r in ev], [r["eval_reward"] for r in ev],
              "o", color=c, mfc=c if order == 0 else "none")
      ev = [r for r in rows if "eval_reward_sampled" in r]
      ax.plot([r["step"] - base for r in ev],
              [r["eval_reward_sampled"] for r in ev], "s", color=c,
              mfc=c if order == 0 else "none")
  ax.set(xlabel="grpo step", ylabel="reward (exact match)",
         title=f"GRPO, {task} (held-out: o greedy, s sampled)")
  ax.legend(fontsize=7)
  if ablation:
    ax = axes[0][1]
    for label, (rows, _) in ablation.items():
      base = rows[0]["step"] if rows else 0
      st = [r for r in rows if "reward_mean" in r]
      ax.plot([r["step"] - base for r in st],
              smooth([r["reward_mean"] for r in st]), label=label)
    ax.set(xlabel="grpo step", ylabel="rollout reward (moving avg 5)",
           title="stabiliser ablation (DSA, 4 updates/batch)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=75)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("root", help="directory of the <model>_s<seed> runs")
  ap.add_argument("--ablation", default="", help="the sweep's directory")
  ap.add_argument("--paired", action="append", default=[],
                  metavar="LABEL=FILE",
                  help="experiments/grpo_heldout.py output (repeatable)")
  ap.add_argument("--png", default=os.path.join(ROOT, "work", "grpo_arith",
                                                "grpo_reward.png"))
  ap.add_argument("--task", default="2-digit addition",
                  help="the task's name in the plot's title")
  args = ap.parse_args(argv)
  lines, runs = main_table(args.root)
  abl_lines, abl = ablation_table(args.ablation) if args.ablation else ([],
                                                                        {})
  print("\n".join(lines + ([""] + abl_lines if abl_lines else [])))
  if args.paired:
    print("\n" + "\n".join(paired_table(args.paired)))
  plot(runs, abl, args.png, args.task)
  print(f"\nreward curve: {args.png}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
