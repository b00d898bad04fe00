"""The kernels lower to Triton IR for CUDA, checked on CPU.

Lowering (not compiling) runs Pallas' Triton lowering without a GPU, so a CPU
machine can catch primitives Triton lacks, tiles that are not powers of two,
matmuls under 16 wide and atomics, at DeepSeek shapes and at the odd test
shapes. What it cannot catch: PTX compilation, shared-memory or register
limits, speed. Uses the internal Pallas Triton lowering module to read the IR;
skips if that moves.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from dsax.kernels.indexer import indexer_topk
from dsax.kernels.mla_flash import mla_flash
from dsax.kernels.sparse_mla import sparse_mla

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


@pytest.fixture
def triton_modules(monkeypatch):
  """Collects the Triton IR (text) of every pallas_call lowered for CUDA."""
  try:
    from jax._src.pallas.triton import lowering
  except ImportError as e:  # pragma: no cover
    pytest.skip(f"Pallas Triton lowering not importable: {e}")
  original = getattr(lowering, "lower_jaxpr_to_triton_module", None)
  if original is None:  # pragma: no cover
    pytest.skip("lower_jaxpr_to_triton_module moved")
  modules = []

  def spy(*args, **kw):
    result = original(*args, **kw)
    result.module.operation.verify()   # raises on ill-formed Triton IR
    modules.append(result.module.operation.get_asm())
    return result

  monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", spy)
  return modules


def lower_for_cuda(fn, *args):
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def check_ir(modules, n_calls):
  assert len(modules) == n_calls
  for asm in modules:
    name = re.search(r"module @(\w+)", asm).group(1)
    assert "atomic" not in asm, name
    for dims in re.findall(r"tensor<((?:\d+x)+)", asm):
      sizes = [int(d) for d in dims.rstrip("x").split("x")]
      assert all(s & (s - 1) == 0 for s in sizes), (name, sizes)
    for line in asm.splitlines():
      if "tt.dot " in line:
        for dims in re.findall(r"tensor<((?:\d+x)+)", line):
          sizes = [int(d) for d in dims.rstrip("x").split("x")]
          assert min(sizes) >= 16, (name, line.strip())


def f32_sum(x):
  return jnp.sum(x.astype(jnp.float32))


@pytest.mark.parametrize("b,t,n,d,v,k,dtype", [
    (1, 256, 64, 576, 512, 128, BF16),       # DeepSeek MQA layout
    (2, 13, 1, 72, 64, 5, jnp.float32),      # odd test shape
])
def test_sparse_mla_lowers(triton_modules, b, t, n, d, v, k, dtype):
  fn = functools.partial(sparse_mla, scale=0.1, v_dim=v, interpret=False)
  args = (S((b, t, n, d), dtype), S((b, t, d), dtype),
          S((b, t, k), jnp.int32), S((b, t, k), jnp.bool_))
  lower_for_cuda(fn, *args)
  grad = jax.grad(lambda q, kv, i, m: f32_sum(fn(q, kv, i, m)[0]), (0, 1))
  lower_for_cuda(grad, *args)
  check_ir(triton_modules, 1 + 3)      # fwd; fwd, dq, dkv


@pytest.mark.parametrize("b,t,i,j,dtype", [
    (1, 512, 64, 128, BF16),
    (2, 37, 1, 20, jnp.float32),
])
def test_indexer_lowers(triton_modules, b, t, i, j, dtype):
  fn = lambda q, k, w, s: indexer_topk(q, k, w, 64, s, interpret=False)
  lower_for_cuda(fn, S((b, t, i, j), dtype), S((b, t, j), dtype),
                 S((b, t, i), jnp.float32), S((b, t), jnp.int32))
  check_ir(triton_modules, 1)


@pytest.mark.parametrize("b,t,n,dk,e,dtype", [
    (1, 512, 16, 192, 128, BF16),            # K = 128 + 64
    (2, 37, 1, 72, 40, jnp.float32),
])
def test_mla_flash_lowers(triton_modules, b, t, n, dk, e, dtype):
  fn = lambda q, k, v, s: mla_flash(q, k, v, 0.1, s, interpret=False)
  args = (S((b, t, n, dk), dtype), S((b, t, n, dk), dtype),
          S((b, t, n, e), dtype), S((b, t), jnp.int32))
  lower_for_cuda(fn, *args)
  grad = jax.grad(lambda *a: f32_sum(fn(*a)[0]), (0, 1, 2))
  lower_for_cuda(grad, *args)
  check_ir(triton_modules, 1 + 3)      # fwd; fwd, dkv, dq
