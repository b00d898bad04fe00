"""Dense causal MLA flash kernels (interpret mode on CPU) against the chunked
jnp reference, which is itself checked against a one-shot softmax. The
warm-up KL that reads the kernel's lse: test_kernels_warmup_kl.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsax.kernels.mla_flash import (FlashBlocks, mla_flash,
                                    mla_flash_reference)

gpu = pytest.mark.skipif(jax.default_backend() == "cpu",
                         reason="needs a GPU (compiled Triton kernels)")
# Interpret-mode kernels are big XLA loops: compile them without LLVM
# optimisation (3x faster to compile; these arrays are tiny).
FAST = ({"xla_backend_optimization_level": 0}
        if jax.default_backend() == "cpu" else {})

SMALL = FlashBlocks(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def normal(rng, shape, dtype=jnp.float32):
  # numpy, not jax.random: eager jax.random compiles a kernel per shape.
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def inputs(b, t, n, p, e, seed=0, segments=False, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = normal(rng, (b, t, n, p), dtype)
  k = normal(rng, (b, t, n, p), dtype)
  v = normal(rng, (b, t, n, e), dtype)
  seg = None
  if segments:   # packed documents of random lengths
    seg = jnp.asarray(np.cumsum(rng.random((b, t)) < 0.15, axis=1), jnp.int32)
  return q, k, v, seg


def run(fn, q, k, v, seg, **kw):
  """Outputs and gradients of a loss through both o and lse, jitted."""
  rng = np.random.default_rng(99)
  co = normal(rng, q.shape[:3] + v.shape[3:])
  cl = normal(rng, q.shape[:3])
  scale = q.shape[-1] ** -0.5

  def loss(q, k, v):
    o, lse = fn(q, k, v, scale, seg, **kw)
    return (jnp.sum(o.astype(jnp.float32) * co) + jnp.sum(lse * cl),
            (o, lse))

  (_, (o, lse)), grads = jax.jit(
      jax.value_and_grad(loss, (0, 1, 2), has_aux=True),
      compiler_options=FAST)(q, k, v)
  return (o, lse) + grads


def close(got, want, tol):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  scale = max(float(np.abs(want).max()), 1e-6)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def check(q, k, v, seg, tol=1e-5, **kw):
  got = run(mla_flash, q, k, v, seg, **kw)
  up = lambda x: x.astype(jnp.float32)
  want = run(mla_flash_reference, up(q), up(k), up(v), seg, q_chunk=16)
  for g, w in zip(got, want):
    close(g, w, tol)
  return got


@pytest.mark.parametrize("b,t,n,p,e,segments,block", [
    # T not a multiple of the blocks, several blocks each way.
    (2, 37, 4, 24, 16, False, SMALL),
    # Packed documents, qk dim 72 = 64 + 8 (padded piece), E = 40 padded.
    (1, 50, 4, 72, 40, True, FlashBlocks()),
    # 16 heads, packed.
    (1, 20, 16, 24, 16, True, SMALL),
    # One head, DeepSeek head dims: P = 128 + 64, E = 128; unequal blocks.
    (1, 33, 1, 192, 128, True,
     FlashBlocks(block_q=16, block_k=32, block_q_bwd=32, block_k_bwd=16)),
])
def test_matches_reference(b, t, n, p, e, segments, block):
  q, k, v, seg = inputs(b, t, n, p, e, segments=segments)
  check(q, k, v, seg, block=block)


def test_bf16():
  q, k, v, seg = inputs(2, 37, 4, 24, 16, seed=1, segments=True,
                        dtype=jnp.bfloat16)
  o, lse, dq, dk, dv = check(q, k, v, seg, tol=3e-2, block=SMALL)
  assert o.dtype == dq.dtype == dk.dtype == dv.dtype == jnp.bfloat16
  assert lse.dtype == jnp.float32


def test_reference_is_dense_softmax():
  """The chunked reference equals one causal, in-segment softmax."""
  q, k, v, seg = inputs(2, 21, 3, 8, 5, seed=2, segments=True)

  @functools.partial(jax.jit, compiler_options=FAST)
  def both(q, k, v, seg):
    s = jnp.einsum("btnp,bsnp->bnts", q, k) * 0.5
    t = jnp.arange(21)
    mask = ((t[None, :] <= t[:, None])[None]
            & (seg[:, :, None] == seg[:, None]))
    s = jnp.where(mask[:, None], s, -jnp.inf)
    want = (jnp.einsum("bnts,bsne->btne", jax.nn.softmax(s, -1), v),
            jnp.moveaxis(jax.nn.logsumexp(s, -1), 1, 2))
    return mla_flash_reference(q, k, v, 0.5, seg, q_chunk=8), want

  for g, w in zip(*both(q, k, v, seg)):
    close(g, w, 1e-5)


def test_dispatch_impl_pallas():
  from dsax import kernels
  q, k, v, seg = inputs(1, 12, 2, 24, 16, seed=3, segments=True)
  call = lambda impl: jax.jit(functools.partial(
      kernels.mla_flash, scale=0.3, impl=impl),
      compiler_options=FAST)(q, k, v, segment_ids_BT=seg)
  for g, w in zip(call("pallas"), call("reference")):
    close(g, w, 1e-5)


@pytest.mark.parametrize("change,match", [
    (dict(k=lambda x: x[..., :-1]), "k_BSNP shape"),
    (dict(v=lambda x: x[:, :-1]), "v_BSNE shape"),
    (dict(v=lambda x: x.astype(jnp.bfloat16)), "dtypes differ"),
    (dict(seg=lambda x: x[:, :-1]), "segment_ids_BT shape"),
])
def test_input_checks(change, match):
  q, k, v, seg = inputs(1, 8, 2, 16, 16, segments=True)
  vals = dict(q=q, k=k, v=v, seg=seg)
  for name, fn in change.items():
    vals[name] = fn(vals[name])
  with pytest.raises((ValueError, TypeError), match=match):
    mla_flash(vals["q"], vals["k"], vals["v"], 0.25, vals["seg"])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 3e-2),
                                       (jnp.float32, 1e-2)])  # f32 dots: TF32
def test_gpu_deepseek_heads(dtype, tol):
  """Compiled Triton kernels: P = 192, E = 128, 16 heads, T = 1000."""
  q, k, v, seg = inputs(1, 1000, 16, 192, 128, seed=5, segments=True,
                        dtype=dtype)
  check(q, k, v, seg, tol=tol, interpret=False)
