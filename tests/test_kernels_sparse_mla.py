"""Sparse MLA Pallas kernel (interpret mode on CPU) against the jnp reference:
outputs and gradients, masks, packed segments, duplicate rows, bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsax.kernels import reference
from dsax.kernels.sparse_mla import SparseMLABlocks, sparse_mla

gpu = pytest.mark.skipif(jax.default_backend() == "cpu",
                         reason="needs a GPU (compiled Triton kernels)")
# Interpret-mode kernels are big XLA loops: compile them without LLVM
# optimisation (3x faster to compile; these arrays are tiny).
FAST = ({"xla_backend_optimization_level": 0}
        if jax.default_backend() == "cpu" else {})


def normal(rng, shape, dtype=jnp.float32):
  # numpy, not jax.random: eager jax.random compiles a kernel per shape.
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def causal_selection(rng, b, t, k, segment_ids=None):
  """Random causal (and in-segment) selections via the reference top-k:
  early queries (t + 1 < k) get invalid entries, as in the model."""
  iq, ik, iw = (normal(rng, s) for s in ((b, t, 2, 8), (b, t, 8), (b, t, 2)))
  return jax.jit(reference.indexer_topk_reference, static_argnums=3,
                 compiler_options=FAST)(iq, ik, iw, k, segment_ids)


def inputs(b, t, n, a, k, seed=0, segment_ids=None, dtype=jnp.float32):
  """q [B,T,N,A], latent rows kv [B,T,A] and a causal selection of k."""
  rng = np.random.default_rng(seed)
  q = normal(rng, (b, t, n, a), dtype)
  kv = normal(rng, (b, t, a), dtype)
  idx, valid = causal_selection(rng, b, t, k, segment_ids)
  return q, kv, idx, valid


def run(fn, q, kv, idx, valid, scale, v_dim, **kw):
  """Outputs and gradients of a loss through both o and lse, jitted."""
  rng = np.random.default_rng(99)
  b, t, n, _ = q.shape
  co, cl = normal(rng, (b, t, n, v_dim)), normal(rng, (b, t, n))

  def loss(q, kv):
    o, lse = fn(q, kv, idx, valid, scale, v_dim, **kw)
    return (jnp.sum(o.astype(jnp.float32) * co) + jnp.sum(lse * cl),
            (o, lse))

  (_, (o, lse)), (dq, dkv) = jax.jit(
      jax.value_and_grad(loss, (0, 1), has_aux=True),
      compiler_options=FAST)(q, kv)
  return o, lse, dq, dkv


def close(got, want, tol):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  scale = max(float(np.abs(want).max()), 1e-6)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def check(q, kv, idx, valid, v_dim, tol=1e-5, **kw):
  scale = q.shape[-1] ** -0.5
  got = run(sparse_mla, q, kv, idx, valid, scale, v_dim, **kw)
  up = lambda x: x.astype(jnp.float32)
  want = run(reference.sparse_mla_reference, up(q), up(kv), idx, valid,
             scale, v_dim)
  for g, w in zip(got, want):
    close(g, w, tol)
  return got


@pytest.mark.parametrize("b,t,n,a,c,k,block", [
    # T not a multiple of anything, k > t + 1 for early t, rope part of 8.
    (2, 13, 4, 72, 64, 8, SparseMLABlocks()),
    # One head, no rope part (A == v_dim), K not a power of two.
    (1, 20, 1, 64, 64, 5, SparseMLABlocks()),
    # 16 heads, v_dim not a power of two (padded), several K blocks, several
    # dkv query chunks with a ragged last chunk.
    (1, 37, 16, 40, 24, 16,
     SparseMLABlocks(block_k=16, block_k_dkv=16, bwd_q_chunk=8)),
    # Several head blocks (40 heads padded to 48 = 3 x 16).
    (1, 9, 40, 24, 16, 4, SparseMLABlocks(block_n=16)),
])
def test_matches_reference(b, t, n, a, c, k, block):
  q, kv, idx, valid = inputs(b, t, n, a, k)
  assert not bool(valid.all())  # early queries have invalid entries
  check(q, kv, idx, valid, c, block=block)


def test_packed_segments():
  seg = jnp.array([[0] * 7 + [1] * 11 + [2] * 6, [0] * 24])
  q, kv, idx, valid = inputs(2, 24, 4, 48, 8, seed=1, segment_ids=seg)
  # The selection never crosses a document boundary.
  doc = jnp.take_along_axis(jnp.broadcast_to(seg[:, None, :], idx.shape[:2]
                                             + seg.shape[1:]), idx, axis=-1)
  assert bool(jnp.all(jnp.where(valid, doc == seg[:, :, None], True)))
  check(q, kv, idx, valid, 32, block=SparseMLABlocks(bwd_q_chunk=8))


def test_duplicate_rows_accumulate():
  """Every query selects the same few rows (and some twice): dkv must sum
  all contributions; a lost update would show in the rows' gradient."""
  b, t, n, a, k = 1, 16, 4, 24, 6
  q, kv, _, _ = inputs(b, t, n, a, k, seed=2)
  idx = jnp.broadcast_to(jnp.array([0, 1, 0, 2, 1, 0], jnp.int32), (b, t, k))
  valid = jnp.ones((b, t, k), bool)
  _, _, _, dkv = check(q, kv, idx, valid, 16,
                       block=SparseMLABlocks(bwd_q_chunk=4))
  assert np.all(np.asarray(dkv[0, 3:]) == 0.0)   # unselected rows
  assert np.all(np.abs(np.asarray(dkv[0, :3])).sum(-1) > 0)


def test_bf16():
  q, kv, idx, valid = inputs(2, 13, 4, 72, 8, seed=3, dtype=jnp.bfloat16)
  o, lse, dq, dkv = check(q, kv, idx, valid, 64, tol=3e-2)
  assert o.dtype == dq.dtype == dkv.dtype == jnp.bfloat16
  assert lse.dtype == jnp.float32


def test_dispatch_impl_pallas():
  from dsax import kernels
  q, kv, idx, valid = inputs(1, 10, 4, 24, 4, seed=4)
  call = lambda impl: jax.jit(functools.partial(
      kernels.sparse_mla, scale=0.3, v_dim=16, impl=impl),
      compiler_options=FAST)(q, kv, idx, valid)
  got, want = call("pallas"), call("reference")
  for g, w in zip(got, want):
    close(g, w, 1e-5)


@pytest.mark.parametrize("change,match", [
    (dict(idx=lambda x: x.astype(jnp.int16)), "idx_BTK must be int32"),
    (dict(valid=lambda x: x.astype(jnp.int32)), "valid_BTK must be bool"),
    (dict(kv=lambda x: x[..., :-1]), "kv_BSA shape"),
    (dict(q=lambda x: x[:, :-1]), "idx_BTK shape"),
    (dict(v_dim=25), "v_dim must be"),
    (dict(kv=lambda x: x.astype(jnp.bfloat16)), "kv_BSA dtype"),
])
def test_input_checks(change, match):
  q, kv, idx, valid = inputs(1, 6, 2, 24, 4)
  args = dict(q=q, kv=kv, idx=idx, valid=valid)
  v_dim = change.pop("v_dim", 16)
  for name, fn in change.items():
    args[name] = fn(args[name])
  with pytest.raises((ValueError, TypeError), match=match):
    sparse_mla(args["q"], args["kv"], args["idx"], args["valid"], 0.2, v_dim)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 3e-2),
                                       (jnp.float32, 1e-2)])  # f32 dots: TF32
def test_gpu_deepseek_shape(dtype, tol):
  """Compiled Triton kernels at the DeepSeek layout: A = 512 + 64, 64 heads
  (one head block), K = 128 selected rows of T = 512."""
  q, kv, idx, valid = inputs(1, 512, 64, 576, 128, seed=5, dtype=dtype)
  check(q, kv, idx, valid, 512, tol=tol, interpret=False)
