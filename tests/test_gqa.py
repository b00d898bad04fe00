"""GQA attention (Llama/Qwen2 family) and DSA on it: numpy references,
causality by gradient, sparse == dense at k >= T, the warm-up KL, decode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import forward, init, tiny
from dsax import decode, gqa, model
from dsax import params as P
from dsax.attention import AttentionMode
from dsax.config import ConfigError, validate
from dsax.kernels.reference import sparse_gqa_reference
from test_model import _grad_wrt_embeddings

T = 24


def gqa_cfg(topk=4, **kw):
  base = tiny(**{**dict(attention_type="gqa", n_heads=4, n_kv_heads=2,
                        head_dim=16, init_std=0.1, attn_q_chunk=8), **kw})
  return dataclasses.replace(base, indexer=dataclasses.replace(
      base.indexer, topk=topk, q_chunk=8))


# One model for every test (initialising one is most of a test's time on
# CPU): biases, tied embeddings, 2 layers; k = 4 < T unless a test widens it.
CFG = gqa_cfg(topk=4, qkv_bias=True, tie_embeddings=True)


@pytest.fixture(scope="module")
def params():
  return init(CFG)


def with_topk(cfg, topk):
  return dataclasses.replace(cfg, indexer=dataclasses.replace(cfg.indexer,
                                                              topk=topk))


def tokens(seed=1, b=2, t=T):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 256)


def _rotate_half_np(x, pos, theta):
  """HF Llama's RoPE: x * cos + rotate_half(x) * sin, cos/sin = cat(f, f)."""
  h = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
  ang = np.concatenate([pos[:, None] * inv] * 2, -1)[:, None]  # T,1,H
  rot = np.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1)
  return x * np.cos(ang) + rot * np.sin(ang)


def _attention_np(q, k, v, seg, scale):
  """Per head n: softmax over s <= t in t's segment of q.k[g(n)], then v."""
  b, t, n, _ = q.shape
  m = n // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for ni in range(n):
      s = q[bi, :, ni] @ k[bi, :, ni // m].T * scale
      ok = (np.arange(t)[None] <= np.arange(t)[:, None]) & (
          seg[bi][None] == seg[bi][:, None])
      s = np.where(ok, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[bi, :, ni] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, ni // m]
  return out


def test_projections_and_dense_attention_match_numpy(params):
  """Biased projections + HF RoPE + segment-masked causal attention over
  three query chunks, against plain numpy."""
  cfg = dataclasses.replace(CFG, rope_theta=500.0)
  p = jax.tree.map(lambda x: x[0], params["layers"]["attn"])
  p = dict(p, bq=p["bq"] + 0.3, bk=p["bk"] - 0.2, bv=p["bv"] + 0.1)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 20, cfg.d_model))
  seg = np.array([[1] * 7 + [2] * 13, [1] * 20])

  @jax.jit
  def project_and_attend(p, x, seg):
    pos = model.default_positions(x[..., 0])
    proj = gqa.project(p, x, gqa.angles(pos, cfg), cfg)
    return proj.q, proj.rows, gqa.dense_attention(p, proj, cfg, seg)[0]

  q, (k, v), o = project_and_attend(p, x, jnp.asarray(seg))
  xn, pn = np.asarray(x, np.float64), {k_: np.asarray(w, np.float64)
                                       for k_, w in p.items()}
  proj = {c: np.einsum("btd,dgh->btgh", xn, pn[f"w{c}"]) + pn[f"b{c}"]
          for c in "qkv"}
  qn = _rotate_half_np(proj["q"], np.arange(20.0), 500.0)
  kn = _rotate_half_np(proj["k"], np.arange(20.0), 500.0)
  np.testing.assert_allclose(q, qn, atol=1e-5)
  np.testing.assert_allclose(k, kn, atol=1e-5)
  np.testing.assert_allclose(v, proj["v"], atol=1e-5)
  ref = _attention_np(qn, kn, proj["v"], seg, cfg.head_dim ** -0.5)
  np.testing.assert_allclose(o, ref, atol=1e-5)
  assert float(np.abs(ref).max()) > 0.1


def test_sparse_gqa_reference_matches_numpy_on_random_sets():
  b, t, n, g, h, kk = 2, 10, 6, 3, 8, 4
  ks = jax.random.split(jax.random.PRNGKey(3), 5)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, t, g, h))
  v = jax.random.normal(ks[2], (b, t, g, h))
  idx = jax.random.randint(ks[3], (b, t, kk), 0, t)
  valid = jax.random.bernoulli(ks[4], 0.7, (b, t, kk)).at[..., 0].set(True)
  o, lse = jax.jit(sparse_gqa_reference, static_argnames="q_chunk")(
      q, k, v, idx, valid, 0.3, q_chunk=4)
  qn, kn, vn, o, lse = (np.asarray(a, np.float64) for a in (q, k, v, o, lse))
  idx, valid = np.asarray(idx), np.asarray(valid)
  for bi in range(b):
    for ti in range(t):
      for ni in range(n):
        sel = idx[bi, ti][valid[bi, ti]]
        s = kn[bi, sel, ni // 2] @ qn[bi, ti, ni] * 0.3
        p = np.exp(s - s.max())
        np.testing.assert_allclose(
            o[bi, ti, ni], (p / p.sum()) @ vn[bi, sel, ni // 2], atol=1e-5)
        np.testing.assert_allclose(lse[bi, ti, ni],
                                   s.max() + np.log(p.sum()), atol=1e-5)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_causality_and_segments_by_gradient(params, attention):
  seg = jnp.array([[1] * 9 + [2] * 15])
  ts = (3, 8, 9, 20)
  grads = _grad_wrt_embeddings(CFG, params, tokens(b=1), ts, seg,
                               AttentionMode.of(CFG, attention))
  for t, g in zip(ts, grads):
    assert np.all(g[t + 1:] == 0.0), t
    if t >= 9:
      assert np.all(g[:9] == 0.0), t
    assert np.abs(g[t]).sum() > 0


def test_sparse_equals_dense_when_k_covers_the_sequence(params):
  cfg = with_topk(CFG, T)
  seg = jnp.array([[1] * 10 + [2] * 14, [1] * T])
  def mode(c, kind):
    return AttentionMode.of(c, kind, indexer_loss=True, recall=True)

  dense, aux_d = forward(params, tokens(), cfg, seg, mode=mode(cfg, "dense"))
  sparse, aux = forward(params, tokens(), cfg, seg, mode=mode(cfg, "sparse"))
  np.testing.assert_allclose(sparse, dense, atol=2e-5, rtol=0)
  # Restricted to every visible key, the sparse KL is the dense KL.
  np.testing.assert_allclose(aux.indexer_kl, aux_d.indexer_kl, rtol=1e-4)
  assert np.all(np.isfinite(aux_d.indexer_kl))
  assert float(aux_d.indexer_kl.min()) > 0
  np.testing.assert_allclose(aux.recall, 1.0, atol=1e-6)
  # With k < T the selection is sparse: later positions differ, recall < 1.
  sp4, aux4 = forward(params, tokens(), CFG, mode=mode(CFG, "sparse"))
  assert float(jnp.abs(sp4[:, 12:] - dense[:, 12:]).max()) > 1e-3
  assert np.all(aux4.recall < 1) and np.all(
      aux4.recall_oracle >= aux4.recall - 1e-6)


def test_warmup_kl_is_zero_when_both_sides_are_uniform(params):
  """Zero queries give uniform attention over the visible keys; zero
  indexer weights give uniform indexer scores: KL = 0 exactly (up to f32)."""
  layers = params["layers"]
  params = dict(params, layers=dict(layers, attn=dict(
      layers["attn"], wq=jnp.zeros_like(layers["attn"]["wq"]),
      bq=jnp.zeros_like(layers["attn"]["bq"])),
      indexer=dict(layers["indexer"], weights_proj=jnp.zeros_like(
          layers["indexer"]["weights_proj"]))))
  _, aux = forward(params, tokens(), CFG,
                   mode=AttentionMode.of(CFG, indexer_loss=True))
  np.testing.assert_allclose(aux.indexer_kl, 0.0, atol=1e-6)


def test_indexer_loss_reaches_only_the_indexer(params):
  def kl(p, attention):
    mode = AttentionMode.of(CFG, attention, indexer_loss=True)
    return model.forward(p, tokens(), CFG, mode=mode)[1].indexer_kl.sum()

  for attention in ("dense", "sparse"):
    g = jax.jit(jax.grad(kl), static_argnums=1)(params, attention)
    for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
      moved = float(jnp.abs(leaf).sum()) > 0
      assert moved == ("indexer" in jax.tree_util.keystr(path)), (attention,
                                                                  path)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_decode_matches_forward(params, attention):
  cfg = CFG
  toks = tokens()
  mode = AttentionMode.of(cfg, attention)
  full, _ = forward(params, toks, cfg, mode=mode)
  prompt = 6
  first, cache = decode.prefill(params, toks[:, :prompt], cfg, T, mode)
  assert cache["k"].shape == (cfg.n_layers, 2, T, 2, 16)
  step = jax.jit(decode.decode_step, static_argnums=(3, 4))
  outs = [first]
  for t in range(prompt, T):
    out, cache = step(params, cache, toks[:, t], cfg, mode)
    outs.append(out[:, None])
  dec = jnp.concatenate(outs, axis=1)
  np.testing.assert_array_less(np.abs(np.asarray(dec - full)).max(), 1e-4)
  # Greedy generation: each new token is the argmax of the forward on the
  # generated row so far. Generated to T tokens: the cache and the forward
  # have the shapes compiled above.
  prompt = T - 3
  gen = decode.generate(params, toks[:, :prompt], cfg, 3, mode=mode)
  again, _ = forward(params, gen, cfg, mode=mode)
  np.testing.assert_array_equal(gen[:, prompt:],
                                jnp.argmax(again[:, prompt - 1:-1], -1))


def test_param_count_and_config_checks():
  # Shapes from the specs init_params uses (tests/test_model.py checks
  # that the arrays have them).
  for kw in ({}, {"qkv_bias": True, "tie_embeddings": True}):
    cfg = gqa_cfg(**kw)
    assert P.count_tree(P.abstract_params(cfg)) == P.param_count(cfg)
  # The indexer reads h (D wide), whatever the unused MLA q_lora_rank says.
  wq_b = P.abstract_params(gqa_cfg())["layers"]["indexer"]["wq_b"]
  assert wq_b.shape[1] == 64
  with pytest.raises(ConfigError, match="n_kv_heads=3 must divide"):
    validate(gqa_cfg(n_kv_heads=3))
  with pytest.raises(ConfigError, match="head_dim must be even"):
    validate(gqa_cfg(head_dim=15))
  with pytest.raises(ConfigError, match="attention_type"):
    validate(gqa_cfg(attention_type="mqa"))


def test_gqa_warmup_kernel_path_equals_reference():
  """kernel_impl="pallas" (interpret mode on CPU): dense GQA and its fused
  warm-up KL through mla_flash with k/v repeated per head; logits, KL and
  every gradient agree with the jnp path."""
  from test_kernels_model import check_impls_agree
  check_impls_agree("dense", attention_type="gqa",
                    n_kv_heads=2, head_dim=16)
