"""The dense path (kernels.causal_blocks; mla/gqa.dense_attention): outputs
and gradients equal a plain masked-softmax T x T reference (MLA and GQA,
packed segments, T not a multiple of the block), the warm-up KL equals the
probe path's, nothing T x S is formed, and the traced program does not grow
with T."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import all_avals, init, tiny
from dsax import gqa, mla, model
from dsax.attention import AttentionMode
from dsax.kernels import causal_blocks
from dsax.kernels.query_chunks import causal_segment_mask, map_causal_chunks
from dsax.kernels.reference import NEG_INF

B, T = 2, 20          # T is not a multiple of the block
SEG = jnp.array([[1] * 7 + [2] * 9 + [3] * 4, [5] * 20])


def plain_attention(qs, ks, v, scale, seg_BT):
  """Masked softmax over the whole T x T, every kv head repeated."""
  n, t = qs[0].shape[2], qs[0].shape[1]
  s_BNTS = sum(jnp.einsum("btnx,bsnx->bnts", q,
                          jnp.repeat(k, n // k.shape[2], axis=2))
               for q, k in zip(qs, ks)) * scale
  mask_BTS = causal_segment_mask(jnp.arange(t), jnp.arange(t), seg_BT, seg_BT)
  s_BNTS = jnp.where(mask_BTS[:, None], s_BNTS, NEG_INF)
  lse_BNT = jax.nn.logsumexp(s_BNTS, axis=-1)
  p_BNTS = jnp.exp(s_BNTS - lse_BNT[..., None])
  o_BTNE = jnp.einsum("bnts,bsne->btne", p_BNTS,
                      jnp.repeat(v, n // v.shape[2], axis=2))
  return o_BTNE, jnp.swapaxes(lse_BNT, 1, 2)


# (query parts' dims, key parts' kv heads, value heads) with N = 4:
# MLA's expanded form (per-head no-rope part, one shared rope key) and GQA.
LAYOUTS = {"mla": ((6, 3), (4, 1), 4), "gqa": ((5,), (2,), 2)}


def _inputs(layout, seed=0):
  dims, groups, gv = LAYOUTS[layout]
  ks_ = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
  qs = tuple(jax.random.normal(next(ks_), (B, T, 4, d)) for d in dims)
  ks = tuple(jax.random.normal(next(ks_), (B, T, g, d))
             for g, d in zip(groups, dims))
  v = jax.random.normal(next(ks_), (B, T, gv, 3))
  ct = (jax.random.normal(next(ks_), (B, T, 4, 3)),
        jax.random.normal(next(ks_), (B, T, 4)))
  return qs, ks, v, ct


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("block", [8, 32])
def test_attention_and_gradients_match_plain_softmax(layout, block):
  qs, ks, v, (ct_o, ct_lse) = _inputs(layout)

  def run(fn):
    """((o, lse), gradients w.r.t. qs, ks, v): one program."""
    def loss(qs, ks, v):
      o, lse = fn(qs, ks, v)
      return jnp.sum(o * ct_o) + jnp.sum(lse * ct_lse), (o, lse)
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
        qs, ks, v)

  (_, out_fast), g_fast = run(lambda qs, ks, v: causal_blocks.attention(
      qs, ks, v, 0.4, SEG, block=block))
  (_, out_ref), g_ref = run(lambda qs, ks, v: plain_attention(
      qs, ks, v, 0.4, SEG))
  for a, b in zip(out_fast, out_ref):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    assert float(jnp.abs(b).max()) > 1e-3
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_attention_is_causal_and_stays_in_segment_by_gradient():
  qs, ks, v, _ = _inputs("mla", seed=1)
  t = 10                                # segment 2 is [7, 16)

  def out(ks, v):
    o, _ = causal_blocks.attention(qs, ks, v, 0.4, SEG, block=8)
    return jnp.sum(o[0, t])

  dks, dv = jax.jit(jax.grad(out, (0, 1)))(ks, v)
  for g in jax.tree.leaves((dks, dv)):
    per_key = np.abs(np.asarray(g[0])).sum(axis=(1, 2))
    assert np.all(per_key[t + 1:] == 0) and np.all(per_key[:7] == 0)
    assert per_key[7:t + 1].min() > 0


def _model_cfg(kind, **kw):
  if kind == "gqa":
    kw = dict(attention_type="gqa", n_kv_heads=2, head_dim=16, **kw)
  return tiny(**{**dict(init_std=0.1, attn_q_chunk=8), **kw})


def _plain_layer(p, proj, cfg, seg_BT):
  """The layer's core attention from its projections, T x T."""
  if cfg.attention_type == "gqa":
    k_BSGH, v_BSGH = proj.rows
    return plain_attention((proj.q,), (k_BSGH,), v_BSGH,
                           gqa.softmax_scale(cfg), seg_BT)[0]
  kv_BSC, k_rope_BSR = proj.rows
  k_nope_BSNH, v_BSNE = mla.expanded_keys(p, kv_BSC, cfg)
  return plain_attention((proj.q, proj.q_rope),
                         (k_nope_BSNH, k_rope_BSR[:, :, None]), v_BSNE,
                         mla.softmax_scale(cfg), seg_BT)[0]


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_dense_attention_layer_and_its_gradients_match_plain_softmax(kind):
  cfg = _model_cfg(kind)
  fam = gqa if kind == "gqa" else mla
  p = jax.tree.map(lambda x: x[0], init(cfg)["layers"]["attn"])
  x = jax.random.normal(jax.random.PRNGKey(4), (B, T, cfg.d_model))
  ct = jax.random.normal(jax.random.PRNGKey(5), (B, T, cfg.n_heads,
                                                 cfg.v_head_dim if kind == "mla"
                                                 else cfg.head_dim))
  ang = fam.angles(model.default_positions(x[..., 0]), cfg)

  def run(core):
    """(loss, gradients w.r.t. p and x): one program."""
    def loss(p, x):
      proj = fam.project(p, x, ang, cfg)
      return jnp.sum(core(p, proj) * ct)
    return jax.jit(jax.value_and_grad(loss, (0, 1)))(p, x)

  l_fast, g_fast = run(lambda p, proj: fam.dense_attention(p, proj, cfg,
                                                           SEG)[0])
  l_ref, g_ref = run(lambda p, proj: _plain_layer(p, proj, cfg, SEG))
  np.testing.assert_allclose(l_fast, l_ref, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fast),
                          jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_probe_path_over_many_chunk_runs_equals_one_chunk():
  """map_causal_chunks with more chunks than runs (each run one key
  prefix) gives what a single chunk over the whole row gives."""
  cfg = _model_cfg("mla", attn_q_chunk=2)      # 10 chunks, 8 runs
  p = jax.tree.map(lambda x: x[0], init(cfg)["layers"]["attn"])
  x = jax.random.normal(jax.random.PRNGKey(4), (B, T, cfg.d_model))

  def probe(start, prob_BNTS, mask_BTS):
    del start, mask_BTS
    # Each chunk's probabilities padded to T keys, to compare rows.
    return jnp.pad(jnp.sum(prob_BNTS, axis=1),
                   [(0, 0), (0, 0), (0, T - prob_BNTS.shape[-1])])

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def run(chunk, with_probe, p, x):
    proj = mla.project(p, x, mla.angles(model.default_positions(x[..., 0]),
                                        cfg), cfg)
    return mla.dense_attention(
        p, proj, dataclasses.replace(cfg, attn_q_chunk=chunk), SEG,
        *([probe] if with_probe else []))

  many = run(2, True, p, x)
  for a, b in zip(many, run(T, True, p, x)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(many[0], run(2, False, p, x)[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_warmup_kl_and_its_indexer_gradient_equal_the_probe_path(kind):
  """The fast warm-up (flash lse, then the blockwise KL) against the probe
  path (per-chunk probabilities), which recall still takes."""
  cfg = _model_cfg(kind)
  cfg = dataclasses.replace(cfg, attn_q_chunk=16, indexer=dataclasses.replace(
      cfg.indexer, topk=4))
  params = init(cfg)
  toks = jax.random.randint(jax.random.PRNGKey(1), (B, 40), 0, 256)
  seg = jnp.array([[1] * 15 + [2] * 25, [1] * 40])

  def kl(params, recall):
    mode = AttentionMode.of(cfg, indexer_loss=True, recall=recall)
    logits, aux = model.forward(params, toks, cfg, seg, mode=mode)
    return jnp.sum(aux.indexer_kl), (logits, aux.indexer_kl)

  grad = jax.jit(jax.value_and_grad(kl, has_aux=True), static_argnums=1)
  (_, (lf, kf)), g_fast = grad(params, False)
  (_, (lp, kp)), g_probe = grad(params, True)
  assert float(jnp.min(kf)) > 1e-3
  np.testing.assert_allclose(kf, kp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lf, lp, atol=1e-5)
  gi_fast = g_fast["layers"]["indexer"]
  gi_probe = g_probe["layers"]["indexer"]
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gi_fast),
                          jax.tree.leaves(gi_probe)):
    assert float(jnp.abs(b).max()) > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_warmup_kl_op_matches_the_chunked_reference():
  """causal_blocks.warmup_kl (values) and warmup_kl_mean (the training op,
  its gradient made in the forward) against warmup_kl.py's jnp reference
  (q and k repeated per head), differentiated by autodiff."""
  from dsax.kernels.warmup_kl import warmup_kl_reference
  qs, ks, v, _ = _inputs("mla", seed=2)
  _, lse = jax.jit(lambda qs, ks, v: causal_blocks.attention(
      qs, ks, v, 0.4, SEG, block=8))(qs, ks, v)
  kk = jax.random.split(jax.random.PRNGKey(9), 3)
  args = (jax.random.normal(kk[0], (B, T, 3, 8)),      # q_i
          jax.random.normal(kk[1], (B, T, 8)),         # k_i
          jax.random.normal(kk[2], (B, T, 3)))         # w
  q_full = jnp.concatenate(qs, -1)
  k_full = jnp.concatenate([jnp.repeat(k, 4 // k.shape[2], axis=2)
                            for k in ks], -1)

  def ref(*a):
    return warmup_kl_reference(q_full, k_full, lse, *a, 0.4, SEG, q_chunk=T)

  def fused(*a):
    return causal_blocks.warmup_kl_mean(qs, ks, lse, *a, 0.4, SEG, block=8)

  kl = jax.jit(lambda *a: causal_blocks.warmup_kl(qs, ks, lse, *a, 0.4, SEG,
                                                  block=8))(*args)
  kl_ref = ref(*args)
  assert float(jnp.mean(kl_ref)) > 1e-2  # a real KL, not 0 everywhere
  np.testing.assert_allclose(kl, kl_ref, rtol=1e-5, atol=1e-6)
  value, g = jax.jit(jax.value_and_grad(fused, (0, 1, 2)))(*args)
  value_ref, g_ref = jax.jit(jax.value_and_grad(
      lambda *a: jnp.mean(ref(*a)), (0, 1, 2)))(*args)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(fused)(*args), value_ref, rtol=1e-5)
  for a, b in zip(g, g_ref):
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("indexer_loss", [False, True])
def test_dense_forward_and_backward_never_hold_t_by_s(indexer_loss):
  t = 512
  cfg = _model_cfg("mla", attn_q_chunk=64)
  params = init(cfg)
  toks = jnp.zeros((1, t), jnp.int32)
  mode = AttentionMode.of(cfg, indexer_loss=indexer_loss)

  def loss(params):
    logits, aux = model.forward(params, toks, cfg, mode=mode)
    kl = aux.indexer_kl.sum() if indexer_loss else 0.0
    return logits.mean() + kl

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  avals = [a for a in all_avals(jaxpr) if hasattr(a, "shape")]
  biggest = max(int(np.prod(a.shape)) for a in avals)
  # Logits are T x V = 131K; a T x S (x heads) tensor would be >= 262K.
  assert biggest < t * t, biggest
  assert not [a.shape for a in avals
              if sum(d >= t for d in a.shape) >= 2], "a [.., T, .., S] array"


def test_traced_program_does_not_grow_with_t():
  """Rolled loops: the same number of equations at T = 64 and T = 1024."""
  cfg = _model_cfg("mla", attn_q_chunk=32)
  p = jax.tree.map(lambda x: x[0], init(cfg)["layers"]["attn"])

  def size(t):
    x = jnp.zeros((1, t, cfg.d_model))
    ang = mla.angles(model.default_positions(x[..., 0]), cfg)

    def f(p, x):
      proj = mla.project(p, x, ang, cfg)
      return jnp.sum(mla.dense_attention(p, proj, cfg)[0])

    jaxpr = jax.make_jaxpr(jax.grad(f, (0, 1)))(p, x).jaxpr
    return sum(1 for _ in all_avals(jaxpr))

  assert size(64) == size(1024)


def test_map_causal_chunks_runs_see_their_prefix():
  """Each query chunk sees at least its own causal prefix and at most the
  prefix of its run's last chunk."""
  t, chunk = 50, 4                    # 13 chunks in 8 runs
  seen = jax.jit(lambda q, k: map_causal_chunks(
      lambda start, x, k: jnp.broadcast_to(
          jnp.float32(k.shape[1]) + 0 * start, x.shape),
      chunk, (q,), (k,)))(jnp.zeros((1, t)), jnp.zeros((1, t)))
  seen = np.asarray(seen[0])
  for q in range(t):
    own = min(t, (q // chunk + 1) * chunk)
    assert own <= seen[q] <= min(t, own + 2 * chunk), (q, seen[q])
