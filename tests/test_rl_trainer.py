"""The grpo phase kind (dsax.rl.trainer): a GRPO step leaves the reference
parameters bit-identical and moves only the trainable ones; the rl keys
are errors on other kinds and vice versa, values are checked; a pretrain +
grpo run goes end to end through train.run and writes the metrics."""

import dataclasses
import re

import numpy as np
import pytest

from conftest import tiny
from dsax import metrics, model, train
from dsax import sharding as S
from dsax.config import (ConfigError, DataConfig, EvalConfig,
                         ExperimentConfig, MoEConfig, OptimConfig,
                         PhaseConfig, RLConfig, override)
from dsax.rl import trainer
from dsax.tokenizer import Tokenizer

TRAINABLE = r"^layers/(attn|mlp)/"
RL = RLConfig(prompts=2, group_size=2, max_new_tokens=4, kl_coef=0.1,
              top_k=16)
KEYS = ("reward_mean", "reward_std", "response_len", "clip_frac", "kl",
        "masked_frac", "mismatch", "loss", "grad_norm", "lr")


def rl_cfg(steps=2, rl=RL, pretrain=0, **kw):
  phases = (PhaseConfig(name="rl", kind="grpo", steps=steps,
                        trainable=TRAINABLE, rl=rl,
                        optim=OptimConfig(lr=1e-2, lr_warmup_steps=0)),)
  if pretrain:
    phases = (PhaseConfig(name="pretrain", steps=pretrain,
                          optim=OptimConfig(lr=3e-3, lr_warmup_steps=1)),
              ) + phases
  return ExperimentConfig(
      name="rl_test", model=tiny(init_std=0.1), phases=phases,
      data=DataConfig(source="stdlib", max_docs=12, tokenizer="bytes",
                      seq_len=64, batch_size=2),
      eval=EvalConfig(every=0), log_every=1, save_every=0, compare=False,
      **kw)


def fake_score(problems, completions_BT, group_size, decode, eos_id=-1):
  """Rewards 1, 0, 1, 0, ...: every group has an advantage to follow."""
  del problems, decode, eos_id
  return (np.arange(len(completions_BT)) % group_size == 0).astype(np.float32)


def dsa_moe_cfg():
  """A DSA model with MoE, top-4 of prompts of 9 tokens: the sparse grpo
  step with index replay and keep routing."""
  model = tiny(init_std=0.1, attn_q_chunk=8, moe=MoEConfig(
      n_routed_experts=4, n_activated=2, d_expert=16, first_k_dense=1))
  model = dataclasses.replace(model, indexer=dataclasses.replace(
      model.indexer, topk=4, q_chunk=8))
  cfg = rl_cfg(rl=dataclasses.replace(RL, attention="sparse"))
  phase = dataclasses.replace(cfg.phases[0], trainable=r"^(layers/attn|moe)/")
  return dataclasses.replace(cfg, model=model, phases=(phase,))


@pytest.mark.parametrize("kind", ["dense", "dsa_moe"])
def test_grpo_step_keeps_the_reference_and_moves_only_trainable(monkeypatch,
                                                                kind):
  monkeypatch.setattr(trainer.rewards, "score", fake_score)
  cfg = rl_cfg() if kind == "dense" else dsa_moe_cfg()
  phase = cfg.phases[0]
  mesh = S.make_mesh(cfg.mesh)
  params = train.init_params(cfg, mesh)
  before = {k: np.array(v) for k, v in train.flatten(params).items()}
  state, frozen, _, _ = train.init_state(cfg, phase, params, mesh)
  ref_flat = trainer.reference_copy(params, state["trainable"])
  stepper = trainer.Stepper(cfg, phase, Tokenizer("bytes"), ref_flat)
  for s in (1, 2):  # step 2: theta != theta_ref, so the KL term has a pull
    state, vals = stepper.step(state, frozen, s)
  assert set(KEYS) <= set(vals) and all(np.isfinite(list(vals.values())))
  assert vals["reward_mean"] == 0.5 and vals["kl"] > 0
  assert vals["mismatch"] < 1e-5  # step 2's first update: theta = theta_old
  # The reference: alive (never donated) and bit-identical.
  for k, v in ref_flat.items():
    np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)
  after = train.flatten(train.unflatten({**frozen, **state["trainable"]}))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  trainable = {k for k in before if re.search(phase.trainable, k)}
  assert set(state["trainable"]) == trainable
  assert changed and changed <= trainable, changed - trainable
  assert int(state["step"]) == 2


def test_rl_keys_are_errors_on_other_kinds_and_values_are_checked():
  cfg = rl_cfg(pretrain=2)
  with pytest.raises(ConfigError, match=r"phases.pretrain.rl.prompts=3 "
                     "means nothing for a pretrain phase"):
    override(cfg, ["phases.pretrain.rl.prompts=3"])
  with pytest.raises(ConfigError, match="means nothing for a pretrain"):
    dataclasses.replace(cfg, phases=(dataclasses.replace(
        cfg.phases[0], rl=RLConfig(epochs=2)),) + cfg.phases[1:]).check()
  for key in ("phases.rl.indexer_optim.lr=1e-3", "phases.rl.selection=local",
              "phases.rl.loss.lm_weight=2"):
    with pytest.raises(ConfigError, match="means nothing for a grpo phase"):
      override(cfg, [key])
  bad = {"group_size=1": "group_size must be >= 2",
         "task=sudoku": "task='sudoku' must be one of",
         "ops=/": "ops='/' must be drawn from",
         "temperature=-1": "temperature must be >= 0",
         "top_p=0": "top_p must be > 0", "epochs=0": "epochs must be >= 1",
         "attention=local": "attention must be dense or sparse",
         "clip_eps=1.5": "clip_eps must be in", "kl_coef=-1": "kl_coef",
         "prompts=0": "prompts must be >= 1"}
  for kv, msg in bad.items():
    with pytest.raises(ConfigError, match=f"phases.rl.rl.{msg}"):
      override(cfg, [f"phases.rl.rl.{kv}"])
  ok = override(cfg, ["phases.rl.rl.attention=sparse", "phases.rl.topk=4",
                      "phases.rl.rl.index_replay=false"])
  assert ok.phases[1].rl.attention == "sparse"


def test_pretrain_then_grpo_runs_end_to_end(tmp_path):
  cfg = rl_cfg(pretrain=2, rl=dataclasses.replace(RL, eval_prompts=2))
  train.run(cfg, str(tmp_path))
  rows = [r for r in metrics.read_metrics(str(tmp_path))
          if r["phase"] == "rl"]
  steps = [r for r in rows if "loss" in r]
  assert [r["step"] for r in steps] == [3, 4]
  for r in steps:
    assert set(KEYS) <= set(r), set(KEYS) - set(r)
  evals = sorted(r["step"] for r in rows if "eval_reward" in r)
  assert evals == [2, 4]  # the phase's start (global step 2) and end
  assert (tmp_path / "phases" / "rl").is_dir()


def test_a_grpo_phase_resumes_from_its_checkpoint_identically(tmp_path,
                                                              monkeypatch):
  """A crash after the step-1 checkpoint, then a rerun: steps 2 and 3 log
  what an uninterrupted run logs (problems, samples and the reference are
  rebuilt from the seed, the global step and the phase's source)."""
  monkeypatch.setattr(trainer.rewards, "score", fake_score)
  cfg = dataclasses.replace(rl_cfg(steps=3), save_every=1)
  train.run(cfg, str(tmp_path / "a"))
  step = trainer.Stepper.step

  def crash(self, state, frozen, global_step):
    if global_step == 2:
      raise RuntimeError("crash")
    return step(self, state, frozen, global_step)

  monkeypatch.setattr(trainer.Stepper, "step", crash)
  with pytest.raises(RuntimeError, match="crash"):
    train.run(cfg, str(tmp_path / "b"))
  monkeypatch.setattr(trainer.Stepper, "step", step)
  train.run(cfg, str(tmp_path / "b"))
  rows = {w: {r["step"]: r for r in metrics.read_metrics(str(tmp_path / w))}
          for w in ("a", "b")}
  assert sorted(rows["b"]) == [1, 2, 3]
  for s in (2, 3):
    for k in ("loss", "kl", "reward_mean", "mismatch", "grad_norm"):
      assert rows["a"][s][k] == rows["b"][s][k], (s, k)
  assert rows["a"][3]["kl"] > 0


def parity_reward(problems, completions_BT, group_size, decode, eos_id=-1):
  """Reward 1 when the first completion token has the parity of its
  problem's index: a reward that reads the samples and differs between
  problems, whose expectation is a sum of known probabilities."""
  del problems, decode, eos_id
  first_B = np.asarray(completions_BT)[:, 0]
  o_B = np.arange(len(first_B)) // group_size
  return ((first_B + o_B) % 2 == 0).astype(np.float32)


def heldout_stepper(rl):
  cfg = rl_cfg(rl=rl)
  phase = cfg.phases[0]
  mesh = S.make_mesh(cfg.mesh)
  params = train.init_params(cfg, mesh)
  state, frozen, _, _ = train.init_state(cfg, phase, params, mesh)
  stepper = trainer.Stepper(cfg, phase, Tokenizer("bytes"),
                            trainer.reference_copy(params,
                                                   state["trainable"]))
  return cfg, params, stepper, state, frozen


def test_sampled_heldout_reward_at_temperature_zero_is_the_greedy_one(
    monkeypatch):
  monkeypatch.setattr(trainer.rewards, "score", parity_reward)
  rl = dataclasses.replace(RL, temperature=0.0, eval_prompts=6,
                           eval_samples=3)
  *_, stepper, state, frozen = heldout_stepper(rl)
  ev = stepper.heldout(state, frozen)
  assert 0 < ev["eval_reward"] < 1  # the reward tells prompts apart
  assert ev["eval_reward_sampled"] == ev["eval_reward"]
  assert ev["eval_reward_sampled_se"] > 0


def test_sampled_heldout_reward_estimates_the_policy_expectation(monkeypatch):
  """Temperature 1.3, top-16, one new token: E[reward] = the kept,
  renormalised probability of the tokens of problem o's parity after
  prompt o, from
  model.forward; the estimate is within 4 standard errors of it, and a
  second evaluation (the fixed key) repeats it exactly."""
  monkeypatch.setattr(trainer.rewards, "score", parity_reward)
  rl = dataclasses.replace(RL, temperature=1.3, top_k=16, max_new_tokens=1,
                           eval_prompts=8, eval_samples=200)
  cfg, params, stepper, state, frozen = heldout_stepper(rl)
  ev = stepper.heldout(state, frozen)
  prompts_OT = trainer.prompt_tokens(cfg.phases[0], stepper.tok,
                                     stepper.heldout_problems)
  logits_OV = np.asarray(model.forward(params, prompts_OT, cfg.model)[0],
                         np.float64)[:, -1] / 1.3
  kth_O = np.sort(logits_OV, axis=-1)[:, -16]
  p_OV = np.where(logits_OV >= kth_O[:, None], np.exp(logits_OV), 0.0)
  p_OV /= p_OV.sum(-1, keepdims=True)
  p_O = np.array([p_OV[o, o % 2::2].sum() for o in range(len(p_OV))])
  exact = p_O.mean()
  assert 0.1 < exact < 0.9
  # The sampling noise on these 8 problems (binomial, 200 samples each);
  # the reported SE (over problems) also holds the problems' spread.
  se_c = np.sqrt(np.mean(p_O * (1 - p_O)) / p_O.size / 200)
  assert abs(ev["eval_reward_sampled"] - exact) < 4 * se_c, (ev, exact)
  assert ev["eval_reward_sampled_se"] > se_c
  assert stepper.heldout(state, frozen) == ev
  # per-problem means 0.5 and 1: mean 0.75, SE std([0.5, 1]) / sqrt(2)
  assert trainer.sampled_reward(np.array([1, 0, 1, 1.]), 2) == (0.75, 0.25)


def test_eval_samples_is_checked():
  with pytest.raises(ConfigError, match=r"phases.rl.rl.eval_samples must "
                     r"be >= 0, got -1"):
    override(rl_cfg(), ["phases.rl.rl.eval_samples=-1"])
