"""The kernels lower to Triton IR for CUDA, checked on CPU.

Lowering (not compiling) runs Pallas' Triton lowering without a GPU, so a CPU
machine can catch primitives Triton lacks, ill-formed IR, tiles that are not
powers of two, matmuls under 16 wide and atomics, at DeepSeek shapes and at
the odd test shapes. Uses the internal Pallas Triton lowering module to read
the IR; skips if that moves.

With DSAX_TRITON_PYTHON naming a Python that has the ``triton`` package (not
a dependency; e.g. ``python -m venv /tmp/tenv && /tmp/tenv/bin/pip install
triton==3.5.0``), ``test_fits_sm90`` also compiles that IR to sm_90 machine
code with Triton's own ptxas and checks shared memory (<= 227 KB) and
register spills (none) at the default tile sizes. Triton 3.5 is not the
Triton inside jaxlib, so this is an estimate; speed still needs a GPU.
"""

import functools
import json
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import pytest

from dsax.kernels.indexer import indexer_logits, indexer_topk
from dsax.kernels.mla_flash import mla_flash
from dsax.kernels.sparse_mla import sparse_mla
from dsax.kernels.warmup_kl import warmup_kl

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


@pytest.mark.parametrize("b,t,n,a,c,k,dtype", [
    (1, 256, 64, 576, 512, 128, BF16),       # DeepSeek MQA layout
    (2, 13, 1, 72, 64, 5, jnp.float32),      # odd test shape
])
def test_sparse_mla_lowers(triton_modules, b, t, n, a, c, k, dtype):
  fn = functools.partial(sparse_mla, scale=0.1, v_dim=c, interpret=False)
  args = (S((b, t, n, a), dtype), S((b, t, a), dtype),
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
  logits = functools.partial(indexer_logits, interpret=False)
  grad = jax.grad(lambda *a: f32_sum(logits(*a)), (0, 1, 2))
  lower_for_cuda(grad, S((b, t, i, j), dtype), S((b, t, j), dtype),
                 S((b, t, i), jnp.float32))
  check_ir(triton_modules, 1 + 3)      # scores; logits fwd, dqw, dk


@pytest.mark.parametrize("b,t,n,p,e,dtype", [
    (1, 512, 16, 192, 128, BF16),            # P = 128 + 64
    (2, 37, 1, 72, 40, jnp.float32),
])
def test_mla_flash_lowers(triton_modules, b, t, n, p, e, dtype):
  fn = lambda q, k, v, s: mla_flash(q, k, v, 0.1, s, interpret=False)
  args = (S((b, t, n, p), dtype), S((b, t, n, p), dtype),
          S((b, t, n, e), dtype), S((b, t), jnp.int32))
  lower_for_cuda(fn, *args)
  grad = jax.grad(lambda *a: f32_sum(fn(*a)[0]), (0, 1, 2))
  lower_for_cuda(grad, *args)
  check_ir(triton_modules, 1 + 3)      # fwd; fwd, dkv, dq


def flash_then_warmup_kl(q, k, v, seg, q_i, k_i, w_i, chunk=512):
  """The warm-up KL as the model forms it: mla_flash, then warmup_kl on
  its lse."""
  _, lse = mla_flash(q, k, v, 0.1, seg, interpret=False)
  return warmup_kl(q, k, lse, q_i, k_i, w_i, 0.1, seg, chunk=chunk,
                   interpret=False)


@pytest.mark.parametrize("b,t,n,p,i,j,dtype", [
    (1, 512, 16, 192, 8, 64, BF16),
    (2, 37, 3, 72, 2, 20, jnp.float32),      # N not a power of two
])
def test_warmup_kl_lowers(triton_modules, b, t, n, p, i, j, dtype):
  """mla_flash + warmup_kl and the KL's gradient w.r.t. the indexer
  inputs."""
  fn = functools.partial(flash_then_warmup_kl, chunk=256)
  grad = jax.grad(lambda *a: jnp.sum(fn(*a)), (4, 5, 6))
  lower_for_cuda(grad, S((b, t, n, p), dtype), S((b, t, n, p), dtype),
                 S((b, t, n, 64), dtype), S((b, t), jnp.int32),
                 S((b, t, i, j), dtype), S((b, t, j), dtype),
                 S((b, t, i), jnp.float32))
  # attention fwd; logits fwd, KL; logits fwd again, dlogits, dqw, dk
  check_ir(triton_modules, 1 + 2 + 4)


# ------------------------------------------------- sm_90 compile (optional)

TRITON_PYTHON = os.environ.get("DSAX_TRITON_PYTHON")
SHARED_LIMIT = 227 * 1024     # H100 / H200 opt-in shared memory per block
COMPILE = r"""
import json, os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps, "num_stages": stages})
ptx = path + ".ptx"
open(ptx, "w").write(k.asm["ptx"])
ptxas = os.path.join(os.path.dirname(triton.__file__),
                     "backends", "nvidia", "bin", "ptxas")
r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o",
                    os.devnull], capture_output=True, text=True, check=True)
spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores",
                                        r.stderr))
regs = max(int(x) for x in re.findall(r"Used (\d+) registers", r.stderr))
print(json.dumps(dict(shared=k.metadata.shared, spills=spills, regs=regs)))
"""


def _deepseek_modules(op, modules):
  """Lowers one op (fwd and bwd) at DeepSeek sizes with default tiles;
  returns {kernel name: (ttir, num_warps, num_stages)}."""
  from dsax.kernels.indexer import IndexerBlocks, LogitsBlocks
  from dsax.kernels.mla_flash import FlashBlocks
  from dsax.kernels.sparse_mla import SparseMLABlocks
  from dsax.kernels.warmup_kl import WarmupKLBlocks
  b, t = 1, 1024
  if op == "sparse":
    blk = SparseMLABlocks()
    fn = functools.partial(sparse_mla, scale=0.1, v_dim=512, interpret=False)
    grad = jax.grad(lambda q, kv, i, m: f32_sum(fn(q, kv, i, m)[0]), (0, 1))
    lower_for_cuda(grad, S((b, t, 64, 576), BF16), S((b, t, 576), BF16),
                   S((b, t, 2048), jnp.int32), S((b, t, 2048), jnp.bool_))
    params = {"sparse_mla_fwd": (blk.num_warps, blk.num_stages),
              "sparse_mla_dq": (blk.num_warps_bwd, blk.num_stages_bwd),
              "sparse_mla_dkv": (blk.num_warps_bwd, blk.num_stages_bwd)}
  elif op == "indexer":
    blk = IndexerBlocks()
    fn = lambda q, k, w, s: indexer_topk(q, k, w, 2048, s, interpret=False)
    lower_for_cuda(fn, S((b, t, 64, 128), BF16), S((b, t, 128), BF16),
                   S((b, t, 64), jnp.float32), S((b, t), jnp.int32))
    logits = functools.partial(indexer_logits, interpret=False)
    grad = jax.grad(lambda *a: f32_sum(logits(*a)), (0, 1, 2))
    lower_for_cuda(grad, S((b, t, 64, 128), BF16), S((b, t, 128), BF16),
                   S((b, t, 64), jnp.float32))
    lb = LogitsBlocks()
    params = {"indexer_scores": (blk.num_warps, blk.num_stages)}
    params.update({n: (lb.num_warps, lb.num_stages) for n in (
        "indexer_logits_fwd", "indexer_logits_dqw", "indexer_logits_dk")})
  elif op == "warmup_kl":
    blk, kb, lb = FlashBlocks(), WarmupKLBlocks(), LogitsBlocks()
    grad = jax.grad(lambda *a: jnp.sum(flash_then_warmup_kl(*a)), (4, 5, 6))
    lower_for_cuda(grad, S((b, t, 128, 192), BF16), S((b, t, 128, 192), BF16),
                   S((b, t, 128, 128), BF16), S((b, t), jnp.int32),
                   S((b, t, 64, 128), BF16), S((b, t, 128), BF16),
                   S((b, t, 64), jnp.float32))
    params = {"mla_flash_fwd": (blk.num_warps, blk.num_stages)}
    params.update({n: (kb.num_warps, kb.num_stages) for n in (
        "warmup_kl", "warmup_kl_dlogits")})
    params.update({n: (lb.num_warps, lb.num_stages) for n in (
        "indexer_logits_fwd", "indexer_logits_dqw", "indexer_logits_dk")})
  else:
    blk = FlashBlocks()
    fn = lambda q, k, v, s: mla_flash(q, k, v, 0.1, s, interpret=False)
    grad = jax.grad(lambda *a: f32_sum(fn(*a)[0]), (0, 1, 2))
    lower_for_cuda(grad, S((b, t, 128, 192), BF16), S((b, t, 128, 192), BF16),
                   S((b, t, 128, 128), BF16), S((b, t), jnp.int32))
    params = {n: (blk.num_warps, blk.num_stages)
              for n in ("mla_flash_fwd", "mla_flash_dkv", "mla_flash_dq")}
  out = {}
  for asm in modules:
    name = re.search(r"module @(\w+)", asm).group(1)
    out[name] = (asm,) + params[name]
  assert set(out) == set(params)
  return out


@pytest.mark.skipif(not TRITON_PYTHON,
                    reason="set DSAX_TRITON_PYTHON to a Python with triton")
@pytest.mark.parametrize("op", ["sparse", "indexer", "dense", "warmup_kl"])
def test_fits_sm90(triton_modules, tmp_path, op):
  for name, (asm, warps, stages) in _deepseek_modules(
      op, triton_modules).items():
    path = tmp_path / f"{name}.ttir"
    path.write_text(asm)
    run = subprocess.run([TRITON_PYTHON, "-c", COMPILE, str(path), str(warps),
                          str(stages)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, (name, run.stderr[-2000:])
    info = json.loads(run.stdout.strip().splitlines()[-1])
    print(name, info)
    assert info["shared"] <= SHARED_LIMIT, (name, info)
    assert info["spills"] == 0, (name, info)
