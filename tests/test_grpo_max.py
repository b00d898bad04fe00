"""experiments/grpo_max.py: its variants load, its supervised file
mixes largest-digit and smallest-digit answers at the stated share and leaves out the
held-out prompts, and the ``test`` chain runs end to end through train.run
with eval_reward at each grpo phase's start and end."""

import json
import os
import sys

import numpy as np
import pytest

from dsax import metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import grpo_max, grpo_max_answers  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
  monkeypatch.setattr(grpo_max, "DATA_DIR", str(tmp_path / "data"))
  return tmp_path / "data"


def test_config_and_data_file(data_dir):
  cfg = grpo_max.get_config("both")
  grpo = [p for p in cfg.phases if p.kind == "grpo"]
  assert [p.rl.attention for p in grpo] == ["dense", "sparse"]
  assert all(p.rl.task == "digit_max" and p.rl.eval_samples > 0
             for p in grpo)
  # top-k below the 6 digits: the indexer has to choose among them
  assert cfg.model.indexer.topk < grpo_max.DIGITS
  with pytest.raises(Exception, match="ARG must be one of"):
    grpo_max.get_config("dense")
  path = grpo_max.data_file(2000)
  assert os.path.dirname(path) == str(data_dir)
  with open(path, encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f]
  assert len(texts) == 2000
  held = grpo_max.heldout_lines()
  assert len(held) > 1000
  largest = smallest = 0
  for t in texts:
    prompt, answer = t.rstrip("\n").split("= ")
    assert prompt + "=" not in held
    s = prompt[3:]
    assert answer in (max(s), min(s))
    largest += answer == max(s) != min(s)
    smallest += answer == min(s) != max(s)
  share = largest / (largest + smallest)   # binomial SE ~0.01 at n 2000
  assert abs(share - grpo_max.MAX_SHARE) < 0.04, share


def test_the_test_chain_runs_end_to_end(tmp_path):
  train.run(grpo_max.get_config("test"), str(tmp_path / "run"))
  rows = metrics.read_metrics(str(tmp_path / "run"))
  for phase in ("grpo_dense", "grpo_sparse"):
    got = [r for r in rows if r["phase"] == phase]
    evals = [r["eval_reward"] for r in got if "eval_reward" in r]
    assert len(evals) == 2 and all(0 <= e <= 1 for e in evals), phase
    assert all(np.isfinite(r["loss"]) for r in got if "loss" in r)
  # What the policies answer, by the largest digit (grpo_max_answers.py).
  os.rename(tmp_path / "run", tmp_path / "both_s0")
  out = tmp_path / "answers.json"
  assert grpo_max_answers.main([str(tmp_path), "--variant", "test",
                                "--out", str(out)]) == 0
  got = json.loads(out.read_text())
  assert list(got) == [name for name, _, _ in grpo_max_answers.POLICIES]
  for rows in got.values():
    assert len(rows) == 8   # the test variant's eval_prompts
    assert all(0 <= lo <= hi <= 9 for hi, lo, _ in rows)
  lines = grpo_max_answers.table({"x": [(9, 1, "9"), (8, 0, "0"),
                                        (5, 2, "7"), (9, 3, "9")]})
  assert lines[-1] == ("| x | 4 | 0.50 | 0.25 | 0.25 | 1.00 (2) | 0.00 (1) | "
                       "- (0) | 0.00 (1) |")
