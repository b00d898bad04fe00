"""Indexer top-k Pallas kernel (interpret mode on CPU) against the reference:
causal, in-segment, k > visible keys, ties, chunking, no T x S slab."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from dsax.kernels import reference
from dsax.kernels.indexer import (IndexerBlocks, LogitsBlocks, indexer_logits,
                                  indexer_topk)

gpu = pytest.mark.skipif(jax.default_backend() == "cpu",
                         reason="needs a GPU (compiled Triton kernels)")
# Interpret-mode kernels are big XLA loops: compile them without LLVM
# optimisation (3x faster to compile; these arrays are tiny).
FAST = ({"xla_backend_optimization_level": 0}
        if jax.default_backend() == "cpu" else {})

SMALL = IndexerBlocks(block_t=16, block_s=16, q_chunk=16)


def normal(rng, shape, dtype=jnp.float32):
  # numpy, not jax.random: eager jax.random compiles a kernel per shape.
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def inputs(b, t, i, j, seed=0, segments=False, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = normal(rng, (b, t, i, j), dtype)
  k = normal(rng, (b, t, j), dtype)
  w = normal(rng, (b, t, i))
  seg = None
  if segments:   # packed documents of random lengths
    seg = jnp.asarray(np.cumsum(rng.random((b, t)) < 0.15, axis=1), jnp.int32)
  return q, k, w, seg


def both(q, k, w, topk, seg, block):
  kernel = jax.jit(functools.partial(indexer_topk, topk=topk, block=block),
                   compiler_options=FAST)
  ref = jax.jit(functools.partial(reference.indexer_topk_reference,
                                  topk=topk), compiler_options=FAST)
  return (kernel(q, k, w, segment_ids_BT=seg),
          ref(q, k, w, segment_ids_BT=seg))


def assert_same_selection(got, want, q, k, w, seg):
  """valid identical; the selected sets carry the same reference scores
  (an exact near-tie may order differently); invalid -> the query itself."""
  (idx, valid), (ridx, rvalid) = got, want
  assert idx.shape == ridx.shape and idx.dtype == jnp.int32
  np.testing.assert_array_equal(valid, rvalid)
  logits = reference.indexer_logits(q, k, w)
  pick = lambda i: np.sort(np.where(
      valid, np.take_along_axis(np.asarray(logits), np.asarray(i), -1),
      -np.inf), axis=-1)
  np.testing.assert_allclose(pick(idx), pick(ridx), rtol=1e-5, atol=1e-5)
  t = np.arange(idx.shape[1])[None, :, None]
  assert np.all(np.where(valid, True, np.asarray(idx) == t))
  assert np.all(np.where(valid, np.asarray(idx) <= t, True))   # causal
  if seg is not None:
    s = np.asarray(seg)
    doc = np.take_along_axis(np.broadcast_to(s[:, None, :], idx.shape[:2]
                                             + s.shape[1:]), np.asarray(idx),
                             -1)
    assert np.all(np.where(valid, doc == s[:, :, None], True))
  # Random continuous scores have no near-ties at these sizes.
  assert float(np.mean(np.asarray(idx) == np.asarray(ridx))) > 0.99


@pytest.mark.parametrize("b,t,i,j,topk,segments,block", [
    # T not a multiple of the tiles, several query chunks, early queries
    # with fewer visible keys than k.
    (2, 37, 4, 24, 8, False, SMALL),
    # Packed documents, one chunk, k > T (K = min(k, S) = S).
    (1, 29, 2, 16, 64, True, IndexerBlocks()),
    # One indexer head, J not a power of two, packed, several chunks.
    (2, 40, 1, 20, 5, True, SMALL),
])
def test_matches_reference(b, t, i, j, topk, segments, block):
  q, k, w, seg = inputs(b, t, i, j, segments=segments)
  got, want = both(q, k, w, topk, seg, block)
  assert_same_selection(got, want, q, k, w, seg)


def test_ties_go_to_the_lower_index():
  """Integer-valued inputs give exact scores with many ties; the kernel
  must then agree with the reference index for index."""
  b, t, i, j = 1, 33, 2, 4
  rng = np.random.default_rng(7)
  q = jnp.asarray(rng.integers(-1, 2, (b, t, i, j)), jnp.float32)
  k = jnp.asarray(rng.integers(-1, 2, (b, t, j)), jnp.float32)
  w = jnp.ones((b, t, i), jnp.float32)
  got, want = both(q, k, w, 6, None, SMALL)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_no_t_by_s_slab():
  """With chunks of 16 queries no intermediate holds T x S numbers (let
  alone T x S x I): memory is O(chunk * S)."""
  b, t, i, j = 1, 64, 2, 16     # inputs hold fewer than T x S numbers
  q, k, w, _ = inputs(b, t, i, j)
  jaxpr = jax.make_jaxpr(functools.partial(indexer_topk, topk=8,
                                           block=SMALL))(q, k, w)
  sizes = []

  def walk(jp):
    for eqn in jp.eqns:
      sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars
                   if hasattr(v.aval, "shape"))
      for val in eqn.params.values():
        for sub in (val if isinstance(val, (list, tuple)) else [val]):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jaxpr.jaxpr)
  assert max(sizes) < t * t, max(sizes)


def test_dispatch_impl_pallas():
  from dsax import kernels
  q, k, w, seg = inputs(1, 24, 2, 16, seed=3, segments=True)
  call = lambda impl: jax.jit(functools.partial(
      kernels.indexer_topk, topk=4, impl=impl),
      compiler_options=FAST)(q, k, w, segment_ids_BT=seg)
  got, want = call("pallas"), call("reference")
  assert_same_selection(got, want, q, k, w, seg)


@pytest.mark.parametrize("args,match", [
    (dict(k=lambda x: x[..., :-1]), "k_BSJ shape"),
    (dict(w=lambda x: x[..., :-1]), "w_BTI shape"),
    (dict(topk=0), "topk must be"),
    (dict(seg=lambda x: x[:, :-1]), "segment_ids_BT shape"),
])
def test_input_checks(args, match):
  q, k, w, seg = inputs(1, 8, 2, 16, segments=True)
  vals = dict(q=q, k=k, w=w, seg=seg, topk=4)
  for name, fn in args.items():
    vals[name] = fn(vals[name]) if callable(fn) else fn
  with pytest.raises((ValueError, TypeError), match=match):
    indexer_topk(vals["q"], vals["k"], vals["w"], vals["topk"], vals["seg"])


@pytest.mark.parametrize("b,t,s,i,j", [
    (2, 37, 37, 4, 24),      # T not a multiple of the tiles, J padded
    (1, 20, 45, 1, 16),      # T != S, one head
])
def test_logits_and_gradients(b, t, s, i, j):
  """indexer_logits and its VJP (q, k, w) against jnp autodiff, under a
  masked KL-like loss (dense warm-up shape: masked entries get no grad)."""
  rng = np.random.default_rng(11)
  q, k, w = normal(rng, (b, t, i, j)), normal(rng, (b, s, j)), normal(
      rng, (b, t, i))
  target = jax.nn.softmax(normal(rng, (b, t, s)), axis=-1)
  mask = jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None]

  def run(fn):
    def loss(q, k, w):
      logits = jnp.where(mask, fn(q, k, w), -1e30)
      return -jnp.sum(target * jax.nn.log_softmax(logits, -1) * mask), logits
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True),
                   compiler_options=FAST)(q, k, w)

  (_, got), grads = run(functools.partial(
      indexer_logits, block=LogitsBlocks(block_t=16, block_s=16)))
  (_, want), rgrads = run(reference.indexer_logits)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, r in zip(grads, rgrads):
    np.testing.assert_allclose(g, r, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(r).max()))


@gpu
@pytest.mark.gpu
def test_gpu_matches_reference():
  """Compiled Triton scores kernel at I = 64, J = 128, T = 2048, k = 256."""
  q, k, w, seg = inputs(1, 2048, 64, 128, seed=5, segments=True,
                        dtype=jnp.bfloat16)
  got, want = both(q, k, w, 256, seg, IndexerBlocks())
  (idx, valid), (ridx, rvalid) = got, want
  np.testing.assert_array_equal(valid, rvalid)
  # bf16 dots in a different order: compare the selected score mass.
  logits = np.asarray(reference.indexer_logits(q, k, w))
  mass = lambda i: np.where(valid, np.take_along_axis(logits, np.asarray(i),
                                                      -1), 0).sum(-1)
  np.testing.assert_allclose(mass(idx), mass(ridx), rtol=1e-3, atol=1e-3)
