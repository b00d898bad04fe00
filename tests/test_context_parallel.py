"""Context parallelism (dsax.context): the zig-zag layout, and the pieces
that take a query shard (causal_blocks attention and warm-up KL, the
reference top-k, the local window) against the whole rows on one device.
The sharded train steps (losses, selected indices, collectives on 8
simulated devices) are in tests/test_sharding.py (the meshes with
``sequence`` > 1 and the "modes" case).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsax import context, dsa
from dsax.attention import QueryShard
from dsax.config import ConfigError
from dsax.kernels import causal_blocks
from dsax.kernels.reference import indexer_topk_reference

B, T, N, H, R, E = 2, 32, 2, 4, 2, 4
I, J = 2, 4
SHARDS = 2  # blocks of T / 4 = 8: the dense blocks of 4 fit in them
BLOCK = 4


def test_zigzag_round_trips_and_balances_the_shards():
  for t, n in [(16, 1), (16, 2), (64, 4), (256, 8)]:
    perm = context.zigzag(t, n)
    assert sorted(perm) == list(range(t))
    c = t // (2 * n)
    for i in range(n):  # shard i: natural blocks i and 2n - 1 - i
      local = perm[i * 2 * c:(i + 1) * 2 * c]
      np.testing.assert_array_equal(local[:c], np.arange(i * c, (i + 1) * c))
      np.testing.assert_array_equal(
          local[c:], np.arange((2 * n - 1 - i) * c, (2 * n - i) * c))
      np.testing.assert_array_equal(
          np.asarray(context.shard_index(jnp.int32(i), n, 2 * c)), local)
      # Causal work (keys visible, summed over the shard's queries) is equal
      # across shards.
      assert int(np.sum(local + 1)) == int(np.sum(perm[:2 * c] + 1))
  x = np.random.default_rng(0).normal(size=(3, 64, 5)).astype(np.float32)
  y = context.to_layout(x, 4)
  assert not np.array_equal(y, x)
  np.testing.assert_array_equal(context.from_layout(y, 4), x)
  np.testing.assert_array_equal(
      np.asarray(context.from_layout(jnp.asarray(y), 4)), x)
  batch = {"inputs": np.arange(64)[None].repeat(2, 0),
           "targets": np.arange(1, 65)[None].repeat(2, 0)}
  laid = context.layout_batch(batch, 4)
  # Every array moves with the same permutation: the (input, target) pairs
  # are kept, so the mean loss over positions is unchanged.
  np.testing.assert_array_equal(laid["targets"] - laid["inputs"], 1)
  assert context.layout_batch(batch, 1) is batch
  with pytest.raises(ConfigError, match=r"data.seq_len=60 must divide by "
                     r"2 x mesh.sequence = 16"):
    context.zigzag(60, 8)


def _segments():
  seg = np.ones((B, T), np.int32)
  seg[0, 13:] = 2
  seg[1, 5:] = 2
  seg[1, 27:] = 3
  return jnp.asarray(seg)


def _inputs():
  ks = jax.random.split(jax.random.PRNGKey(0), 9)
  nrm = lambda k, s: jax.random.normal(k, s, jnp.float32)  # noqa: E731
  qs = (nrm(ks[0], (B, T, N, H)), nrm(ks[1], (B, T, N, R)))
  kparts = (nrm(ks[2], (B, T, N, H)), nrm(ks[3], (B, T, 1, R)))
  v = nrm(ks[4], (B, T, N, E))
  indexer = (nrm(ks[5], (B, T, I, J)), nrm(ks[6], (B, T, J)),
             nrm(ks[7], (B, T, I)))
  return qs, kparts, v, indexer, nrm(ks[8], (B, T, N, E))


def _shard(d):
  """(natural indices of shard d's queries [T/n], as numpy)."""
  return context.zigzag(T, SHARDS)[d * T // SHARDS:(d + 1) * T // SHARDS]


def test_dense_attention_of_query_shards_equals_whole_rows():
  """Each shard's local queries (zig-zag blocks) against every key give the
  whole-row outputs, lse and, summed over the shards, the gradients."""
  qs, ks, v, _, ct = _inputs()
  seg = _segments()

  def whole(qs, ks, v):
    o, lse = causal_blocks.attention(qs, ks, v, 0.3, seg, block=BLOCK)
    return jnp.sum(o * ct) + jnp.sum(jnp.sin(lse)), (o, lse)

  def sharded(qs, ks, v):
    total, outs = 0.0, []
    for d in range(SHARDS):
      idx = _shard(d)
      o, lse = causal_blocks.attention(
          tuple(q[:, idx] for q in qs), ks, v, 0.3, seg[:, idx], block=BLOCK,
          q_index_T=jnp.asarray(idx, jnp.int32), k_segment_ids_BS=seg)
      total = total + jnp.sum(o * ct[:, idx]) + jnp.sum(jnp.sin(lse))
      outs.append((idx, o, lse))
    return total, outs

  (_, (o, lse)), g_whole = jax.jit(jax.value_and_grad(
      whole, (0, 1, 2), has_aux=True))(qs, ks, v)
  (_, outs), g_shard = jax.jit(jax.value_and_grad(
      sharded, (0, 1, 2), has_aux=True))(qs, ks, v)
  for idx, o_d, lse_d in outs:
    np.testing.assert_allclose(o_d, o[:, idx], atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(lse_d, lse[:, idx], atol=2e-6, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_shard), jax.tree.leaves(g_whole)):
    assert float(jnp.abs(b).max()) > 1e-2
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_warmup_kl_of_query_shards_equals_whole_rows():
  """Per-token values of each shard equal the whole rows'; the training
  op's mean, weighted by each shard's share of the queries, has the whole
  mean's gradient."""
  qs, ks, v, (q_i, k_i, w), _ = _inputs()
  seg = _segments()
  _, lse = causal_blocks.attention(qs, ks, v, 0.3, seg, block=BLOCK)

  def whole(q_i, k_i, w):
    return causal_blocks.warmup_kl_mean(qs, ks, lse, q_i, k_i, w, 0.3, seg,
                                        block=BLOCK)

  def shard_args(d, q_i, k_i, w):
    idx = _shard(d)
    return ((tuple(q[:, idx] for q in qs), ks, lse[:, idx], q_i[:, idx], k_i,
             w[:, idx], 0.3, seg[:, idx]),
            dict(block=BLOCK, q_index_T=jnp.asarray(idx, jnp.int32),
                 k_segment_ids_BS=seg), idx)

  def sharded(q_i, k_i, w):
    total = 0.0
    for d in range(SHARDS):
      a, kw, idx = shard_args(d, q_i, k_i, w)
      total = total + causal_blocks.warmup_kl_mean(*a, **kw) * len(idx) / T
    return total

  kl = causal_blocks.warmup_kl(qs, ks, lse, q_i, k_i, w, 0.3, seg,
                               block=BLOCK)
  assert float(jnp.mean(kl)) > 1e-2  # a real KL, not 0 everywhere
  for d in range(SHARDS):
    a, kw, idx = shard_args(d, q_i, k_i, w)
    np.testing.assert_allclose(causal_blocks.warmup_kl(*a, **kw),
                               kl[:, idx], atol=1e-5, rtol=1e-5)
  m_whole, g_whole = jax.value_and_grad(whole, (0, 1, 2))(q_i, k_i, w)
  m_shard, g_shard = jax.value_and_grad(sharded, (0, 1, 2))(q_i, k_i, w)
  np.testing.assert_allclose(m_shard, m_whole, rtol=1e-5)
  np.testing.assert_allclose(m_whole, jnp.mean(kl), rtol=1e-5)
  for a, b in zip(g_shard, g_whole):
    assert float(jnp.abs(b).max()) > 1e-4
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_indexer_topk_of_query_shards_equals_whole_rows():
  _, _, _, (q_i, k_i, w), _ = _inputs()
  seg = _segments()
  idx_w, valid_w = indexer_topk_reference(q_i, k_i, w, 6, seg, q_chunk=8)
  assert not bool(jnp.all(valid_w)) and bool(jnp.any(valid_w[:, -1]))
  for d in range(SHARDS):
    idx = _shard(d)
    got, valid = indexer_topk_reference(
        q_i[:, idx], k_i, w[:, idx], 6, seg[:, idx], q_chunk=8,
        q_index_T=jnp.asarray(idx, jnp.int32), k_segment_ids_BS=seg)
    np.testing.assert_array_equal(got, idx_w[:, idx])
    np.testing.assert_array_equal(valid, valid_w[:, idx])


def test_query_shards_need_their_index_among_the_keys():
  qs, ks, v, (q_i, k_i, w), _ = _inputs()
  with pytest.raises(ValueError, match="S=32 keys for T=8 queries need "
                     "q_index_T"):
    causal_blocks.attention(tuple(q[:, :8] for q in qs), ks, v, 0.3)
  with pytest.raises(ValueError, match="S=32 keys for T=8 queries need "
                     "q_index_T"):
    indexer_topk_reference(q_i[:, :8], k_i, w[:, :8], 4)


def test_local_window_of_query_shards_equals_whole_rows():
  seg = _segments()
  idx_w, valid_w = dsa.local_window(seg, B, T, 6, 2)
  assert not bool(jnp.all(valid_w)) and bool(jnp.any(valid_w[:, -1]))
  for d in range(SHARDS):
    idx = _shard(d)
    shard = QueryShard(jnp.asarray(idx, jnp.int32), seg, BLOCK)
    got, valid = dsa.local_window(seg[:, idx], B, len(idx), 6, 2, shard)
    np.testing.assert_array_equal(got, idx_w[:, idx])
    np.testing.assert_array_equal(valid, valid_w[:, idx])
