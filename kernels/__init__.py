"""Pallas kernels for dsax, installed as ``dsax.kernels``.

Each op has a jnp reference (``reference.py``) and a kernel with the same
signature; the public wrappers here take ``impl``:
  "reference" the jnp reference;  "pallas" the kernel;
  "auto"      the kernel on GPU/TPU, the reference on CPU.
Kernels import nothing from the rest of dsax.
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

IMPLS = ("reference", "pallas", "auto")


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "reference" if jax.default_backend() == "cpu" else "pallas"
  return impl


def sparse_mla(q_BTND, kv_BSD, idx_BTK, valid_BTK, scale, v_dim, *,
               q_chunk=256, impl="auto"):
  """Top-k sparse MLA (MQA form). Returns (o_BTNV, lse_BTN)."""
  if resolve_impl(impl) == "pallas":
    return _sparse_mla_kernel.sparse_mla(q_BTND, kv_BSD, idx_BTK, valid_BTK,
                                         scale, v_dim)
  return reference.sparse_mla_reference(q_BTND, kv_BSD, idx_BTK, valid_BTK,
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


def mla_flash(q_BTNK, k_BSNK, v_BSNE, scale, segment_ids_BT=None, *,
              target=None, q_chunk=256, impl="auto"):
  """Causal, in-segment dense attention (expanded MLA, K = H + R).
  Returns (o_BTNE, lse_BTN), and the DSA warm-up KL_BT when ``target =
  (q_I_BTIJ, k_I_BSJ, w_BTI)`` is given (the kernel computes it in query
  chunks of ``q_chunk``, no T x S x N; differentiable in the target only)."""
  if resolve_impl(impl) == "pallas":
    return _mla_flash_kernel.mla_flash(q_BTNK, k_BSNK, v_BSNE, scale,
                                       segment_ids_BT, target=target,
                                       target_chunk=q_chunk)
  return _mla_flash_kernel.mla_flash_reference(q_BTNK, k_BSNK, v_BSNE, scale,
                                               segment_ids_BT, target=target,
                                               q_chunk=q_chunk)
