"""Foundation invariants: causality, counts, overfitting, MoE (decode ==
forward is in test_decode.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import forward, init, tiny
from dsax import model
from dsax import params as P
from dsax import moe
from dsax.config import MoEConfig, RopeScaling


@pytest.mark.parametrize("tied", [False, True])
def test_initial_loss_is_near_uniform(tied):
  """At init the model predicts close to uniform, tied embeddings too."""
  cfg = tiny(tie_embeddings=tied)
  toks = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, cfg.vocab_size)
  logits, _ = forward(init(cfg), toks, cfg)
  loss = float(model.lm_loss(logits[:, :-1], toks[:, 1:]))
  assert abs(loss - np.log(cfg.vocab_size)) < 0.5, loss


def test_yarn_changes_logits():
  base = tiny(init_std=0.1)
  yarn = dataclasses.replace(base, rope_scaling=RopeScaling(
      enabled=True, factor=4.0, original_max_position=8))
  params = init(base)
  toks = jnp.arange(24)[None] % 256
  a, _ = forward(params, toks, base)
  b, _ = forward(params, toks, yarn)
  assert float(jnp.abs(a - b).max()) > 1e-3


def _grad_wrt_embeddings(cfg, params, toks, ts, segment_ids=None,
                         mode=None):
  """d log p(token 7 at position t) / d embeddings, [T, D] for each t."""
  emb = model.embed(params, toks, cfg)

  def f(e, t):
    logits, _ = model.forward(params, toks, cfg, segment_ids,
                              embeddings_BTD=e, mode=mode)
    return jax.nn.log_softmax(logits[0, t])[7]
  g = jax.jit(jax.grad(f))
  return [np.asarray(g(emb, t))[0] for t in ts]


def test_causality_by_gradient():
  cfg = tiny(init_std=0.1, attn_q_chunk=8)  # several query chunks
  params = init(cfg)
  toks = jax.random.randint(jax.random.PRNGKey(2), (1, 20), 0, 256)
  ts = (0, 7, 8, 13)
  for t, g in zip(ts, _grad_wrt_embeddings(cfg, params, toks, ts)):
    assert np.all(g[t + 1:] == 0.0), t
    assert np.abs(g[:t + 1]).sum(axis=-1).min() > 0


def test_packed_documents_do_not_attend_across_boundaries():
  cfg = tiny(init_std=0.1, attn_q_chunk=8)
  params = init(cfg)
  toks = jax.random.randint(jax.random.PRNGKey(3), (1, 20), 0, 256)
  seg = jnp.array([[1] * 6 + [2] * 9 + [3] * 5])
  g, = _grad_wrt_embeddings(cfg, params, toks, (10,), seg)
  assert np.all(g[:6] == 0.0) and np.all(g[11:] == 0.0)
  assert np.abs(g[6:11]).sum(axis=-1).min() > 0
  # A document's logits do not depend on what precedes it in the row.
  other = toks.at[0, :6].set((toks[0, :6] + 1) % 256)
  a, _ = forward(params, toks, cfg, seg)
  b, _ = forward(params, other, cfg, seg)
  np.testing.assert_array_equal(np.asarray(a[0, 6:]), np.asarray(b[0, 6:]))


_MOE = dict(n_routed_experts=6, n_activated=2, d_expert=8, n_group=3,
            topk_group=2)


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": 0},
                                {"tie_embeddings": True},
                                {"attention_type": "gqa"},
                                {"attention_type": "gqa", "qkv_bias": True,
                                 "n_kv_heads": 1},
                                {"moe": MoEConfig(**_MOE,
                                                  topk_method="noaux_tc")},
                                {"n_layers": 3, "moe": MoEConfig(
                                    **_MOE, first_k_dense=0,
                                    n_shared_experts=2)}])
def test_param_count_and_deterministic_init(kw):
  cfg = tiny(**kw)
  a, b = init(cfg, 5), init(cfg, 5)
  assert P.count_tree(a) == P.param_count(cfg)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  c = init(cfg, 6)
  assert any(not np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(c)))
  # Specs, logical axes and arrays describe the same tree.
  axes = P.logical_axes(cfg)
  for arr, ax in zip(jax.tree.leaves(a), jax.tree.leaves(
      axes, is_leaf=lambda x: isinstance(x, tuple))):
    assert arr.ndim == len(ax)


def test_bf16_policy_keeps_softmax_and_logits_f32():
  cfg = tiny(param_dtype="bfloat16", compute_dtype="bfloat16")
  params = init(cfg)
  assert params["layers"]["attn"]["wq_a"].dtype == jnp.bfloat16
  assert params["layers"]["indexer"]["weights_proj"].dtype == jnp.float32
  logits, _ = forward(params, jnp.zeros((1, 8), jnp.int32), cfg)
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_tiny_model_overfits_one_batch():
  """A fixed random batch of 4 x 32 bytes starts at ln(256) = 5.55 nats; the
  tiny model must memorise it to below 0.5 nats in 200 Adam steps."""
  cfg = tiny()
  params = init(cfg)
  toks = jax.random.randint(jax.random.PRNGKey(4), (4, 33), 0, 256)
  inputs, targets = toks[:, :-1], toks[:, 1:]
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      return model.lm_loss(model.forward(p, inputs, cfg)[0], targets)
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss

  first = None
  for _ in range(200):
    params, state, loss = step(params, state)
    first = float(loss) if first is None else first
  assert first > 5.0
  assert float(loss) < 0.5, float(loss)


def _moe_reference(p, h, m):
  """DeepSeekMoE per token in float64 numpy (dsax.moe's equations)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  swi = lambda x, g, u, d: (x @ g / (1 + np.exp(-(x @ g))) * (x @ u)) @ d
  out = np.zeros_like(h)
  for i, x in enumerate(h):
    logits = x @ p["router"]
    s = (np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
         if m.score_func == "softmax" else 1 / (1 + np.exp(-logits)))
    c = s + p.get("router_bias", 0.0)
    if m.topk_method != "greedy":
      grouped = c.reshape(m.n_group, -1)
      gs = (np.sort(grouped, -1)[:, -2:].sum(-1)
            if m.topk_method == "noaux_tc" else grouped.max(-1))
      keep = np.zeros(m.n_group, bool)
      keep[np.argsort(-gs)[:m.topk_group]] = True
      c = np.where(np.repeat(keep, grouped.shape[1]), c, -np.inf)
    sel = np.argsort(-c)[:m.n_activated]
    w = s[sel] / (s[sel].sum() if m.norm_topk_prob else 1.0)
    w = w * m.routed_scaling_factor
    for j, e in zip(sel, w):
      out[i] += e * swi(x, p["w_gate"][j], p["w_up"][j], p["w_down"][j])
    if "shared" in p:
      sh = p["shared"]
      out[i] += swi(x, sh["w_gate"], sh["w_up"], sh["w_down"])
  return out


@pytest.mark.parametrize("method,score", [("greedy", "softmax"),
                                          ("group_limited_greedy", "softmax"),
                                          ("noaux_tc", "sigmoid")])
def test_moe_matches_per_token_reference(method, score):
  """Routing (groups, the selection-only bias, normalisation, scaling) and
  the dense dispatch against a per-token loop; the bias must change some
  selections for the noaux_tc case to test anything."""
  m = MoEConfig(n_routed_experts=8, n_activated=3, d_expert=8, n_group=4,
                topk_group=2, topk_method=method, score_func=score,
                norm_topk_prob=score == "sigmoid", routed_scaling_factor=1.5)
  cfg = tiny(moe=m)
  p = jax.tree.map(lambda a: a[0], init(cfg)["moe"])
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  p["router"] = jax.random.normal(keys[0], p["router"].shape)
  if "router_bias" in p:
    p["router_bias"] = 0.5 * jax.random.normal(keys[1], (8,))
  h = jax.random.normal(keys[2], (40, cfg.d_model))
  y = jax.jit(moe.moe_block, static_argnums=2)(p, h[None], cfg)[0]
  np.testing.assert_allclose(np.asarray(y), _moe_reference(p, np.asarray(
      h, np.float64), m), rtol=1e-4, atol=1e-5)
  if "router_bias" in p:
    gates = jax.jit(moe.gates, static_argnums=2)
    _, idx = gates(p, h[None], cfg)
    _, idx0 = gates(dict(p, router_bias=0 * p["router_bias"]), h[None], cfg)
    assert not np.array_equal(np.sort(idx, -1), np.sort(idx0, -1))
