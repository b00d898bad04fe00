"""experiments/grpo_arith.py: its variants load, its pretraining file
leaves the held-out problems out, and the ``test`` variant (pretrain ->
dense grpo; warmup -> sparse -> sparse grpo) runs end to end through
train.run with eval_reward at each grpo phase's start and end."""

import json
import os
import sys

import numpy as np
import pytest

from dsax import metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import grpo_arith, grpo_report  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
  monkeypatch.setattr(grpo_arith, "DATA_DIR", str(tmp_path / "data"))
  return tmp_path / "data"


def test_variants_load_and_the_data_leaves_out_the_heldout_problems(
    data_dir):
  for arg in ("both", "dense", "sparse", "ablate", "grpo", "test"):
    cfg = grpo_arith.get_config(arg)
    grpo = [p for p in cfg.phases if p.kind == "grpo"]
    assert grpo and all(p.rl.eval_prompts > 0 for p in grpo)
    assert all(p.rl.eval_samples > 0 for p in grpo)
    if arg in ("sparse", "ablate"):
      assert grpo[-1].rl.attention == "sparse"
      # top-k below the prompt (9 bytes) + completion length
      assert cfg.model.indexer.topk < 9 + grpo[-1].rl.max_new_tokens
  with pytest.raises(Exception, match="ARG must be one of"):
    grpo_arith.get_config(None)
  path = grpo_arith.data_file(400)
  assert os.path.dirname(path) == str(data_dir)
  with open(path, encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f]
  assert len(texts) == 400
  held = grpo_arith.heldout_lines()
  for t in texts:
    prompt, answer = t.rstrip("\n").split("= ")
    assert prompt + "=" not in held
    a, b = (int(x) for x in prompt[3:].split("+"))
    assert int(answer) == a + b


def test_the_test_variant_runs_end_to_end(tmp_path):
  cfg = grpo_arith.get_config("test")
  train.run(cfg, str(tmp_path / "run"))
  rows = metrics.read_metrics(str(tmp_path / "run"))
  for phase in ("grpo_dense", "grpo_sparse"):
    got = [r for r in rows if r["phase"] == phase]
    evals = [r["eval_reward"] for r in got if "eval_reward" in r]
    assert len(evals) == 2 and all(0 <= e <= 1 for e in evals), phase
    sampled = [r["eval_reward_sampled"] for r in got
               if "eval_reward_sampled" in r]
    assert len(sampled) == 2 and all(0 <= e <= 1 for e in sampled), phase
    assert all(np.isfinite(r["loss"]) for r in got if "loss" in r)
  # The report reads the run (named like the experiment's runs).
  os.rename(tmp_path / "run", tmp_path / "both_s0")
  lines, runs = grpo_report.main_table(str(tmp_path))
  assert sorted(runs) == ["dense", "dsa"]
  assert any("| dsa | 0 |" in l for l in lines)
  assert any("| dense | sampled | 1 |" in l for l in lines)


def test_the_paired_table_reads_grpo_heldout_output(tmp_path):
  rows = [{"seed": 0, "phase": "grpo_sparse", "eval_reward": 0.25,
           "eval_reward_sampled": 0.2},
          {"seed": 0, "phase": "grpo_sparse", "eval_reward": 0.5,
           "eval_reward_sampled": 0.3, "sampled_gain": 0.1,
           "sampled_gain_se": 0.04}]
  path = tmp_path / "h.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  lines = grpo_report.paired_table([f"rerun={path}"])
  assert lines[-1] == "| dsa | 0 | rerun | 0.200 | +0.100 (0.040) | +2.5 | +0.250 |"


@pytest.mark.parametrize("sweep_file,module", [
    ("grpo_ablation.py", "grpo_arith"), ("grpo_max_ablation.py", "grpo_max")])
def test_the_ablation_sweep_loads_and_switches_one_stabiliser_at_a_time(
    sweep_file, module, tmp_path, monkeypatch):
  """experiments/grpo_ablation.py (grpo_max_ablation.py): six runs on the
  experiment's ``ablate`` variant; each run's stabilisers resolve as the
  docstring says (all on, each of the four off alone, all four off), with
  top_p 0.9 and 4 updates per batch in every run."""
  # pylint: disable=import-outside-toplevel
  import importlib
  from dsax import config, sweep
  mod = importlib.import_module(f"experiments.{module}")
  monkeypatch.setattr(mod, "DATA_DIR", str(tmp_path / "data"))
  # The base run's phase directory (made by the experiment's ``both`` run;
  # absent on a fresh checkout): init_from must name a directory.
  (tmp_path / "sparse").mkdir()
  monkeypatch.setattr(mod, "ABLATE_FROM", str(tmp_path / "sparse"))
  sw = sweep.load_sweep(os.path.join(ROOT, "experiments", sweep_file))
  assert sw.config == f"experiments/{module}.py:ablate"
  names = ("unbiased_kl", "seq_mask", "keep_sampling_mask", "index_replay")
  offs = []
  for _, overrides in sw.runs:
    cfg = config.override(mod.get_config("ablate"), overrides)
    (grpo,) = cfg.phases
    assert grpo.rl.top_p == 0.9 and grpo.rl.epochs == 4
    assert grpo.rl.attention == "sparse" and grpo.rl.keep_routing
    offs.append(tuple(n for n in names if not getattr(grpo.rl, n)))
  assert offs == [()] + [(n,) for n in names] + [names]
