"""Selection baselines (local window with sinks, oracle top-k of the dense
attention) and the router-style indexer gate: the selected sets against
numpy, sparse == dense at k >= T, the gate's forward and gradients, a
training step with each option, and the config checks."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import forward, init, largest_size, tiny
from dsax import dsa, mla, model, train
from dsax import sharding as S
from dsax.attention import AttentionMode
from dsax.config import ConfigError, override
from dsax.kernels.reference import (NEG_INF, gather_rows, select_topk,
                                    sparse_scores)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs.tiny_run import get_config  # noqa: E402

T = 40
# Contiguous runs as dsax.data packs them: documents 1, 2, 3, and a row
# ending in padding (segment 0).
SEG = np.array([[1] * 5 + [2] * 30 + [3] * 5,
                [1] * 12 + [2] * 23 + [0] * 5], np.int32)


def mla_cfg(topk, **kw):
  base = tiny(init_std=0.1, attn_q_chunk=16, **kw)
  return dataclasses.replace(base, indexer=dataclasses.replace(
      base.indexer, topk=topk, q_chunk=16))


def gqa_cfg(topk, **kw):
  base = tiny(attention_type="gqa", n_heads=4, n_kv_heads=2, head_dim=16,
              init_std=0.1, attn_q_chunk=16, **kw)
  return dataclasses.replace(base, indexer=dataclasses.replace(
      base.indexer, topk=topk, q_chunk=16))


CFGS = {"mla": mla_cfg, "gqa": gqa_cfg}


def tokens(seed=1, b=2, t=T):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 256)


def visible_np(seg_bt, t):
  """The keys query t sees: s <= t in t's segment."""
  return [s for s in range(t + 1) if seg_bt[s] == seg_bt[t]]


def local_expected(seg_bt, t, k, sinks):
  keys = visible_np(seg_bt, t)
  if len(keys) <= k:
    return set(keys)
  return set(keys[:sinks]) | set(keys[len(keys) - (k - sinks):])


def selected_sets(idx_BTK, valid_BTK):
  idx, valid = np.asarray(idx_BTK), np.asarray(valid_BTK)
  return [[list(idx[b, t][valid[b, t]]) for t in range(idx.shape[1])]
          for b in range(idx.shape[0])]


def assert_invalid_slots_point_at_the_query(idx_BTK, valid_BTK):
  idx, valid = np.asarray(idx_BTK), np.asarray(valid_BTK)
  t_1T1 = np.arange(idx.shape[1])[None, :, None]
  assert np.all(np.where(valid, True, idx == t_1T1))


# ----------------------------------------------------------- local window


@pytest.mark.parametrize("k,sinks", [(8, 4), (8, 0), (6, 1), (64, 4)])
@pytest.mark.parametrize("with_segments", [True, False])
def test_local_window_selects_the_sinks_and_the_most_recent_keys(
    k, sinks, with_segments):
  seg = SEG if with_segments else np.ones_like(SEG)
  idx, valid = dsa.local_window(jnp.asarray(seg) if with_segments else None,
                                2, T, k, sinks)
  assert idx.shape == (2, T, min(k, T)) and idx.dtype == jnp.int32
  got = selected_sets(idx, valid)
  for b in range(2):
    for t in range(T):
      want = local_expected(seg[b], t, k, sinks)
      assert len(got[b][t]) == len(set(got[b][t])), (b, t)  # no repeats
      assert set(got[b][t]) == want, (b, t, sorted(got[b][t]), sorted(want))
  assert_invalid_slots_point_at_the_query(idx, valid)


def test_the_forward_selects_the_local_window_in_every_layer():
  k, sinks = 8, 3
  cfg = mla_cfg(topk=k)
  params = init(cfg)
  _, aux = forward(params, tokens(), cfg, jnp.asarray(SEG),
                   mode=AttentionMode.of(cfg, "sparse", selection="local",
                                         sinks=sinks, indices=True))
  for layer in range(cfg.n_layers):
    got = selected_sets(aux.idx[layer], aux.valid[layer])
    for b in range(2):
      for t in range(T):
        assert set(got[b][t]) == local_expected(SEG[b], t, k, sinks)


# ----------------------------------------------------------------- oracle


def _dense_target_np(cfg, params, toks, seg):
  """Layer 0's p_t over the full T x T in numpy (f64): softmax per head over
  the visible keys, summed over heads, L1-normalised; and the mask."""
  fam = dsa.family(cfg)

  @jax.jit
  def project(params, toks):  # one program, not an eager op at a time
    p0 = jax.tree.map(lambda x: x[0], params["layers"])
    h = model.attention_input(p0, model.embed(params, toks, cfg), cfg)
    proj = fam.project(p0["attn"], h, fam.angles(
        model.default_positions(toks), cfg), cfg)
    k_nope = (None if cfg.attention_type == "gqa" else
              mla.expanded_keys(p0["attn"], proj.rows[0], cfg)[0])
    return proj, k_nope

  proj, k_nope = project(params, toks)
  f64 = lambda x: np.asarray(x, np.float64)
  if cfg.attention_type == "gqa":
    k = f64(proj.rows[0])                                  # B,S,G,H
    q = f64(proj.q)                                        # B,T,N,H
    m = q.shape[2] // k.shape[2]
    s = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, m, axis=2))
  else:
    s = (np.einsum("btnh,bsnh->bnts", f64(proj.q), f64(k_nope))
         + np.einsum("btnr,bsr->bnts", f64(proj.q_rope), f64(proj.rows[1])))
  s = s * fam.softmax_scale(cfg)
  t = toks.shape[1]
  mask = ((np.arange(t)[None, :] <= np.arange(t)[:, None])[None]
          & (seg[:, :, None] == seg[:, None, :]))            # B,T,S
  s = np.where(mask[:, None], s, -np.inf)
  prob = np.exp(s - s.max(-1, keepdims=True))
  prob = prob / prob.sum(-1, keepdims=True)
  p = prob.sum(1)
  return p / p.sum(-1, keepdims=True), mask


@pytest.mark.parametrize("family", ["mla", "gqa"])
def test_oracle_is_the_top_k_of_the_dense_probabilities(family):
  # k = 20 > the first query chunk (16 keys): its slots are padded.
  k = 20
  cfg = CFGS[family](topk=k)
  params = init(cfg)
  toks = tokens()
  _, aux = forward(params, toks, cfg, jnp.asarray(SEG),
                   mode=AttentionMode.of(cfg, "sparse", selection="oracle",
                                         indices=True))
  assert aux.idx.shape == (cfg.n_layers, 2, T, k)
  assert_invalid_slots_point_at_the_query(aux.idx[0], aux.valid[0])
  got = selected_sets(aux.idx[0], aux.valid[0])
  p, mask = _dense_target_np(cfg, params, toks, SEG)
  exact = 0
  for b in range(2):
    for t in range(T):
      keys = np.flatnonzero(mask[b, t])
      order = keys[np.argsort(-p[b, t, keys], kind="stable")]
      want = set(order[:k])
      sel = got[b][t]
      assert len(sel) == len(set(sel)) == min(k, len(keys)), (b, t)
      assert set(sel) <= set(keys), (b, t)  # causal, in-segment
      if set(sel) == want:
        exact += 1
        continue
      # Only a near-tie at the k-th largest probability may swap keys.
      kth = p[b, t, order[k - 1]]
      swapped = set(sel) ^ want
      assert np.all(np.abs(p[b, t, list(swapped)] - kth) < 1e-6), (b, t)
  assert exact >= 2 * T - 2


# ------------------------------------------------- the baselines' forward


@pytest.mark.parametrize("family", ["mla", "gqa"])
@pytest.mark.parametrize("selection", ["local", "oracle"])
def test_baseline_forward_is_finite_and_dense_when_k_covers_the_sequence(
    family, selection):
  seg = jnp.asarray(SEG)
  cfg = CFGS[family](topk=T)
  params = init(cfg)
  dense, _ = forward(params, tokens(), cfg, seg)
  full, _ = forward(params, tokens(), cfg, seg, mode=AttentionMode.of(
      cfg, "sparse", selection=selection))
  np.testing.assert_allclose(full, dense, atol=2e-5, rtol=0)
  small = dataclasses.replace(cfg, indexer=dataclasses.replace(cfg.indexer,
                                                               topk=6))
  sparse, aux = forward(params, tokens(), small, seg,
                        mode=AttentionMode.of(small, "sparse",
                                              selection=selection,
                                              indexer_loss=True))
  assert np.all(np.isfinite(np.asarray(sparse)))
  assert np.all(np.isfinite(np.asarray(aux.indexer_kl)))
  assert float(jnp.abs(sparse - dense).max()) > 1e-4  # k < T: sparse


@pytest.mark.parametrize("selection", ["local", "oracle"])
def test_causality_by_gradient_with_a_baseline_selection(selection):
  from test_model import _grad_wrt_embeddings
  cfg = mla_cfg(topk=6)
  params = init(cfg)
  seg = jnp.array([[1] * 17 + [2] * 23])
  ts = (3, 16, 17, 30)
  grads = _grad_wrt_embeddings(cfg, params, tokens(b=1), ts, seg,
                               mode=AttentionMode.of(cfg, "sparse",
                                                     selection=selection,
                                                     sinks=2))
  for t, g in zip(ts, grads):
    assert np.all(g[t + 1:] == 0.0), t
    if t >= 17:
      assert np.all(g[:17] == 0.0), t
    assert np.abs(g[t]).sum() > 0


def test_the_baselines_do_not_compute_the_indexer():
  for sel in ("local", "oracle"):
    mode = AttentionMode(kind="sparse", topk=8, selection=sel)
    assert not mode.uses_indexer
    assert dataclasses.replace(mode, indexer_loss=True).uses_indexer


def test_oracle_and_gate_never_hold_t_by_s():
  t = 512
  cfg = dataclasses.replace(mla_cfg(topk=16), attn_q_chunk=64)
  cfg = dataclasses.replace(cfg, indexer=dataclasses.replace(cfg.indexer,
                                                             q_chunk=64))
  params = init(cfg)
  toks = jnp.zeros((1, t), jnp.int32)

  def loss(p):
    logits, aux = model.forward(p, toks, cfg, mode=AttentionMode.of(
        cfg, "sparse", selection="oracle", indexer_loss=True,
        indexer_gate=True))
    return logits.mean() + aux.indexer_kl.sum()

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  biggest = largest_size(jaxpr)
  # The oracle's chunk probabilities are [1, N, 64, 512] = 131K; a T x S
  # tensor would be 262K.
  assert biggest < t * t, biggest


def test_attention_mode_refuses_impossible_baselines():
  cfg = mla_cfg(topk=8)
  with pytest.raises(ValueError, match="selection='local' needs kind='sparse'"):
    AttentionMode.of(cfg, "dense", selection="local")
  with pytest.raises(ValueError, match="sinks=8 must be < topk=8"):
    AttentionMode.of(cfg, "sparse", selection="local", sinks=8)
  with pytest.raises(ValueError, match="indexer_gate needs kind='sparse'"):
    AttentionMode.of(cfg, "dense", indexer_gate=True)
  with pytest.raises(ValueError, match="selection must be one of"):
    AttentionMode.of(cfg, "sparse", selection="window")


# ------------------------------------------------------ router-style gate


def _split(tree):
  """(indexer leaves, other leaves) of a params-shaped tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  idx = [v for k, v in flat if "indexer" in jax.tree_util.keystr(k)]
  rest = [v for k, v in flat if "indexer" not in jax.tree_util.keystr(k)]
  return idx, rest


@pytest.mark.parametrize("family", ["mla", "gqa"])
def test_gate_keeps_the_forward_and_lets_the_lm_loss_reach_the_indexer(
    family):
  cfg = CFGS[family](topk=6)
  params = init(cfg)
  toks, seg = tokens(), jnp.asarray(SEG)

  def lm(p, gate):
    logits, _ = model.forward(p, toks, cfg, seg, mode=AttentionMode.of(
        cfg, "sparse", indexer_gate=gate))
    return model.lm_loss(logits[:, :-1], toks[:, 1:]), logits

  (l_off, logits_off), g_off = jax.jit(jax.value_and_grad(
      lambda p: lm(p, False), has_aux=True))(params)
  (l_on, logits_on), g_on = jax.jit(jax.value_and_grad(
      lambda p: lm(p, True), has_aux=True))(params)
  # The gate is zero in value: the forward is the plain sparse forward.
  np.testing.assert_array_equal(logits_on, logits_off)
  assert float(l_on) == float(l_off)
  idx_off, rest_off = _split(g_off)
  idx_on, rest_on = _split(g_on)
  # Off: the LM loss does not reach the indexer. On: every indexer
  # parameter gets an LM gradient; the main model's gradient is unchanged.
  assert all(np.all(np.asarray(g) == 0) for g in idx_off)
  assert all(float(jnp.abs(g).sum()) > 0 for g in idx_on)
  for a, b in zip(rest_on, rest_off):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def _random_selection(key, b, t, k):
  scores_BTS = jax.random.normal(key, (b, t, t))
  mask_1TS = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None]
  return select_topk(scores_BTS, mask_1TS, k, jnp.arange(t))


@pytest.mark.parametrize("family", ["mla", "gqa"])
def test_gate_gradient_is_the_straight_through_logit_bias_gradient(family):
  """gate_delta is zero and its gradient equals that of the sparse
  attention with logits s + log g - sg(log g), computed directly."""
  b, t, n, k, i, j = 2, 12, 4, 5, 2, 8
  ks = jax.random.split(jax.random.PRNGKey(0), 9)
  idx_BTK, valid_BTK = _random_selection(ks[0], b, t, k)
  q_i_BTIJ = jax.random.normal(ks[1], (b, t, i, j))
  k_i_BSJ = jax.random.normal(ks[2], (b, t, j))
  w_i_BTI = jax.random.normal(ks[3], (b, t, i))
  scale = 0.3
  if family == "mla":
    c = 6
    q_BTN_ = jax.random.normal(ks[4], (b, t, n, c + 2))
    row_BS_ = jax.random.normal(ks[5], (b, t, c + 2))
    value_BS_ = row_BS_[..., :c]
    e = c
  else:
    g = 2
    q_BTN_ = jax.random.normal(ks[4], (b, t, n, j))
    row_BS_ = jax.random.normal(ks[5], (b, t, g, j))
    value_BS_ = jax.random.normal(ks[6], (b, t, g, j))
    e = j
  cot_BTNE = jax.random.normal(ks[7], (b, t, n, e))

  def direct(q_i_BTIJ, k_i_BSJ, w_i_BTI):
    s_BTNK = sparse_scores(q_BTN_, gather_rows(row_BS_, idx_BTK), scale)
    logits_BTK = dsa.selected_logits(q_i_BTIJ, k_i_BSJ, w_i_BTI, idx_BTK)
    log_g_BTK = jax.nn.log_softmax(
        jnp.where(valid_BTK, logits_BTK, NEG_INF), -1)
    b_BTK = jnp.where(valid_BTK,
                      log_g_BTK - jax.lax.stop_gradient(log_g_BTK), 0.0)
    s_BTNK = jnp.where(valid_BTK[:, :, None, :],
                       s_BTNK + b_BTK[:, :, None, :], NEG_INF)
    p_BTNK = jax.nn.softmax(s_BTNK, -1)
    v_sel = gather_rows(value_BS_, idx_BTK)
    if family == "mla":
      o_BTNE = jnp.einsum("btnk,btkc->btnc", p_BTNK, v_sel)
    else:
      o_BTNE = jnp.einsum("btgmk,btkgh->btgmh",
                          p_BTNK.reshape(b, t, 2, n // 2, k),
                          v_sel).reshape(b, t, n, e)
    return jnp.sum(o_BTNE * cot_BTNE)

  def gated(q_i_BTIJ, k_i_BSJ, w_i_BTI):
    d_BTNE = dsa.gate_delta(q_BTN_, row_BS_, value_BS_, idx_BTK, valid_BTK,
                            scale, q_i_BTIJ, k_i_BSJ, w_i_BTI, q_chunk=4)
    return jnp.sum(d_BTNE * cot_BTNE), d_BTNE

  args = (q_i_BTIJ, k_i_BSJ, w_i_BTI)
  (_, d_BTNE), g_gate = jax.jit(jax.value_and_grad(gated, (0, 1, 2),
                                                   has_aux=True))(*args)
  g_direct = jax.jit(jax.grad(direct, (0, 1, 2)))(*args)
  np.testing.assert_array_equal(d_BTNE, 0.0)
  for a, want in zip(g_gate, g_direct):
    assert float(jnp.abs(want).max()) > 0
    np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- training


def _one_sparse_step(extra):
  cfg = override(get_config(), ["data.seq_len=32", "data.batch_size=2",
                                "model.indexer.topk=8", "eval.every=0"]
                 + list(extra))
  phase = next(p for p in cfg.phases if p.kind == "sparse")
  mesh = S.make_mesh(cfg.mesh)
  params = train.init_params(cfg, mesh)
  state, frozen, tx, sched = train.init_state(cfg, phase, params, mesh)
  before = jax.device_get(state["trainable"])
  step = train.make_train_step(cfg, phase, tx, sched, mesh)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 256, (2, 33)).astype(np.int32)
  seg = np.array([[1] * 20 + [2] * 12, [1] * 32], np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
           "segment_ids": seg,
           "positions": np.broadcast_to(np.arange(32, dtype=np.int32),
                                        (2, 32)).copy(),
           "weights": np.ones((2, 32), np.float32)}
  state, out = step(state, frozen, batch)
  out = {k: float(v) for k, v in jax.device_get(out).items()}
  after = jax.device_get(state["trainable"])
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  return phase, out, moved


@pytest.mark.parametrize("extra", [
    ["phases.sparse.selection=oracle"],
    ["phases.sparse.selection=local", "phases.sparse.sinks=2",
     "phases.sparse.indexer_grad=both"],
    ["phases.sparse.indexer_grad=lm"],
])
def test_a_sparse_phase_trains_a_step_with_each_option(extra):
  phase, out, moved = _one_sparse_step(extra)
  mode = train.phase_mode(get_config(), phase)
  assert mode.sparse and mode.selection == phase.selection
  assert mode.indexer_gate == (phase.indexer_grad != "kl")
  assert all(np.isfinite(v) for v in out.values()), out
  assert any(k.startswith("layers/indexer/") for k in moved)
  assert any(k.startswith("layers/attn/") for k in moved)
  if phase.indexer_grad == "lm":  # the KL is reported, not trained on
    assert out["loss"] == out["lm_loss"] and out["indexer_kl"] > 0


# --------------------------------------------------------------- configs


def test_phase_config_selection_and_indexer_grad():
  cfg = override(get_config(), ["phases.sparse.selection=oracle",
                                "phases.sparse.indexer_grad=both",
                                "phases.sparse.sinks=2"])
  sparse = next(p for p in cfg.phases if p.kind == "sparse")
  assert (sparse.selection, sparse.indexer_grad, sparse.sinks) == (
      "oracle", "both", 2)
  for item, needle in [
      ("phases.sparse.selection=window",
       "phases.sparse.selection='window' must be one of"),
      ("phases.sparse.indexer_grad=router",
       "phases.sparse.indexer_grad='router' must be one of"),
      ("phases.sparse.sinks=-1", "phases.sparse.sinks=-1 must be >= 0"),
  ]:
    with pytest.raises(ConfigError, match=needle):
      override(get_config(), [item])
  # The sinks count inside k (16 in tiny_run).
  with pytest.raises(ConfigError, match=r"sinks=16 .* < topk=16"):
    override(get_config(), ["phases.sparse.selection=local",
                            "phases.sparse.sinks=16"])
  for item in ("phases.warmup.selection=local",
               "phases.pretrain.indexer_grad=lm", "phases.warmup.sinks=2"):
    with pytest.raises(ConfigError) as e:
      override(get_config(), [item])
    kind = item.split(".")[1]
    assert str(e.value).startswith(f"{item} means nothing")
    assert f"kind={kind}" in str(e.value)


# ----------------------------------------------------------------- evals


def test_evals_build_baseline_rows(tmp_path):
  from dsax.evals import plan, position, retrieval
  cfg = override(get_config(), ["model.indexer.topk=8"])
  for name in ("pretrain", "sparse"):
    (tmp_path / "phases" / name).mkdir(parents=True)
  todo = plan(cfg, str(tmp_path), [8], baselines=("local", "oracle"))
  rows = {label: (phase, att, k, sel)
          for label, phase, att, k, sel in todo["modes"]}
  assert rows["local (pretrain) k=8"] == ("pretrain", "sparse", 8, "local")
  assert rows["oracle (pretrain) k=8"] == ("pretrain", "sparse", 8, "oracle")
  assert rows["sparse (sparse) k=8"][3] == "indexer"
  assert len(plan(cfg, str(tmp_path), [8])["modes"]) == len(rows) - 2
  model_cfg = mla_cfg(topk=6)
  params = init(model_cfg)
  toks = np.asarray(tokens(b=1, t=24))
  for sel in ("local", "oracle"):
    logits = retrieval.model_logits_fn(params, model_cfg, "sparse", 6,
                                       sel)(toks)
    assert logits.shape == (1, 24, model_cfg.vocab_size)
    assert np.all(np.isfinite(np.asarray(logits)))
  batch = {"inputs": toks, "targets": toks,
           "segment_ids": np.ones_like(toks),
           "positions": np.arange(24, dtype=np.int32)[None],
           "weights": np.ones(toks.shape, np.float32)}
  nll = position.model_nll_fn(params, model_cfg, "sparse", 6, "local")(batch)
  assert np.all(np.isfinite(np.asarray(nll)))
