"""Training-time MoE load balance (issue 16 item 1) through the trainer: the
router bias moves by exactly V3's sign rule from the step's expert load, the
balance loss enters the loss with its weight, the load statistics reach the
metrics, and the config refuses what cannot work."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init, tiny
from dsax import model, moe, train
from dsax.config import (ConfigError, LossConfig, MoEConfig, OptimConfig,
                         PhaseConfig, validate)
from configs import tiny_run


def _cfg(rate=0.0, weight=0.0, topk_method="noaux_tc"):
  m = tiny(moe=MoEConfig(n_routed_experts=4, n_activated=2, d_expert=16,
                         first_k_dense=1, score_func="sigmoid",
                         topk_method=topk_method, n_group=2, topk_group=2,
                         norm_topk_prob=True))
  base = tiny_run.get_config()
  phase = PhaseConfig(name="pretrain", kind="pretrain", steps=1,
                      optim=OptimConfig(lr=1e-3, lr_warmup_steps=0),
                      loss=LossConfig(moe_balance_weight=weight,
                                      moe_bias_rate=rate))
  return dataclasses.replace(base, model=m, phases=(phase,), control="")


def _batch(cfg, b=2, t=32):
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]),
          "weights": jnp.ones((b, t), jnp.float32),
          "segment_ids": jnp.ones((b, t), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}


def test_config_refuses_bias_rate_without_noaux_and_bad_dispatch():
  with pytest.raises(ConfigError, match="moe_bias_rate"):
    validate(_cfg(rate=1e-3, topk_method="greedy"))
  with pytest.raises(ConfigError, match="moe_balance_weight"):
    validate(_cfg(weight=-1.0))
  cfg = _cfg()
  bad = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, moe=dataclasses.replace(cfg.model.moe, dispatch="sorted")))
  with pytest.raises(ConfigError, match="dispatch"):
    validate(bad)
  validate(_cfg(rate=1e-3, weight=1e-4))


def test_step_moves_the_bias_by_the_sign_rule_and_adds_the_balance_loss():
  rate, weight = 0.01, 0.5
  cfg = validate(_cfg(rate=rate, weight=weight))
  phase = cfg.phases[0]
  params = init(cfg.model)
  batch = _batch(cfg)
  # The load of this batch, from a forward with the same parameters.
  _, aux = model.forward(params, batch["inputs"], cfg.model,
                         batch["segment_ids"], positions_BT=batch["positions"])
  bias0 = np.asarray(params["moe"]["router_bias"])  # the step donates it
  want_bias = np.asarray(moe.update_router_bias(
      params["moe"]["router_bias"], aux.expert_load, rate))
  flat = train.flatten(params)
  loss_fn = train.make_loss_fn(cfg, phase)
  loss, out = loss_fn(flat, {}, batch)
  lm = model.lm_loss(model.forward(params, batch["inputs"], cfg.model,
                                   batch["segment_ids"],
                                   positions_BT=batch["positions"])[0],
                     batch["targets"], batch["weights"])
  np.testing.assert_allclose(
      loss, lm + weight * jnp.sum(aux.balance_loss), rtol=1e-6)
  for key in ("moe_maxvio", "moe_maxvio_worst", "moe_idle", "moe_balance"):
    assert np.isfinite(float(out[key])), key
  # One optimizer step: AdamW gives the bias no update (no gradient reaches
  # a selection-only bias), the sign rule moves it by exactly +-rate.
  from dsax import sharding as S
  mesh = S.make_mesh(cfg.mesh)
  state, frozen, tx, sched = train.init_state(cfg, phase, params, mesh)
  step = train.make_train_step(cfg, phase, tx, sched, mesh)
  state, metrics = step(state, frozen, batch)
  got = np.asarray(state["trainable"][moe.BIAS_PATH])
  np.testing.assert_allclose(got, want_bias, atol=1e-7)
  moved = np.abs(got - bias0)
  assert np.all((np.isclose(moved, rate)) | (moved == 0))
  assert moved.max() == pytest.approx(rate)
  assert "expert_load" not in metrics and "moe_maxvio" in metrics
