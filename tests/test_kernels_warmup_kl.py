"""The DSA warm-up KL kernels (interpret mode on CPU), fed by mla_flash's lse:
the KL pass on given logits against its jnp twin, the pair mla_flash +
warmup_kl against the pair of references and a one-shot dense warm-up KL
(outputs and gradients), the detached target, and memory (no T x S)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import largest_size
from dsax import kernels
from dsax.kernels.mla_flash import (FlashBlocks, mla_flash,
                                    mla_flash_reference)
from dsax.kernels.warmup_kl import (WarmupKLBlocks, kl_from_logits,
                                    kl_from_logits_reference, warmup_kl,
                                    warmup_kl_reference)

gpu = pytest.mark.skipif(jax.default_backend() == "cpu",
                         reason="needs a GPU (compiled Triton kernels)")
# Interpret-mode kernels are big XLA loops: compile them without LLVM
# optimisation (3x faster to compile; these arrays are tiny).
FAST = ({"xla_backend_optimization_level": 0}
        if jax.default_backend() == "cpu" else {})

SMALL_FLASH = FlashBlocks(block_q=16, block_k=16, block_q_bwd=16,
                          block_k_bwd=16)
SMALL = WarmupKLBlocks(block_q=16, block_k=16)


def normal(rng, shape, dtype=jnp.float32):
  # numpy, not jax.random: eager jax.random compiles a kernel per shape.
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def segments(rng, b, t):
  """Packed documents of random lengths."""
  return jnp.asarray(np.cumsum(rng.random((b, t)) < 0.15, axis=1), jnp.int32)


def close(got, want, tol):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  scale = max(float(np.abs(want).max()), 1e-6)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def inputs(b, t, n, p, e, i, j, seed, segmented, dtype=jnp.float32):
  """Attention (q, k, v), indexer (q_I, k_I, w) and segment ids."""
  rng = np.random.default_rng(seed)
  xs = (normal(rng, (b, t, n, p), dtype), normal(rng, (b, t, n, p), dtype),
        normal(rng, (b, t, n, e), dtype), normal(rng, (b, t, i, j), dtype),
        normal(rng, (b, t, j), dtype), normal(rng, (b, t, i)))
  return xs, (segments(rng, b, t) if segmented else None), rng


def dense_warmup_kl(q_BTNP, k_BSNP, q_I_BTIJ, k_I_BSJ, w_BTI, scale,
                    seg_BT):
  """The warm-up KL in one shot from its definition (T x S x N): softmax per
  head, mean over heads, L1-normalise (detached); KL against the softmax of
  the causal in-segment indexer logits."""
  t = q_BTNP.shape[1]
  pos = jnp.arange(t)
  mask_BTS = (pos[None, :] <= pos[:, None])[None]
  if seg_BT is not None:
    mask_BTS = mask_BTS & (seg_BT[:, :, None] == seg_BT[:, None, :])
  s_BNTS = jnp.einsum("btnp,bsnp->bnts", q_BTNP, k_BSNP) * scale
  prob_BNTS = jax.nn.softmax(jnp.where(mask_BTS[:, None], s_BNTS, -jnp.inf),
                             axis=-1)
  p_BTS = jax.lax.stop_gradient(jnp.mean(prob_BNTS, axis=1))
  p_BTS = p_BTS / jnp.sum(p_BTS, axis=-1, keepdims=True)
  dots_BTIS = jnp.einsum("btij,bsj->btis", q_I_BTIJ, k_I_BSJ)
  logits_BTS = jnp.einsum("btis,bti->bts", jax.nn.relu(dots_BTIS), w_BTI)
  logq_BTS = jax.nn.log_softmax(jnp.where(mask_BTS, logits_BTS, -jnp.inf),
                                axis=-1)
  terms_BTS = jnp.where(mask_BTS, jax.scipy.special.xlogy(p_BTS, p_BTS)
                        - p_BTS * jnp.where(mask_BTS, logq_BTS, 0.0), 0.0)
  return jnp.sum(terms_BTS, axis=-1)


def pair(impl, q, k, v, q_i, k_i, w_i, scale, seg, chunk,
         blocks=(SMALL_FLASH, SMALL), **kw):
  """(o, lse, kl) of mla_flash then warmup_kl on its lse: the kernels
  (small tiles unless ``blocks`` says) or the references."""
  if impl == "pallas":
    o, lse = mla_flash(q, k, v, scale, seg, block=blocks[0], **kw)
    kl = warmup_kl(q, k, lse, q_i, k_i, w_i, scale, seg, chunk=chunk,
                   block=blocks[1], **kw)
  else:
    o, lse = mla_flash_reference(q, k, v, scale, seg, chunk)
    kl = warmup_kl_reference(q, k, lse, q_i, k_i, w_i, scale, seg, chunk)
  return o, lse, kl


# --------------------------------------------------- the KL on given logits


@pytest.mark.parametrize("b,t,s,n,p,start,segmented", [
    # A query slab at positions 20..42 of 50 keys: T, S not block multiples.
    (2, 23, 50, 3, 24, 20, True),
    # One head, P = 72 (64 + padded 8), queries from 0, no segments.
    (1, 37, 37, 1, 72, 0, False),
])
def test_kl_from_logits_matches_reference_and_its_logits_gradient(
    b, t, s, n, p, start, segmented):
  rng = np.random.default_rng(4)
  q, k = normal(rng, (b, t, n, p)), normal(rng, (b, s, n, p))
  logits = 3 * normal(rng, (b, t, s))
  seg_k = segments(rng, b, s) if segmented else None
  seg_q = None if seg_k is None else seg_k[:, start:start + t]
  scale = p ** -0.5
  # The final lse of each head, as the attention forward leaves it.
  mask = ((jnp.arange(s)[None, :] <= start + jnp.arange(t)[:, None])[None]
          & (True if seg_k is None else seg_q[:, :, None] == seg_k[:, None]))
  sc = jnp.einsum("btnp,bsnp->btns", q, k) * scale
  lse = jax.nn.logsumexp(jnp.where(mask[:, :, None], sc, -jnp.inf), -1)
  ct = normal(rng, (b, t))

  def run(fn, **kw):
    def loss(logits, q, k, lse):
      kl = fn(q, k, lse, logits, scale, seg_q, seg_k, start, **kw)
      return jnp.sum(kl * ct), kl
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True),
                   compiler_options=FAST)(logits, q, k, lse)

  (_, kl), (dl, dq, dk, dlse) = run(kl_from_logits, block=SMALL)
  (_, rkl), (rdl, *_) = run(kl_from_logits_reference)
  assert float(jnp.mean(rkl)) > 0.1     # a real divergence, not ~0
  close(kl, rkl, 1e-5)
  close(dl, rdl, 1e-5)
  # Outside the causal in-segment keys the gradient is exactly zero.
  assert not np.any(np.asarray(dl)[~np.broadcast_to(mask, dl.shape)])
  for g in (dq, dk, dlse):                 # the target is detached
    assert not np.any(np.asarray(g))


def test_kl_from_logits_input_checks():
  (q, k, *_), seg, _ = inputs(1, 8, 2, 16, 16, 2, 16, 0, True)
  lse = jnp.zeros((1, 8, 2))
  with pytest.raises(ValueError, match="logits_BTS shape"):
    kl_from_logits(q, k, lse, jnp.zeros((1, 8, 7)), 0.25, seg, seg)
  with pytest.raises(ValueError, match="lse_BTN shape"):
    kl_from_logits(q, k, lse[..., :1], jnp.zeros((1, 8, 8)), 0.25, seg, seg)
  with pytest.raises(ValueError, match="given together"):
    kl_from_logits(q, k, lse, jnp.zeros((1, 8, 8)), 0.25, seg, None)


# ------------------------------------------- mla_flash + warmup_kl, chunked


@pytest.mark.parametrize("b,t,n,chunk,segmented", [
    (2, 37, 4, 16, True),    # T = 37: 3 chunks, the last one partial
    (1, 30, 1, 64, False),   # one head, one chunk
    (1, 21, 16, 8, True),    # 16 heads, chunks smaller than the block
])
def test_pair_matches_references_and_dense_warmup_kl(b, t, n, chunk,
                                                     segmented):
  """mla_flash then warmup_kl on its lse (kernels) equals the pair of jnp
  references and the one-shot dense warm-up KL: output, KL, and gradients
  of a loss on both for all six inputs; the one-shot target is detached, so
  the KL adds nothing to the q, k, v gradients. MLA head dims:
  P = H + R = 16 + 8, E = 16; I 2, J 16."""
  xs, seg, rng = inputs(b, t, n, 24, 16, 2, 16, seed=n, segmented=segmented)
  scale = 24 ** -0.5
  co = normal(rng, (b, t, n, 16))
  ct = normal(rng, (b, t))

  def run(impl):
    def loss(*xs):
      if impl == "dense":
        o, _ = mla_flash_reference(*xs[:3], scale, seg, chunk)
        kl = dense_warmup_kl(*xs[:2], *xs[3:], scale, seg)
      else:
        o, _, kl = pair(impl, *xs, scale, seg, chunk)
      return jnp.sum(o * co) + jnp.sum(kl * ct), (o, kl)
    return jax.jit(jax.value_and_grad(loss, tuple(range(6)), has_aux=True),
                   compiler_options=FAST)(*xs)

  (_, (o, kl)), grads = run("pallas")
  names = ["q", "k", "v", "q_I", "k_I", "w"]
  for want in ("reference", "dense"):
    (_, (ro, rkl)), rgrads = run(want)
    assert float(jnp.mean(rkl)) > 0.1
    close(o, ro, 1e-5)
    close(kl, rkl, 1e-5)
    for name, g, r in zip(names, grads, rgrads):
      np.testing.assert_allclose(g, r, rtol=1e-4,
                                 atol=1e-5 * float(np.abs(r).max()),
                                 err_msg=f"{name} vs {want}")


def test_public_wrappers_pallas_equals_reference():
  """kernels.mla_flash then kernels.warmup_kl, impl pallas vs reference:
  o, lse, KL; the KL's gradient w.r.t. q, k, lse is exactly zero in both."""
  xs, seg, _ = inputs(1, 26, 2, 24, 16, 3, 16, seed=6, segmented=True)
  q, k, v, q_i, k_i, w_i = xs

  @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
  def call(impl, q, k, v):
    o, lse = kernels.mla_flash(q, k, v, 0.3, seg, q_chunk=16, impl=impl)
    kl_fn = lambda q, k, lse: kernels.warmup_kl(
        q, k, lse, q_i, k_i, w_i, 0.3, seg, q_chunk=16, impl=impl)
    kl, kl_vjp = jax.vjp(kl_fn, q, k, lse)
    return (o, lse, kl), kl_vjp(jnp.ones_like(kl))

  got, got_grads = call("pallas", q, k, v)
  want, want_grads = call("reference", q, k, v)
  assert len(got) == len(want) == 3
  for g, w in zip(got, want):
    close(g, w, 1e-5)
  for g in got_grads + want_grads:
    assert not np.any(np.asarray(g))


def test_forward_and_backward_never_hold_t_by_s():
  """The largest array in the KL's gradient is one [chunk, S] logits slab:
  no T x S, no T x S x N, and no per-chunk slabs stacked across chunks."""
  b, t, n, chunk = 1, 512, 2, 64
  shapes = [(b, t, n, 24), (b, t, n, 24), (b, t, n, 16), (b, t, 2, 16),
            (b, t, 16), (b, t, 2)]

  def loss(q, k, v, q_i, k_i, w_i):
    _, lse = mla_flash(q, k, v, 0.3)
    return jnp.sum(warmup_kl(q, k, lse, q_i, k_i, w_i, 0.3, chunk=chunk))

  jaxpr = jax.make_jaxpr(jax.grad(loss, (3, 4, 5)))(
      *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).jaxpr
  biggest = largest_size(jaxpr)
  assert biggest == b * chunk * t, biggest


@pytest.mark.parametrize("change,match", [
    (dict(lse=lambda x: x[..., :1]), "lse_BTN shape"),
    (dict(k=lambda x: x[:, :-1]), "needs T == S"),
    (dict(k=lambda x: x[..., :-1]), "k_BSNP shape"),
    (dict(k=lambda x: x.astype(jnp.bfloat16)), "k_BSNP dtype"),
    (dict(q_i=lambda x: x[:, :, :, :-1]), "k_BSJ shape"),
    (dict(w_i=lambda x: x[..., :1]), "w_BTI shape"),
    (dict(seg=lambda x: x[:, :-1]), "segment_ids_BT shape"),
    (dict(chunk=0), "chunk must be"),
])
def test_warmup_kl_input_checks(change, match):
  (q, k, _, q_i, k_i, w_i), seg, _ = inputs(1, 8, 2, 16, 16, 2, 16, 0, True)
  vals = dict(q=q, k=k, lse=jnp.zeros((1, 8, 2)), q_i=q_i, k_i=k_i, w_i=w_i,
              seg=seg)
  chunk = change.pop("chunk", 512)
  for name, fn in change.items():
    vals[name] = fn(vals[name])
  with pytest.raises((ValueError, TypeError), match=match):
    warmup_kl(vals["q"], vals["k"], vals["lse"], vals["q_i"], vals["k_i"],
              vals["w_i"], 0.25, vals["seg"], chunk=chunk)


@gpu
@pytest.mark.gpu
def test_gpu_warmup_kl():
  """Compiled Triton: mla_flash + warmup_kl and the KL's indexer gradients
  at P = 192, E = 128, 16 heads, I = 8, J = 64, T = 1000 (bf16)."""
  xs, seg, rng = inputs(1, 1000, 16, 192, 128, 8, 64, seed=8,
                        segmented=True, dtype=jnp.bfloat16)
  q, k, v, q_i, k_i, _ = xs
  w_i = normal(rng, (1, 1000, 8)) * 0.1
  ct = normal(rng, (1, 1000))

  def run(impl, q, k, v, target, **kw):
    def loss(target):
      kl = pair(impl, q, k, v, *target, 192 ** -0.5, seg, 256, **kw)[2]
      return jnp.sum(kl * ct), kl
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(target)

  up = lambda x: x.astype(jnp.float32)
  (_, kl), grads = run("pallas", q, k, v, (q_i, k_i, w_i),
                       blocks=(FlashBlocks(), WarmupKLBlocks()),
                       interpret=False)
  (_, rkl), rgrads = run("reference", up(q), up(k), up(v),
                         tuple(map(up, (q_i, k_i, w_i))))
  close(kl, rkl, 3e-2)
  for g, r in zip(grads, rgrads):
    close(g, r, 5e-2)
