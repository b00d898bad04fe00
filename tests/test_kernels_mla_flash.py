"""Dense causal MLA flash kernels (interpret mode on CPU) against the chunked
jnp reference, which is itself checked against a one-shot softmax; the fused
warm-up target against its jnp twin and the dsa.py dense warm-up KL."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsax import dsa, mla
from dsax.config import IndexerConfig, ModelConfig
from dsax.kernels.mla_flash import (FlashBlocks, mla_flash,
                                    mla_flash_reference, warmup_kl,
                                    warmup_kl_reference)

gpu = pytest.mark.skipif(jax.default_backend() == "cpu",
                         reason="needs a GPU (compiled Triton kernels)")
# Interpret-mode kernels are big XLA loops: compile them without LLVM
# optimisation (3x faster to compile; these arrays are tiny).
FAST = ({"xla_backend_optimization_level": 0}
        if jax.default_backend() == "cpu" else {})

SMALL = FlashBlocks(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16,
                    block_q_kl=16, block_k_kl=16)


def normal(rng, shape, dtype=jnp.float32):
  # numpy, not jax.random: eager jax.random compiles a kernel per shape.
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def inputs(b, t, n, dk, e, seed=0, segments=False, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = normal(rng, (b, t, n, dk), dtype)
  k = normal(rng, (b, t, n, dk), dtype)
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


@pytest.mark.parametrize("b,t,n,dk,e,segments,block", [
    # T not a multiple of the blocks, several blocks each way.
    (2, 37, 4, 24, 16, False, SMALL),
    # Packed documents, qk dim 72 = 64 + 8 (padded piece), E = 40 padded.
    (1, 50, 4, 72, 40, True, FlashBlocks()),
    # 16 heads, packed.
    (1, 20, 16, 24, 16, True, SMALL),
    # One head, DeepSeek head dims: K = 128 + 64, E = 128; unequal blocks.
    (1, 33, 1, 192, 128, True,
     FlashBlocks(block_q=16, block_k=32, block_q_bwd=32, block_k_bwd=16)),
])
def test_matches_reference(b, t, n, dk, e, segments, block):
  q, k, v, seg = inputs(b, t, n, dk, e, segments=segments)
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
    s = jnp.einsum("btnk,bsnk->bnts", q, k) * 0.5
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
    (dict(k=lambda x: x[..., :-1]), "k_BSNK shape"),
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


# ---------------------------------------------------------- warm-up target


def segments(rng, b, t):
  return jnp.asarray(np.cumsum(rng.random((b, t)) < 0.15, axis=1), jnp.int32)


@pytest.mark.parametrize("b,t,s,n,dk,start,segmented", [
    # A query slab at positions 20..42 of 50 keys: T, S not block multiples.
    (2, 23, 50, 3, 24, 20, True),
    # One head, K = 72 (64 + padded 8), queries from 0, no segments.
    (1, 37, 37, 1, 72, 0, False),
])
def test_warmup_kl_matches_reference_and_its_logits_gradient(
    b, t, s, n, dk, start, segmented):
  rng = np.random.default_rng(4)
  q, k = normal(rng, (b, t, n, dk)), normal(rng, (b, s, n, dk))
  logits = 3 * normal(rng, (b, t, s))
  seg_k = segments(rng, b, s) if segmented else None
  seg_q = None if seg_k is None else seg_k[:, start:start + t]
  scale = dk ** -0.5
  # The final lse of each head, as the attention forward leaves it.
  mask = ((jnp.arange(s)[None, :] <= start + jnp.arange(t)[:, None])[None]
          & (True if seg_k is None else seg_q[:, :, None] == seg_k[:, None]))
  sc = jnp.einsum("btnk,bsnk->btns", q, k) * scale
  lse = jax.nn.logsumexp(jnp.where(mask[:, :, None], sc, -jnp.inf), -1)
  ct = normal(rng, (b, t))

  def run(fn, **kw):
    def loss(logits, q, k, lse):
      kl = fn(q, k, lse, logits, scale, seg_q, seg_k, start, **kw)
      return jnp.sum(kl * ct), kl
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True),
                   compiler_options=FAST)(logits, q, k, lse)

  (_, kl), (dl, dq, dk_, dlse) = run(warmup_kl, block=SMALL)
  (_, rkl), (rdl, *_) = run(warmup_kl_reference)
  assert float(jnp.mean(rkl)) > 0.1     # a real divergence, not ~0
  close(kl, rkl, 1e-5)
  close(dl, rdl, 1e-5)
  # Outside the causal in-segment keys the gradient is exactly zero.
  assert not np.any(np.asarray(dl)[~np.broadcast_to(mask, dl.shape)])
  for g in (dq, dk_, dlse):                # the target is detached
    assert not np.any(np.asarray(g))


def mla_cfg(n, **kw):
  return ModelConfig(n_heads=n, qk_nope_head_dim=16, qk_rope_head_dim=8,
                     v_head_dim=16, kv_lora_rank=32,
                     indexer=IndexerConfig(n_heads=2, head_dim=16), **kw)


def mla_inputs(cfg, b, t, seed, segmented):
  rng = np.random.default_rng(seed)
  n, h, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
  ix = cfg.indexer
  xs = (normal(rng, (b, t, n, h)), normal(rng, (b, t, n, r)),
        normal(rng, (b, t, cfg.kv_lora_rank)), normal(rng, (b, t, r)),
        normal(rng, (cfg.kv_lora_rank, n, h + cfg.v_head_dim)) * 0.3,
        normal(rng, (b, t, ix.n_heads, ix.head_dim)),
        normal(rng, (b, t, ix.head_dim)), normal(rng, (b, t, ix.n_heads)))
  return xs, (segments(rng, b, t) if segmented else None), rng


@pytest.mark.parametrize("b,t,n,chunk,segmented", [
    (2, 37, 4, 16, True),    # T = 37: 3 chunks, the last one partial
    (1, 30, 1, 64, False),   # one head, one chunk
    (1, 21, 16, 8, True),    # 16 heads, chunks smaller than the block
])
def test_fused_target_matches_dsa_dense_kl(b, t, n, chunk, segmented):
  """mla.dense_attention through mla_flash with the fused target equals the
  chunked jnp path with dsa.dense_probe: output, warm-up KL, and gradients
  of a loss on both (so the KL adds nothing to the q/kv gradients)."""
  cfg = mla_cfg(n, attn_q_chunk=chunk)
  xs, seg, rng = mla_inputs(cfg, b, t, seed=n, segmented=segmented)
  co = normal(rng, (b, t, n, cfg.v_head_dim))
  ct = normal(rng, (b, t))

  def run(impl):
    def loss(*xs):
      attn, (iq, ik, iw) = xs[:5], xs[5:]
      if impl == "pallas":
        o, kl = mla.dense_attention(*attn, cfg, seg, impl="pallas",
                                    target=(iq, ik, iw))
      else:
        o, per_tok = mla.dense_attention(
            *attn, cfg, seg, probe=dsa.dense_probe(4, True, False),
            probe_args=(iq, iw), probe_keys=(ik,), impl="reference")
        kl = per_tok["indexer_kl"]
      return jnp.sum(o * co) + jnp.sum(kl * ct), (o, kl)
    return jax.jit(jax.value_and_grad(loss, tuple(range(8)), has_aux=True),
                   compiler_options=FAST)(*xs)

  (_, (o, kl)), grads = run("pallas")
  (_, (ro, rkl)), rgrads = run("reference")
  assert float(jnp.mean(rkl)) > 0.1
  close(o, ro, 1e-5)
  close(kl, rkl, 1e-5)
  for name, g, r in zip(["q_nope", "q_rope", "kv", "k_rope", "wkv_b", "q_I",
                         "k_I", "w"], grads, rgrads):
    np.testing.assert_allclose(g, r, rtol=1e-4,
                               atol=1e-5 * float(np.abs(r).max()),
                               err_msg=name)


def test_target_through_the_wrapper_and_its_reference():
  """kernels.mla_flash(target=...) pallas vs reference: the reference's
  KL from its own probabilities equals the kernel's second pass."""
  from dsax import kernels
  q, k, v, seg = inputs(1, 26, 2, 24, 16, seed=6, segments=True)
  rng = np.random.default_rng(7)
  target = (normal(rng, (1, 26, 3, 16)), normal(rng, (1, 26, 16)),
            normal(rng, (1, 26, 3)))
  call = lambda impl: jax.jit(functools.partial(
      kernels.mla_flash, scale=0.3, q_chunk=16, impl=impl),
      compiler_options=FAST)(q, k, v, segment_ids_BT=seg, target=target)
  got, want = call("pallas"), call("reference")
  assert len(got) == len(want) == 3
  for g, w in zip(got, want):
    close(g, w, 1e-5)


def test_target_forward_and_backward_never_hold_t_by_s():
  """The largest array in the KL's gradient is one [chunk, S] logits slab:
  no T x S, no T x S x N, and no per-chunk slabs stacked across chunks."""
  from test_dsa import _all_avals
  b, t, n, chunk = 1, 512, 2, 64
  shapes = [(b, t, n, 24), (b, t, n, 24), (b, t, n, 16), (b, t, 2, 16),
            (b, t, 16), (b, t, 2)]

  def loss(q, k, v, *target):
    return jnp.sum(mla_flash(q, k, v, 0.3, target=target,
                             target_chunk=chunk)[2])

  jaxpr = jax.make_jaxpr(jax.grad(loss, (3, 4, 5)))(
      *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).jaxpr
  biggest = max(int(np.prod(a.shape)) for a in _all_avals(jaxpr)
                if hasattr(a, "shape"))
  assert biggest == b * chunk * t, biggest


def test_warmup_kl_input_checks():
  q, k, _, seg = inputs(1, 8, 2, 16, 16, segments=True)
  lse = jnp.zeros((1, 8, 2))
  with pytest.raises(ValueError, match="logits_BTS shape"):
    warmup_kl(q, k, lse, jnp.zeros((1, 8, 7)), 0.25, seg, seg)
  with pytest.raises(ValueError, match="lse_BTN shape"):
    warmup_kl(q, k, lse[..., :1], jnp.zeros((1, 8, 8)), 0.25, seg, seg)
  with pytest.raises(ValueError, match="given together"):
    warmup_kl(q, k, lse, jnp.zeros((1, 8, 8)), 0.25, seg, None)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 3e-2),
                                       (jnp.float32, 1e-2)])  # f32 dots: TF32
def test_gpu_deepseek_heads(dtype, tol):
  """Compiled Triton kernels: K = 192, E = 128, 16 heads, T = 1000."""
  q, k, v, seg = inputs(1, 1000, 16, 192, 128, seed=5, segments=True,
                        dtype=dtype)
  check(q, k, v, seg, tol=tol, interpret=False)


@gpu
@pytest.mark.gpu
def test_gpu_warmup_target():
  """Compiled Triton: the fused warm-up KL and its indexer gradients at
  K = 192, E = 128, 16 heads, I = 8, J = 64, T = 1000 (bf16)."""
  q, k, v, seg = inputs(1, 1000, 16, 192, 128, seed=8, segments=True,
                        dtype=jnp.bfloat16)
  rng = np.random.default_rng(9)
  target = (normal(rng, (1, 1000, 8, 64), jnp.bfloat16),
            normal(rng, (1, 1000, 64), jnp.bfloat16),
            normal(rng, (1, 1000, 8)) * 0.1)
  ct = normal(rng, (1, 1000))

  def run(fn, q, k, v, target, **kw):
    def loss(target):
      kl = fn(q, k, v, 192 ** -0.5, seg, target=target, **kw)[2]
      return jnp.sum(kl * ct), kl
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(target)

  (_, kl), grads = run(mla_flash, q, k, v, target, interpret=False,
                       target_chunk=256)
  up = lambda x: x.astype(jnp.float32)
  (_, rkl), rgrads = run(mla_flash_reference, up(q), up(k), up(v),
                         tuple(map(up, target)), q_chunk=256)
  close(kl, rkl, 3e-2)
  for g, r in zip(grads, rgrads):
    close(g, r, 5e-2)
