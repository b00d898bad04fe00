"""Smoke test of experiments/agent_budget.py: the whole chain (SFT on
traces, DSA warm-up and sparse phases, greedy evaluation of the three
context policies for both models) at a few steps on a width-32 model, and
the report's table and PNG."""

import os

from experiments import agent_budget as E


def test_agent_budget_smoke(tmp_path):
  opts = dict(E.QUICK, row_len=512, episodes=1)
  rows = E.run(opts, str(tmp_path), log=lambda s: None)
  assert [(r["model"], r["policy"]) for r in rows] == [
      (m, p) for m in ("oracle", "dense", "dsa") for p in E.A.POLICIES]
  # The scripted solver (forced through the sampler) answers every turn
  # that fits: turn 1 under every policy at this budget.
  oracle = [r for r in rows if r["model"] == "oracle"]
  assert all(r["by_turn"][0] == 1.0 for r in oracle)
  for r in rows:
    assert 0.0 <= r["accuracy"] <= 1.0 and r["peak"] <= r["budget"]
    assert sum(r["stops"].values()) == 1 and r["generated"] > 0
  assert os.path.isfile(tmp_path / "results.json")
  text = E.table(rows)
  assert text.count("\n") == len(rows) + 1 and "| dsa | 640 |" in text
  E.plot(rows, str(tmp_path / "p.png"))
  assert os.path.getsize(tmp_path / "p.png") > 1000
