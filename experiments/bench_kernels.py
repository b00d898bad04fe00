"""Times the Pallas kernels against their jnp references and dense attention.

  python experiments/bench_kernels.py                    # CPU, tiny, interpret
  python experiments/bench_kernels.py --gpu              # DeepSeek sizes
  python experiments/bench_kernels.py --gpu --t 16384 --k 2048 --json out.json

Ops (each kernel and its reference; forward, and forward+backward where the
op is differentiable):
  sparse   top-k sparse MLA, MQA form, rows of A = C + R, v_dim = C
  indexer  lightning-indexer scores + causal top-k (no backward)
  logits   indexer_logits (unmasked) for --logits-rows queries against all T
           keys, as one query chunk of the warm-up KL, with its custom VJP
           (its k column holds the rows)
  dense    causal dense expanded MLA (mla_flash), qk dim P = H + R, value
           dim E
  target   the DSA warm-up KL target (indexer I x J) as the model forms it:
           mla_flash (forward, for its lse), then warmup_kl on that lse
           (per query chunk the indexer logits, then the KL pass over key
           blocks); fwd+bwd differentiates the KL w.r.t. the indexer inputs
           only (the attention output is not used)
Order per T: sparse, indexer, dense, target, logits; with --budget-s the
later ones are the ones skipped.
FLOPs (DESIGN.md, per query token at context L, forward): dense
2*N*(H+R+E)*L, sparse 2*N*(C+R+C)*k, indexer 2*I*J*L; target forward = dense
+ 2*N*(H+R)*L (KL pass) + indexer, its fwd+bwd adds 2*N*(H+R)*L (dlogits) +
3 x indexer (logits recompute, two gradient matmuls); summed over the causal
sequence (L = t + 1, so dense and indexer total N*(H+R+E)*T*(T+1) and
I*J*T*(T+1)). Forward+backward counts 3.5x the forward (backward = 2.5x:
recompute + four matmuls per two of the forward); for logits (forward
2*I*J*rows*T, no causal skip) 5x (two recomputes and two gradient
matmuls). On CPU the kernels run in Pallas interpret mode: those timings
check the script, not the kernels.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsax.kernels import reference  # noqa: E402
from dsax.kernels.indexer import indexer_logits, indexer_topk  # noqa: E402
from dsax.kernels.mla_flash import mla_flash, mla_flash_reference  # noqa: E402
from dsax.kernels.sparse_mla import sparse_mla  # noqa: E402
from dsax.kernels.warmup_kl import warmup_kl, warmup_kl_reference  # noqa: E402

CPU = dict(t=[64, 128], k=[16, 32], n=4, c=32, r=16, h=16, e=16, i=2, j=16,
           batch=1, reps=2, dtype="float32", logits_rows=32)
GPU = dict(t=[4096, 16384], k=[512, 2048], n=64, c=512, r=64, h=128, e=128,
           i=64, j=128, batch=1, reps=5, dtype="bfloat16", logits_rows=1024)
OPS = ["sparse", "indexer", "logits", "dense", "target"]


def timeit(fn, args, reps):
  """(compile + first run seconds, median seconds of ``reps`` runs)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def fwd_bwd(fn, n_diff):
  """jit of the gradient of sum(o * cotangent) w.r.t. the first n_diff args."""
  def loss(*args):
    o = fn(*args)[0]
    return jnp.sum(o.astype(jnp.float32) * 1e-3)
  return jax.jit(jax.grad(loss, tuple(range(n_diff))))


def sparse_inputs(key, b, t, n, a, k, dtype):
  ks = jax.random.split(key, 3)
  q = jax.random.normal(ks[0], (b, t, n, a), dtype)
  kv = jax.random.normal(ks[1], (b, t, a), dtype)
  pos = jnp.arange(t)[None, :, None]
  idx = jnp.floor(jax.random.uniform(ks[2], (b, t, k)) * (pos + 1))
  valid = jnp.broadcast_to(jnp.arange(k)[None, None, :] <= pos, (b, t, k))
  idx = jnp.where(valid, idx, pos).astype(jnp.int32)
  return q, kv, idx, valid


def save(args, rows):
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(config={k: v for k, v in vars(args).items()
                             if k != "json"}, rows=rows), f, indent=1)


def run(args) -> list[dict]:
  dtype = jnp.dtype(args.dtype)
  interpret = jax.default_backend() == "cpu"
  key = jax.random.PRNGKey(0)
  rows = []
  start = time.perf_counter()

  def record(op, impl, pas, t, k, fn, inputs, flops):
    if (args.budget_s is not None
        and time.perf_counter() - start > args.budget_s):
      print(f"  skip {op}/{impl}/{pas} T={t} k={k}: over --budget-s")
      return
    try:
      first, sec = timeit(fn, inputs, args.reps)
    except Exception as e:  # noqa: BLE001 -- report and keep going
      print(f"  FAIL {op}/{impl}/{pas} T={t} k={k}: {type(e).__name__}: "
            f"{str(e)[:300]}")
      rows.append(dict(op=op, impl=impl, pass_=pas, t=t, k=k, error=str(e)))
      save(args, rows)
      return
    row = dict(op=op, impl=impl, pass_=pas, t=t, k=k, ms=sec * 1e3,
               first_s=first, tflops=flops / sec / 1e12)
    rows.append(row)
    save(args, rows)   # after every row: a timeout keeps what was measured
    print(f"{op:8s} {impl:9s} {pas:8s} T={t:6d} k={k:5d} {sec * 1e3:10.2f} ms"
          f" {row['tflops']:9.3g} TFLOP/s  (first call {first:.1f} s)",
          flush=True)

  b, n = args.batch, args.n
  a, v_dim = args.c + args.r, args.c
  scale = (args.h + args.r) ** -0.5
  for t in args.t:
    causal = t * (t + 1) / 2            # sum over queries of L = t + 1
    for k in args.k:
      k = min(k, t)
      if "sparse" in args.ops:
        q, kv, idx, valid = sparse_inputs(jax.random.fold_in(key, t * 7 + k),
                                          b, t, n, a, k, dtype)
        flops = b * t * 2 * n * (2 * args.c + args.r) * k
        kern = functools.partial(sparse_mla, scale=scale, v_dim=v_dim,
                                 interpret=interpret)
        ref = functools.partial(reference.sparse_mla_reference, scale=scale,
                                v_dim=v_dim, q_chunk=args.q_chunk)
        for impl, fn in (("pallas", kern), ("reference", ref)):
          record("sparse", impl, "fwd", t, k, jax.jit(fn),
                 (q, kv, idx, valid), flops)
          if args.bwd:
            record("sparse", impl, "fwd+bwd", t, k, fwd_bwd(fn, 2),
                   (q, kv, idx, valid), 3.5 * flops)
        del q, kv, idx, valid
      if "indexer" in args.ops:
        ks = jax.random.split(jax.random.fold_in(key, t * 11 + k), 3)
        iq = jax.random.normal(ks[0], (b, t, args.i, args.j), dtype)
        ik = jax.random.normal(ks[1], (b, t, args.j), dtype)
        iw = jax.random.normal(ks[2], (b, t, args.i), jnp.float32)
        flops = b * 2 * args.i * args.j * causal
        kern = functools.partial(indexer_topk, topk=k, interpret=interpret)
        ref = functools.partial(reference.indexer_topk_reference, topk=k,
                                q_chunk=args.q_chunk)
        for impl, fn in (("pallas", kern), ("reference", ref)):
          record("indexer", impl, "fwd", t, k, jax.jit(fn), (iq, ik, iw),
                 flops)
        del iq, ik, iw
    if "dense" in args.ops:
      ks = jax.random.split(jax.random.fold_in(key, t), 3)
      q = jax.random.normal(ks[0], (b, t, n, args.h + args.r), dtype)
      kk = jax.random.normal(ks[1], (b, t, n, args.h + args.r), dtype)
      v = jax.random.normal(ks[2], (b, t, n, args.e), dtype)
      flops = b * 2 * n * (args.h + args.r + args.e) * causal
      kern = functools.partial(mla_flash, scale=scale, interpret=interpret)
      ref = functools.partial(mla_flash_reference, scale=scale,
                              q_chunk=args.q_chunk)
      for impl, fn in (("pallas", kern), ("reference", ref)):
        record("dense", impl, "fwd", t, 0, jax.jit(fn), (q, kk, v), flops)
        if args.bwd:
          record("dense", impl, "fwd+bwd", t, 0, fwd_bwd(fn, 3), (q, kk, v),
                 3.5 * flops)
      del q, kk, v
    if "target" in args.ops:
      ks = jax.random.split(jax.random.fold_in(key, t * 17), 6)
      p = args.h + args.r
      q = jax.random.normal(ks[0], (b, t, n, p), dtype)
      kk = jax.random.normal(ks[1], (b, t, n, p), dtype)
      v = jax.random.normal(ks[2], (b, t, n, args.e), dtype)
      iq = jax.random.normal(ks[3], (b, t, args.i, args.j), dtype)
      ik = jax.random.normal(ks[4], (b, t, args.j), dtype)
      iw = jax.random.normal(ks[5], (b, t, args.i), jnp.float32) * 0.1
      dense = 2 * n * (p + args.e) * causal
      kl_pass, ix = 2 * n * p * causal, 2 * args.i * args.j * causal
      flops = b * (dense + kl_pass + ix)

      def pallas_kl(iq, ik, iw, q, kk, v):
        _, lse = mla_flash(q, kk, v, scale, interpret=interpret)
        return (warmup_kl(q, kk, lse, iq, ik, iw, scale, chunk=args.q_chunk,
                          interpret=interpret),)

      def reference_kl(iq, ik, iw, q, kk, v):
        _, lse = mla_flash_reference(q, kk, v, scale, q_chunk=args.q_chunk)
        return (warmup_kl_reference(q, kk, lse, iq, ik, iw, scale,
                                    q_chunk=args.q_chunk),)

      for impl, kl_fn in (("pallas", pallas_kl), ("reference", reference_kl)):
        record("target", impl, "fwd", t, 0, jax.jit(kl_fn),
               (iq, ik, iw, q, kk, v), flops)
        if args.bwd:
          record("target", impl, "fwd+bwd", t, 0, fwd_bwd(kl_fn, 3),
                 (iq, ik, iw, q, kk, v), flops + b * (kl_pass + 3 * ix))
      del q, kk, v, iq, ik, iw
    if "logits" in args.ops:
      n_rows = min(args.logits_rows, t)
      ks = jax.random.split(jax.random.fold_in(key, t * 13), 3)
      iq = jax.random.normal(ks[0], (b, n_rows, args.i, args.j), dtype)
      ik = jax.random.normal(ks[1], (b, t, args.j), dtype)
      iw = jax.random.normal(ks[2], (b, n_rows, args.i), jnp.float32)
      flops = b * 2 * args.i * args.j * n_rows * t
      kern = functools.partial(indexer_logits, interpret=interpret)
      for impl, fn in (("pallas", kern), ("reference",
                                          reference.indexer_logits)):
        wrap = lambda f: (lambda *a: (f(*a),))   # fwd_bwd reads output [0]
        record("logits", impl, "fwd", t, n_rows, jax.jit(fn), (iq, ik, iw),
               flops)
        if args.bwd:
          record("logits", impl, "fwd+bwd", t, n_rows, fwd_bwd(wrap(fn), 3),
                 (iq, ik, iw), 5 * flops)
      del iq, ik, iw
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gpu", action="store_true",
                 help="DeepSeek sizes (T 4K/16K, k 512/2048, N 64, C 512, "
                      "R 64, I 64, J 128, bf16)")
  p.add_argument("--t", type=int, nargs="+", help="sequence lengths")
  p.add_argument("--k", type=int, nargs="+", help="selected keys")
  for name in ("n", "c", "r", "h", "e", "i", "j", "batch", "reps",
               "logits_rows"):
    p.add_argument(f"--{name}", type=int)
  p.add_argument("--dtype", choices=["float32", "bfloat16"])
  p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
  p.add_argument("--no-bwd", dest="bwd", action="store_false")
  p.add_argument("--q-chunk", type=int, default=256,
                 help="query chunk of the jnp references and of the "
                      "warm-up KL kernel")
  p.add_argument("--budget-s", type=float, default=None,
                 help="skip the remaining measurements after this long")
  p.add_argument("--json", help="write the rows here")
  args = p.parse_args(argv)
  defaults = GPU if args.gpu else CPU
  for name, val in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, val)
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"dtype {args.dtype}, B={args.batch} N={args.n} C={args.c} "
        f"R={args.r} H={args.h} E={args.e} I={args.i} J={args.j}", flush=True)
  if jax.default_backend() == "cpu":
    print("CPU: Pallas kernels run in interpret mode; their times are not "
          "kernel performance.", flush=True)
  rows = run(args)
  save(args, rows)
  return rows


if __name__ == "__main__":
  main()
