"""The chunked LM loss (dsax.lm_loss, issue 16 item 4): equal to
``model.lm_loss`` of the full logits in value and in every parameter's
gradient, and the train step forms no [B, T, V] array."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import all_avals, init, tiny
from dsax import lm_loss, model, train
from dsax.config import override
from configs.tiny_run import get_config

V = 263  # a prime vocabulary: only a V-wide array has B*T*V elements
CASES = [("mla", False), ("mla", True), ("gqa", False), ("gqa", True)]


def _model_cfg(attention, tied, **kw):
  extra = (dict(n_heads=4, n_kv_heads=2, head_dim=16) if attention == "gqa"
           else {})
  return tiny(attention_type=attention, tie_embeddings=tied, vocab_size=V,
              init_std=0.1, attn_q_chunk=8, **extra, **kw)


def _data(b, t, seed=0):
  rng = np.random.default_rng(seed)
  tok_BT = rng.integers(0, V, (b, t + 1)).astype(np.int32)
  w_BT = (rng.random((b, t)) > 0.3).astype(np.float32)  # some positions off
  return jnp.asarray(tok_BT[:, :-1]), jnp.asarray(tok_BT[:, 1:]), jnp.asarray(
      w_BT)


def _losses(cfg, chunk):
  def full(params, inputs_BT, targets_BT, w_BT):
    logits_BTV, _ = model.forward(params, inputs_BT, cfg)
    return model.lm_loss(logits_BTV, targets_BT, w_BT)

  def chunked(params, inputs_BT, targets_BT, w_BT):
    h_BTD, _ = model.forward(params, inputs_BT, cfg, head=False)
    return lm_loss.loss(params, h_BTD, targets_BT, w_BT, cfg, chunk=chunk)

  return (jax.jit(jax.value_and_grad(full)),
          jax.jit(jax.value_and_grad(chunked)))


def _close(got, want, what):
  scale = float(np.max(np.abs(want))) or 1.0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale,
                             err_msg=what)


@pytest.mark.parametrize("attention,tied", CASES)
def test_chunked_loss_and_gradients_equal_the_full_ones(attention, tied):
  cfg = _model_cfg(attention, tied)
  params = init(cfg)
  inputs_BT, targets_BT, w_BT = _data(2, 13)   # 13 = 3 chunks of 4 + 1
  full, chunked = _losses(cfg, chunk=4)
  want, want_g = full(params, inputs_BT, targets_BT, w_BT)
  got, got_g = chunked(params, inputs_BT, targets_BT, w_BT)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert ("embed" in want_g) and (("head" in want_g) != tied)
  for (path, g), gw in zip(jax.tree_util.tree_leaves_with_path(got_g),
                           jax.tree.leaves(want_g)):
    _close(np.asarray(g), np.asarray(gw), jax.tree_util.keystr(path))


@pytest.mark.parametrize("chunk", [1, 5, 13, 64])
def test_any_chunk_gives_the_same_nll_and_zero_weights_drop_out(chunk):
  cfg = _model_cfg("mla", False)
  params = init(cfg)
  inputs_BT, targets_BT, w_BT = _data(2, 13, seed=1)
  h_BTD, _ = model.forward(params, inputs_BT, cfg, head=False)
  logits_BTV, _ = model.forward(params, inputs_BT, cfg)
  np.testing.assert_allclose(
      model.head_logits(h_BTD, model.head_weights(params, cfg), cfg),
      logits_BTV, rtol=1e-6, atol=1e-6)
  nll_BT = lm_loss.token_nll(h_BTD, model.head_weights(params, cfg),
                             targets_BT, cfg, chunk)
  np.testing.assert_allclose(nll_BT, model.token_nll(logits_BTV, targets_BT),
                             rtol=1e-5)
  # A zero-weight position's target does not matter, nor reach a gradient.
  other_BT = jnp.where(w_BT > 0, targets_BT, (targets_BT + 7) % V)
  for y_BT in (targets_BT, other_BT):
    np.testing.assert_allclose(
        lm_loss.loss(params, h_BTD, y_BT, w_BT, cfg, chunk),
        model.lm_loss(logits_BTV, targets_BT, w_BT), rtol=1e-6)


def test_chunk_must_be_positive():
  cfg = _model_cfg("mla", False)
  with pytest.raises(ValueError, match="chunk"):
    lm_loss.token_nll(jnp.zeros((1, 4, cfg.d_model)),
                      jnp.zeros((cfg.d_model, V)),
                      jnp.zeros((1, 4), jnp.int32), cfg, chunk=0)


def _sizes(jaxpr):
  return [math.prod(a.shape) for a in all_avals(jaxpr) if hasattr(a, "shape")]


@pytest.mark.parametrize("attention,tied", CASES)
@pytest.mark.parametrize("kind", ["pretrain", "sparse"])
def test_train_step_forms_no_btv_array(attention, tied, kind):
  """The jaxpr of the phase's gradient (what make_train_step jits) holds
  arrays with V (the head, one chunk's logits) but none of B*T*V elements;
  the full loss's does (the test can see one)."""
  cfg = override(get_config(), [
      "data.seq_len=48", "data.batch_size=2", f"model.vocab_size={V}",
      "model.lm_loss_chunk=16", "model.indexer.topk=8",
      f"model.attention_type={attention}", f"model.tie_embeddings={tied}"])
  phase = next(p for p in cfg.phases if p.kind == kind)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  flat = train.flatten(init(cfg.model))
  labels = train.labels_for(phase, list(flat))
  trainable = {k: v for k, v in flat.items() if k in labels}
  frozen = {k: v for k, v in flat.items() if k not in labels}
  inputs_BT, targets_BT, w_BT = _data(b, t)
  batch = {"inputs": inputs_BT, "targets": targets_BT, "weights": w_BT,
           "segment_ids": jnp.ones((b, t), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32),
                                         (b, t))}
  grad = jax.grad(train.make_loss_fn(cfg, phase), has_aux=True)
  jaxpr = jax.make_jaxpr(grad)(trainable, frozen, batch).jaxpr
  sizes = _sizes(jaxpr)
  assert b * 16 * V in sizes           # one chunk's logits
  assert b * t * V not in sizes, "a [B, T, V] array in the train step"
  # The same search finds the full loss's logits.
  full_cfg = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, lm_loss_chunk=t))
  full = jax.grad(train.make_loss_fn(full_cfg, phase), has_aux=True)
  jaxpr = jax.make_jaxpr(full)(trainable, frozen, batch).jaxpr
  assert b * t * V in _sizes(jaxpr)


def test_whole_jitted_train_step_forms_no_btv_array():
  """The step make_train_step jits (loss, gradient, optimizer), traced."""
  from dsax import sharding as S
  cfg = override(get_config(), [
      "data.seq_len=48", "data.batch_size=2", f"model.vocab_size={V}",
      "model.lm_loss_chunk=16"])
  phase = next(p for p in cfg.phases if p.kind == "pretrain")
  b, t = cfg.data.batch_size, cfg.data.seq_len
  mesh = S.make_mesh(cfg.mesh)
  state, frozen, tx, sched = train.init_state(cfg, phase, init(cfg.model),
                                              mesh)
  step = train.make_train_step(cfg, phase, tx, sched, mesh)
  inputs_BT, targets_BT, w_BT = _data(b, t)
  batch = {"inputs": inputs_BT, "targets": targets_BT, "weights": w_BT,
           "segment_ids": jnp.ones((b, t), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32),
                                         (b, t))}
  with jax.set_mesh(mesh):
    jaxpr = step.jitted.trace(state, frozen, batch).jaxpr.jaxpr
  sizes = _sizes(jaxpr)
  assert b * 16 * V in sizes and b * t * V not in sizes


def test_bench_lm_loss_runs_at_tiny_sizes(capsys):
  import os
  import re
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                  "experiments"))
  import bench_lm_loss
  bench_lm_loss.main(["--quick"])
  out = capsys.readouterr().out
  m = re.search(r"^summary: chunked_over_full=(\S+) chunked_peak_mb=(\S+) "
                r"full_peak_mb=(\S+)$", out, re.M)
  assert m and all(float(g) > 0 for g in m.groups())
  grad = re.search(r"max relative gradient difference (\S+)$", out, re.M)
  assert grad and float(grad.group(1)) < 1e-5
