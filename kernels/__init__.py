"""Pallas kernels for dsax, installed as ``dsax.kernels``.

One op per module, each a kernel with a jnp reference of the same signature;
the public wrappers here take ``impl``:
  "reference" the jnp reference;  "pallas" the kernel;
  "auto"      the kernel on GPU/TPU, the reference on CPU.
  sparse_mla    top-k sparse MLA (MQA form)          sparse_mla.py
  indexer_topk  lightning-indexer top-k selection    indexer.py
  mla_flash     causal dense attention, with lse     mla_flash.py
  warmup_kl     the DSA warm-up KL from that lse     warmup_kl.py
Shared jnp pieces: ``tiling`` (NEG_INF, matmul layouts, tiles),
``query_chunks`` (chunk maps, causal masks), ``reference`` (the sparse and
indexer references, ``kl_divergence``). Kernels import nothing from the rest
of dsax.
"""

from __future__ import annotations

import jax

from dsax.kernels import reference
# The kernel modules are imported here, before the wrappers below are defined:
# importing a submodule binds it as a package attribute, which would otherwise
# replace the wrapper of the same name (``dsax.kernels.sparse_mla`` the
# function) with the module on first use.
from dsax.kernels import indexer as _indexer_kernel
from dsax.kernels import mla_flash as _mla_flash_kernel
from dsax.kernels import sparse_mla as _sparse_mla_kernel
from dsax.kernels import warmup_kl as _warmup_kl_kernel

IMPLS = ("reference", "pallas", "auto")


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "reference" if jax.default_backend() == "cpu" else "pallas"
  return impl


def sparse_mla(q_BTNA, kv_BSA, idx_BTK, valid_BTK, scale, v_dim, *,
               q_chunk=256, impl="auto"):
  """Top-k sparse MLA (MQA form) over latent rows of A = C + R, v_dim = C.
  Returns (o_BTNC, lse_BTN)."""
  if resolve_impl(impl) == "pallas":
    return _sparse_mla_kernel.sparse_mla(q_BTNA, kv_BSA, idx_BTK, valid_BTK,
                                         scale, v_dim)
  return reference.sparse_mla_reference(q_BTNA, kv_BSA, idx_BTK, valid_BTK,
                                        scale, v_dim, q_chunk)


def indexer_topk(q_BTIJ, k_BSJ, w_BTI, topk, segment_ids_BT=None, *,
                 q_chunk=256, impl="auto"):
  """Causal, in-segment top-k of the lightning-indexer scores.
  Returns (idx_BTK int32, valid_BTK bool)."""
  if resolve_impl(impl) == "pallas":
    return _indexer_kernel.indexer_topk(q_BTIJ, k_BSJ, w_BTI, topk,
                                        segment_ids_BT)
  return reference.indexer_topk_reference(q_BTIJ, k_BSJ, w_BTI, topk,
                                          segment_ids_BT, q_chunk)


def mla_flash(q_BTNP, k_BSNP, v_BSNE, scale, segment_ids_BT=None, *,
              q_chunk=256, impl="auto"):
  """Causal, in-segment dense attention; P the qk head dim (H + R for
  expanded MLA, the head dim for GQA with k, v repeated to N heads).
  Returns (o_BTNE, lse_BTN f32); ``q_chunk`` is the reference's query
  chunk."""
  if resolve_impl(impl) == "pallas":
    return _mla_flash_kernel.mla_flash(q_BTNP, k_BSNP, v_BSNE, scale,
                                       segment_ids_BT)
  return _mla_flash_kernel.mla_flash_reference(q_BTNP, k_BSNP, v_BSNE, scale,
                                               segment_ids_BT, q_chunk)


def warmup_kl(q_BTNP, k_BSNP, lse_BTN, q_I_BTIJ, k_I_BSJ, w_BTI, scale,
              segment_ids_BT=None, *, q_chunk=512, impl="auto"):
  """The DSA dense warm-up KL_BT (f32) of causal self-attention (q, k and
  the lse that ``mla_flash`` returned) against the indexer logits of
  (q_I, k_I, w), in query chunks of ``q_chunk`` (no T x S x N). q, k, lse
  are detached: the gradient reaches q_I, k_I, w only."""
  if resolve_impl(impl) == "pallas":
    return _warmup_kl_kernel.warmup_kl(q_BTNP, k_BSNP, lse_BTN, q_I_BTIJ,
                                       k_I_BSJ, w_BTI, scale, segment_ids_BT,
                                       chunk=q_chunk)
  return _warmup_kl_kernel.warmup_kl_reference(q_BTNP, k_BSNP, lse_BTN,
                                               q_I_BTIJ, k_I_BSJ, w_BTI,
                                               scale, segment_ids_BT, q_chunk)
