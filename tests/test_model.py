"""Foundation invariants: decode == forward, causality, counts, overfitting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import init, tiny
from dsax import decode, model
from dsax import params as P
from dsax.config import RopeScaling


@pytest.mark.parametrize("q_lora_rank", [32, 0])
@pytest.mark.parametrize("yarn", [False, True])
def test_absorbed_decode_matches_expanded_forward(q_lora_rank, yarn):
  # YaRN with original length 8 < sequence length 24 so the frequency
  # correction and mscale are both active.
  cfg = tiny(q_lora_rank=q_lora_rank, init_std=0.1, attn_q_chunk=8,
             rope_scaling=RopeScaling(enabled=yarn, factor=4.0,
                                      original_max_position=8))
  params = init(cfg)
  toks = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.vocab_size)
  logits, _ = model.forward(params, toks, cfg)
  assert float(jnp.std(logits)) > 0.1  # a non-trivial model
  prompt = 5
  first, cache = decode.prefill(params, toks[:, :prompt], cfg, 24)
  steps = [first]
  step = jax.jit(decode.decode_step, static_argnums=3)
  for t in range(prompt, 24):
    out, cache = step(params, cache, toks[:, t], cfg)
    steps.append(out[:, None])
  dec = jnp.concatenate(steps, axis=1)
  np.testing.assert_array_less(np.abs(np.asarray(dec - logits)).max(), 1e-4)
  # The cache holds only C + R numbers per token and layer.
  assert cache["kv"].shape[-1] + cache["k_rope"].shape[-1] == (
      cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_yarn_changes_logits():
  base = tiny(init_std=0.1)
  yarn = dataclasses.replace(base, rope_scaling=RopeScaling(
      enabled=True, factor=4.0, original_max_position=8))
  params = init(base)
  toks = jnp.arange(24)[None] % 256
  a, _ = model.forward(params, toks, base)
  b, _ = model.forward(params, toks, yarn)
  assert float(jnp.abs(a - b).max()) > 1e-3


def _grad_wrt_embeddings(cfg, params, toks, ts, segment_ids=None,
                         attention="dense"):
  """d log p(token 7 at position t) / d embeddings, [T, D] for each t."""
  emb = model.embed(params, toks, cfg)

  def f(e, t):
    logits, _ = model.forward(params, toks, cfg, segment_ids,
                              embeddings_BTD=e, attention=attention)
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
  a, _ = model.forward(params, toks, cfg, seg)
  b, _ = model.forward(params, other, cfg, seg)
  np.testing.assert_array_equal(np.asarray(a[0, 6:]), np.asarray(b[0, 6:]))


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": 0},
                                {"tie_embeddings": True}])
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
  logits, _ = model.forward(params, jnp.zeros((1, 8), jnp.int32), cfg)
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
