"""The sparse layer's two ways (dsa.use_masked): gathering the k selected rows
per query, and dense attention under the selection's key mask. Same outputs,
indexer KL and gradients (parameters, router-style gate included), MLA and
GQA, indexer and local selections, packed segments."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init, tiny
from dsax import dsa, model
from dsax.attention import AttentionMode


def _configs():
  mla_cfg = tiny(init_std=0.1)
  gqa_cfg = tiny(attention_type="gqa", n_heads=4, n_kv_heads=2, head_dim=16,
                 init_std=0.1)
  return {"mla": mla_cfg, "gqa": gqa_cfg}


def test_use_masked_rule():
  mode = AttentionMode(kind="sparse", topk=64)
  assert dsa.MASKED_RATIO == 2   # measured (the comment above it in dsa.py)
  assert dsa.use_masked(mode, 128) and not dsa.use_masked(mode, 129)
  assert not dsa.use_masked(dataclasses.replace(mode, impl="pallas"), 64)
  big = AttentionMode(kind="sparse", topk=4096)
  assert not dsa.use_masked(big, dsa.MASKED_MAX_KEYS + 1)
  assert dsa.use_masked(dataclasses.replace(big, sparse_way="masked"), 10**5)
  assert not dsa.use_masked(dataclasses.replace(mode, sparse_way="gather"), 64)
  with pytest.raises(ValueError, match="sparse_way='masked' needs"):
    dataclasses.replace(mode, impl="pallas", sparse_way="masked")
  with pytest.raises(ValueError, match="sparse_way must be one of"):
    dataclasses.replace(mode, sparse_way="dense")


def test_selection_mask_marks_exactly_the_valid_slots():
  idx = jnp.asarray([[[0, 2, 1], [3, 1, 1]]])
  valid = jnp.asarray([[[True, True, False], [True, False, True]]])
  want = np.zeros((1, 2, 4), bool)
  want[0, 0, [0, 2]] = True
  want[0, 1, [3, 1]] = True
  np.testing.assert_array_equal(dsa.selection_mask(idx, valid, 4), want)


@pytest.mark.parametrize("family", ["mla", "gqa"])
@pytest.mark.parametrize("selection", ["indexer", "local"])
def test_masked_equals_gather(family, selection):
  cfg = _configs()[family]
  params = init(cfg)
  b, t, k = 2, 48, 8
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
  seg = jnp.asarray(np.repeat([[1] * 30 + [2] * 18], b, 0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(30)) + list(range(18))], b, 0),
                    jnp.int32)
  gate = selection == "indexer"
  mode = AttentionMode.of(cfg, "sparse", topk=k, selection=selection,
                          indexer_loss=gate, indexer_gate=gate)

  def loss(p, mode):
    logits, aux = model.forward(p, tokens, cfg, seg, mode=mode,
                                positions_BT=pos)
    lm = jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    kl = jnp.sum(aux.indexer_kl) if gate else 0.0
    return lm + kl, (logits, aux.indexer_kl)

  def run(masked: bool):
    way = dataclasses.replace(mode, sparse_way="masked" if masked
                              else "gather")
    assert dsa.use_masked(way, t) == masked
    return jax.jit(jax.grad(lambda p: loss(p, way), has_aux=True))(params)

  g_mask, (lo_mask, kl_mask) = run(True)
  g_gath, (lo_gath, kl_gath) = run(False)
  np.testing.assert_allclose(lo_mask, lo_gath, rtol=1e-5, atol=1e-5)
  if gate:
    np.testing.assert_allclose(kl_mask, kl_gath, rtol=1e-5, atol=1e-6)
  flat_m = jax.tree_util.tree_leaves_with_path(g_mask)
  flat_g = jax.tree.leaves(g_gath)
  moved = 0
  for (path, a), bb in zip(flat_m, flat_g):
    scale = float(jnp.max(jnp.abs(bb))) + 1e-12
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(bb) / scale,
                               atol=2e-5, err_msg=jax.tree_util.keystr(path))
    moved += "indexer" in jax.tree_util.keystr(path) and scale > 1e-9
  # The indexer learns (KL and gate) exactly when the selection is its own.
  assert (moved > 0) == gate
