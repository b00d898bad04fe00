"""dsax.moe: the grouped dispatch equals the dense reference (outputs and
gradients, every routing variant, both grouped impls), forced experts (keep
routing), the load-balance maths, the model's MoE aux, and bench_moe at
tiny sizes. The per-token float64 reference is in test_model.py."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init, largest_size, tiny
from dsax import model, moe
from dsax.attention import AttentionMode
from dsax.config import MoEConfig

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Every routing variant dsax imports (dsax.hf.deepseek): V2 softmax greedy
# and group-limited (with and without normalised top-k weights, scaled),
# V3 sigmoid noaux_tc with its selection bias; shared experts 0, 1, 2.
VARIANTS = {
    "v2_greedy": dict(score_func="softmax", topk_method="greedy",
                      n_shared_experts=2),
    "v2_group_limited": dict(score_func="softmax",
                             topk_method="group_limited_greedy", n_group=4,
                             topk_group=2, norm_topk_prob=True,
                             routed_scaling_factor=16.0, n_shared_experts=2),
    "v3_noaux": dict(score_func="sigmoid", topk_method="noaux_tc", n_group=4,
                     topk_group=2, norm_topk_prob=True,
                     routed_scaling_factor=2.5, n_shared_experts=1),
    "sigmoid_greedy_no_shared": dict(score_func="sigmoid",
                                     topk_method="greedy",
                                     n_shared_experts=0),
}


def _layer(variant, n_experts=8, k=3, seed=0):
  """A tiny config and one MoE layer's params with a random router (and
  selection bias) large enough that the routing varies per token."""
  cfg = tiny(moe=MoEConfig(n_routed_experts=n_experts, n_activated=k,
                           d_expert=8, **VARIANTS[variant]))
  p = jax.tree.map(lambda a: a[0], init(cfg, seed)["moe"])
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), 5)
  p["router"] = 0.3 * jax.random.normal(keys[0], p["router"].shape)
  for name, key in zip(("w_gate", "w_up", "w_down"), keys[1:4]):
    p[name] = 0.15 * jax.random.normal(key, p[name].shape)
  if "router_bias" in p:
    p["router_bias"] = 0.5 * jax.random.normal(keys[4], p["router_bias"].shape)
  return cfg, p


def _value_and_grads(p, x_BTD, cfg, **kw):
  r_BTD = jax.random.normal(jax.random.PRNGKey(9), x_BTD.shape)

  def loss(p, x_BTD):
    y_BTD, _ = moe.moe_forward(p, x_BTD, cfg, **kw)
    return jnp.sum(y_BTD * r_BTD), y_BTD

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                             has_aux=True))(p, x_BTD)
  return y, grads


def _assert_close(a, b, tol=1e-5):
  """Each array of ``a`` within ``tol`` of ``b``'s, relative to the largest
  entry of ``b``'s (or absolute below 1): f32 sums of many terms, e.g. the
  router gradient, round at 1e-7 of their scale, not of each entry."""
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    scale = max(1.0, float(np.abs(v).max()))
    err = float(np.abs(u - v).max())
    assert err <= tol * scale, (jax.tree_util.keystr(path), err, scale)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_grouped_equals_dense_outputs_and_gradients(variant):
  """Outputs and gradients (every parameter and the input) of the grouped
  dispatch, blocks (padding inside blocks, several blocks per expert) and
  ragged_dot, equal the dense reference within 1e-5 (f32)."""
  cfg, p = _layer(variant)
  x_BTD = jax.random.normal(jax.random.PRNGKey(3), (2, 24, cfg.d_model))
  y_ref, g_ref = _value_and_grads(p, x_BTD, cfg, dispatch="dense")
  assert float(jnp.abs(g_ref[0]["router"]).max()) > 1e-3  # routing learns
  for kw in (dict(impl="blocks", block=4), dict(impl="blocks", block=16),
             dict(impl="ragged")):
    y, g = _value_and_grads(p, x_BTD, cfg, dispatch="grouped", **kw)
    _assert_close(y, y_ref)
    _assert_close(g, g_ref)


def test_expert_layout_sorts_pads_and_inverts():
  idx_UK = jnp.array([[2, 0], [2, 1], [0, 2], [2, 3], [1, 2]], jnp.int32)
  u, k, x, block = 5, 2, 4, 2
  lay = moe.expert_layout(idx_UK, x, block)
  np.testing.assert_array_equal(lay.sizes_X, [2, 2, 5, 1])
  # padded sizes 2, 2, 6, 2: 12 rows used in 6 blocks of R = 14, the
  # static bound M + X (b - 1); the unused block says expert X - 1
  assert int(lay.n_used) == 6 and lay.token_R.shape == (14,)
  np.testing.assert_array_equal(lay.expert_Z, [0, 1, 2, 2, 2, 3, 3])
  src = np.asarray(lay.src_R)
  dest = np.asarray(lay.dest_UK)
  for m in range(u * k):  # each assignment sits in a block of its expert
    r = dest[m // k, m % k]
    assert src[r] == m and lay.expert_Z[r // block] == idx_UK[m // k, m % k]
  pad = src == u * k
  assert pad.sum() == 14 - u * k
  np.testing.assert_array_equal(np.asarray(lay.token_R)[pad], u)
  # stable: token order within an expert
  rows2 = src[lay.expert_Z.repeat(block) == 2]
  assert list(rows2[rows2 < u * k]) == sorted(rows2[rows2 < u * k])


def test_gather_and_sum_rows_are_each_others_transpose():
  idx_UK = jax.random.randint(jax.random.PRNGKey(0), (7, 3), 0, 5)
  lay = moe.expert_layout(idx_UK, 5, 4)
  x_UD = jax.random.normal(jax.random.PRNGKey(1), (7, 6))
  y_RD = jax.random.normal(jax.random.PRNGKey(2), (lay.token_R.shape[0], 6))
  y_RD = jnp.where((lay.src_R < 21)[:, None], y_RD, 0.0)
  # <gather(x), y> = <x, sum(y)>, and each custom VJP is the other op
  lhs = jnp.sum(moe.gather_rows(x_UD, lay.token_R, lay.dest_UK) * y_RD)
  rhs = jnp.sum(x_UD * moe.sum_rows(y_RD, lay.token_R, lay.dest_UK))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
  _, vjp = jax.vjp(lambda a: moe.gather_rows(a, lay.token_R, lay.dest_UK),
                   x_UD)
  np.testing.assert_allclose(vjp(y_RD)[0], moe.sum_rows(
      y_RD, lay.token_R, lay.dest_UK), rtol=1e-6)


def test_grouped_forms_no_per_expert_activation():
  """The grouped step (forward+backward) forms nothing larger than its
  expert-sorted row buffer [R, D], R <= B*T*K + X*(block-1), while the dense
  reference forms B*T*X*F (its per-expert activations)."""
  cfg = tiny(moe=MoEConfig(n_routed_experts=16, n_activated=2, d_expert=16))
  p = jax.tree.map(lambda a: a[0], init(cfg)["moe"])
  x_BTD = jnp.ones((2, 64, cfg.d_model))

  def loss(p, x_BTD, dispatch):
    return jnp.sum(moe.moe_forward(p, x_BTD, cfg, dispatch=dispatch,
                                   impl="blocks", block=8)[0])

  btxf = 2 * 64 * 16 * 16
  r = (2 * 64 * 2 + 16 * 7) // 8 * 8
  dense = jax.make_jaxpr(jax.grad(loss, (0, 1)), static_argnums=2)(
      p, x_BTD, "dense")
  grouped = jax.make_jaxpr(jax.grad(loss, (0, 1)), static_argnums=2)(
      p, x_BTD, "grouped")
  assert largest_size(dense.jaxpr) >= btxf
  assert largest_size(grouped.jaxpr) == r * cfg.d_model < btxf


@pytest.mark.parametrize("dispatch", ["grouped", "dense"])
def test_forced_experts_replace_the_top_k(dispatch):
  """Given experts are used instead of the router's top-k; the weights are
  the current router's scores of those experts (normalised, scaled); its
  own choices given back reproduce the free forward exactly."""
  cfg, p = _layer("v3_noaux")
  x_BTD = jax.random.normal(jax.random.PRNGKey(3), (2, 16, cfg.d_model))
  y, aux = moe.moe_forward(p, x_BTD, cfg, dispatch=dispatch)
  y2, aux2 = moe.moe_forward(p, x_BTD, cfg, dispatch=dispatch,
                             experts_BTK=aux.experts)
  np.testing.assert_array_equal(y, y2)
  np.testing.assert_array_equal(aux.experts, aux2.experts)
  forced = (aux.experts + 1) % cfg.moe.n_routed_experts
  y3, aux3 = moe.moe_forward(p, x_BTD, cfg, dispatch=dispatch,
                             experts_BTK=forced)
  np.testing.assert_array_equal(aux3.experts, forced)
  s, _ = moe.router_scores(p, x_BTD, cfg)
  w = jnp.take_along_axis(s, forced, -1)
  w = 2.5 * w / (w.sum(-1, keepdims=True) + 1e-20)
  want = moe.dense_experts(p, x_BTD, w, forced, cfg) + moe.swiglu(
      p["shared"], x_BTD, jnp.float32)
  np.testing.assert_allclose(y3, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="experts_BTK has shape"):
    moe.moe_forward(p, x_BTD, cfg, experts_BTK=forced[..., :2])


def test_forced_experts_gradients_match_dense():
  cfg, p = _layer("v2_group_limited")
  x_BTD = jax.random.normal(jax.random.PRNGKey(3), (1, 20, cfg.d_model))
  forced = jax.random.randint(jax.random.PRNGKey(4), (1, 20, 3), 0, 8)
  y_ref, g_ref = _value_and_grads(p, x_BTD, cfg, dispatch="dense",
                                  experts_BTK=forced)
  y, g = _value_and_grads(p, x_BTD, cfg, experts_BTK=forced, block=4)
  _assert_close(y, y_ref)
  _assert_close(g, g_ref)


def _balance_numpy(s, idx, mask, x, k):
  out = []
  for b in range(s.shape[0]):
    v = mask[b].astype(bool)
    if not v.any():
      continue
    t = v.sum()
    counts = np.zeros(x)
    for row in idx[b][v]:
      for e in row:
        counts[e] += 1
    f = x / (k * t) * counts
    sn = s[b][v] / s[b][v].sum(-1, keepdims=True)
    out.append(np.sum(f * sn.mean(0)))
  return np.mean(out)


def test_balance_loss_matches_its_definition():
  x, k = 6, 2
  s = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(0), (3, 10, x)))
  idx = jax.lax.top_k(s, k)[1]
  mask = np.ones((3, 10), bool)
  mask[0, 7:] = False
  mask[2] = False  # a row of padding only: left out of the mean
  got = moe.balance_loss(s, idx, jnp.asarray(mask))
  np.testing.assert_allclose(got, _balance_numpy(
      np.asarray(s, np.float64), np.asarray(idx), mask, x, k), rtol=1e-5)
  # balanced choices with uniform scores: exactly 1
  even = jnp.arange(12).reshape(1, 6, 2) % x
  np.testing.assert_allclose(moe.balance_loss(jnp.ones((1, 6, x)), even),
                             1.0, rtol=1e-6)
  # the counts carry no gradient: d/ds goes through P only
  g = jax.grad(lambda s: moe.balance_loss(s, idx))(s)
  assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0


def test_router_bias_update_and_load_stats():
  bias = jnp.zeros((2, 4))
  load = jnp.array([[4.0, 4.0, 4.0, 4.0], [10.0, 2.0, 4.0, 0.0]])
  new = moe.update_router_bias(bias, load, 1e-3)
  np.testing.assert_allclose(new, [[0, 0, 0, 0], [-1e-3, 1e-3, 0, 1e-3]])
  stats = moe.load_stats(load)
  np.testing.assert_allclose(stats["moe_maxvio"], (0.0 + 1.5) / 2)
  np.testing.assert_allclose(stats["moe_maxvio_worst"], 1.5)
  np.testing.assert_allclose(stats["moe_idle"], 1 / 8)


def _moe_model(**kw):
  return tiny(n_layers=3, init_std=0.1, moe=MoEConfig(
      n_routed_experts=8, n_activated=2, d_expert=8, first_k_dense=1,
      topk_method="noaux_tc", score_func="sigmoid", n_group=4, topk_group=2,
      norm_topk_prob=True), **kw)


def test_model_reports_load_and_replays_experts():
  """forward reports the MoE layers' load (valid tokens only), balance loss
  and, with mode.experts, the chosen experts; given back, they reproduce the
  logits exactly, and they hold when the router moves."""
  cfg = _moe_model()
  params = init(cfg)
  toks = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
  seg = jnp.ones((2, 16), jnp.int32).at[1, 12:].set(0)  # 4 padding tokens
  mode = AttentionMode.of(cfg, experts=True)
  logits, aux = model.forward(params, toks, cfg, seg, mode=mode)
  assert aux.expert_load.shape == (2, 8) and aux.balance_loss.shape == (2,)
  assert aux.experts.shape == (2, 2, 16, 2)
  np.testing.assert_array_equal(aux.expert_load.sum(-1), [28 * 2] * 2)
  assert model.forward(params, toks, cfg, seg)[1].experts is None
  again, aux2 = model.forward(params, toks, cfg, seg, mode=mode,
                              experts_LBTK=aux.experts)
  np.testing.assert_array_equal(logits, again)
  np.testing.assert_array_equal(aux.experts, aux2.experts)
  moved = jax.tree.map(lambda a: a, params)
  moved["moe"]["router"] = params["moe"]["router"] + 0.5 * jax.random.normal(
      jax.random.PRNGKey(2), params["moe"]["router"].shape)
  free = model.forward(moved, toks, cfg, seg, mode=mode)[1].experts
  kept = model.forward(moved, toks, cfg, seg, mode=mode,
                       experts_LBTK=aux.experts)[1].experts
  assert not np.array_equal(free, aux.experts)
  np.testing.assert_array_equal(kept, aux.experts)
  with pytest.raises(ValueError, match="MoE layers only"):
    model.forward(params, toks, cfg, seg, experts_LBTK=jnp.concatenate(
        [aux.experts, aux.experts[:1]]))


def test_bench_moe_runs_at_tiny_sizes(capsys):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import bench_moe
  bench_moe.main(["--quick"])
  out = capsys.readouterr().out
  m = re.search(r"^summary: grouped_over_dense=(\S+) grouped_peak_mb=(\S+)$",
                out, re.M)
  assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0
