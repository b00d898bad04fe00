"""One attention layer, forward + backward: dense MLA vs DSA (indexer + sparse).

  python experiments/bench_attention.py                  # T = 2K..16K, ~5 min
  python experiments/bench_attention.py --quick          # T = 1K, 2K smoke test
  python experiments/bench_attention.py --lengths 4096,8192 --reps 5

The layer is ``mla.project``, ``dsa.attend`` and the output projection on a
normalised hidden state x_BTD. Timed: jax.grad of
sum(out * ct) w.r.t. x and the layer's parameters (attention and indexer).

  dense   core = dsa.attend with a dense AttentionMode, i.e.
          mla.dense_attention: flash attention in jnp over the lower
          triangle of key blocks (kernels/causal_blocks.py, blocks of
          model.attn_q_chunk rows, default 256): n(n+1)/2 of the n^2
          [N, block, block] tiles at every length, rolled loops, memory
          O(T), a flash-attention-2 backward (custom_vjp).
  full    the reference cost of a full non-causal T x T layer: the same
          layer with every query scoring all T keys, no mask (query chunks
          of model.attn_q_chunk in a rolled lax.map with remat, the chunk
          scoring, softmax and remat of the pre-flash dense path). The
          target: dense / full <= ~0.6 at 4K and 8K (causal: about half
          the score work).
  warmup  the dense warm-up's layer: dense attention with indexer_loss
          (flash (o, lse), then the KL over the same causal blocks), the
          layer output (it feeds the next layer) and the gradient of the KL
          w.r.t. the indexer parameters only (the trunk is frozen).
  sparse  core = dsa.attend with a sparse AttentionMode (no indexer loss):
          indexer projection + causal top-k (reference,
          chunked by indexer.q_chunk), then sparse MLA in absorbed (MQA) form,
          by gathering the k selected rows per query, or, when T <=
          dsa.MASKED_RATIO * k (and <= dsa.MASKED_MAX_KEYS), as dense
          attention under the selection's [T, T] key mask (dsa.use_masked).
  gather  the sparse layer always gathering (AttentionMode.sparse_way).
  masked  the sparse layer always masked: the layer MaxText writes (a dense
          T x T score matrix under the top-k mask), the peer to beat at 1K.
  core    kernels.sparse_mla alone (fwd + bwd w.r.t. q and kv) given the
          indices the indexer chose: its time should grow ~linearly in T.
  indexer indexer_project + kernels.indexer_topk, forward only (with
          indexer_loss=False the indexer gets no gradient).

All kernels use impl="reference" (jnp; Pallas on CPU would be interpret mode).
Everything is compiled first, then repetitions run in rounds over all T and
all variants (see ``measure``); the minimum is reported (other processes
share the 2 cores: load only adds time) and every repetition is printed.
Dense, full and warmup repetitions after the first are dropped when they
would exceed --dense-budget-s: at 16K one full fwd+bwd takes minutes here.
Compile time is printed per variant (the dense one should not grow with T).

FLOPs, DESIGN.md formulas, per query at context L (forward): dense MLA
2*N*(H+R+E)*L, sparse MQA 2*N*(C+R+C)*min(k, L), indexer 2*I*J*L, summed over
the causal sequence L = 1..T. Forward + backward counts 3x the forward
(backward = 2x: the usual model-FLOPs convention; recomputation, the
diagonal tiles' masked halves and the full variant's upper triangle are not
counted, so achieved GFLOP/s is "useful" causal throughput). The indexer has
no backward here (1x). Projections (q/kv/out, absorb/expand) are linear in
T and are not in the formulas; they are in the measured layer times.

Peak memory: XLA's compiled memory analysis of each jitted fwd+bwd
(temp + argument + output bytes, minus aliased), i.e. the buffer-assignment
peak of the executable, not process RSS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsax import dsa, kernels, mla  # noqa: E402
from dsax import params as P  # noqa: E402
from dsax.attention import AttentionMode  # noqa: E402
from dsax.config import IndexerConfig, ModelConfig  # noqa: E402
from dsax.kernels import query_chunks  # noqa: E402

from bench_util import peak_mb  # noqa: E402


VARIANTS = ("dense", "full", "warmup", "sparse", "gather", "masked", "core",
            "indexer")
SLOW = ("dense", "full", "warmup")   # reps cut by --dense-budget-s


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lengths", default="2048,4096,8192,16384",
                  help="comma-separated T values")
  ap.add_argument("--quick", action="store_true", help="T = 1K, 2K")
  ap.add_argument("--k", type=int, default=256, help="selected keys")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--d", type=int, default=1024, help="model width D")
  ap.add_argument("--q", type=int, default=384, help="q-latent rank Q")
  ap.add_argument("--n", type=int, default=16, help="heads N")
  ap.add_argument("--c", type=int, default=512, help="kv-latent rank C")
  ap.add_argument("--r", type=int, default=64, help="rope dim R")
  ap.add_argument("--h", type=int, default=128, help="qk nope head dim H")
  ap.add_argument("--e", type=int, default=128, help="value head dim E")
  ap.add_argument("--i", type=int, default=8, help="indexer heads I")
  ap.add_argument("--j", type=int, default=64, help="indexer head dim J")
  ap.add_argument("--ri", type=int, default=32, help="indexer rope dim")
  ap.add_argument("--dense-chunk", type=int, default=256,
                  help="model.attn_q_chunk of the dense path")
  ap.add_argument("--sparse-chunk", type=int, default=16,
                  help="indexer.q_chunk (top-k and sparse MLA chunks)")
  ap.add_argument("--reps", type=int, default=3,
                  help="interleaved repetitions per T (min)")
  ap.add_argument("--dense-budget-s", type=float, default=60.0,
                  help="dense, full and warmup reps (>= 1 each) per T: "
                       "as many as fit this")
  ap.add_argument("--budget-s", type=float, default=60.0,
                  help="extra rounds of the sparse variants per T (total "
                       ">= 2 reps): as many as fit this")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--variants", default=",".join(VARIANTS),
                  help="subset of " + ",".join(VARIANTS) + " to time")
  args = ap.parse_args(argv)
  args.variants = [v for v in args.variants.split(",") if v]
  args.lengths = ([1024, 2048] if args.quick
                  else [int(x) for x in args.lengths.split(",") if x])
  return args


def layer_config(args) -> ModelConfig:
  return ModelConfig(
      vocab_size=256, d_model=args.d, n_layers=1, n_heads=args.n,
      q_lora_rank=args.q, kv_lora_rank=args.c, qk_nope_head_dim=args.h,
      qk_rope_head_dim=args.r, v_head_dim=args.e, d_ff=4 * args.d,
      param_dtype=args.dtype, compute_dtype=args.dtype,
      attn_q_chunk=args.dense_chunk,
      indexer=IndexerConfig(n_heads=args.i, head_dim=args.j, rope_dim=args.ri,
                            topk=args.k, q_chunk=args.sparse_chunk))


def layer_params(cfg: ModelConfig, key) -> dict:
  """The attention and indexer parameters of one layer (L axis dropped)."""
  layers = P.init_params(cfg, key)["layers"]
  return {name: jax.tree.map(lambda x: x[0], layers[name])
          for name in ("attn", "indexer")}


def flops(args, t: int) -> dict[str, float]:
  """Forward FLOPs of the causal sequence by the DESIGN.md formulas."""
  causal = t * (t + 1) / 2                            # sum of L = 1..T
  sel = sum(min(args.k, L) for L in range(1, t + 1))  # sum of min(k, L)
  return dict(
      dense=2 * args.n * (args.h + args.r + args.e) * causal * args.batch,
      sparse=2 * args.n * (2 * args.c + args.r) * sel * args.batch,
      indexer=2 * args.i * args.j * causal * args.batch)


def full_attention(p, proj, cfg: ModelConfig):
  """Non-causal MLA over all T keys (no mask): query chunks of
  cfg.attn_q_chunk in a rolled lax.map with remat, each a [N, chunk, T]
  slab (the pre-flash dense path's chunk without its mask)."""
  cdt = jnp.dtype(cfg.compute_dtype)
  kv_BSC, k_rope_BSR = proj.rows
  k_nope_BSNH, v_BSNE = mla.expanded_keys(p, kv_BSC, cfg)
  k_rope_BSR = k_rope_BSR.astype(cdt)
  scale = mla.softmax_scale(cfg)

  def chunk_fn(start, q_nope_BTNH, q_rope_BTNR):
    del start
    s_BNTS = (jnp.einsum("btnh,bsnh->bnts", q_nope_BTNH, k_nope_BSNH,
                         preferred_element_type=jnp.float32)
              + jnp.einsum("btnr,bsr->bnts", q_rope_BTNR, k_rope_BSR,
                           preferred_element_type=jnp.float32)) * scale
    prob_BNTS = jax.nn.softmax(s_BNTS, axis=-1)
    return jnp.einsum("bnts,bsne->btne", prob_BNTS.astype(cdt), v_BSNE)

  return query_chunks.map_query_chunks(chunk_fn, cfg.attn_q_chunk,
                                       proj.q.astype(cdt),
                                       proj.q_rope.astype(cdt))


def build(args, t: int, key):
  """The jitted functions at length t and their inputs, with each one's
  compile time: {variant: (compiled, inputs, compile_s)}."""
  cfg = layer_config(args)
  b = args.batch
  dtype = jnp.dtype(args.dtype)
  kp, kx, kc, kq = jax.random.split(key, 4)
  p = layer_params(cfg, kp)
  x = jax.random.normal(kx, (b, t, args.d), dtype)
  ct = jax.random.normal(kc, (b, t, args.d), dtype) * 1e-3
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  ang = mla.angles(positions, cfg)
  ang_i = dsa.indexer_angles(positions, cfg)

  def layer_out(p, x, attention, way="auto"):
    mode = AttentionMode.of(cfg, attention, impl="reference", sparse_way=way)
    proj = mla.project(p["attn"], x, ang, cfg)
    o, _ = dsa.attend(p, x, proj, mode, cfg, None, ang_i)
    return mla.output_projection(o, p["attn"]["wo"])

  def dense_loss(p, x, ct):
    return jnp.sum(layer_out(p, x, "dense").astype(jnp.float32) * ct)

  def sparse_loss(p, x, ct):
    return jnp.sum(layer_out(p, x, "sparse").astype(jnp.float32) * ct)

  def forced(masked: bool):
    """sparse_loss with AttentionMode.sparse_way forced."""
    way = "masked" if masked else "gather"
    return lambda p, x, ct: jnp.sum(
        layer_out(p, x, "sparse", way).astype(jnp.float32) * ct)

  def warmup_step(p, x, ct):
    def kl(p_indexer):
      mode = AttentionMode.of(cfg, "dense", indexer_loss=True,
                              impl="reference")
      proj = mla.project(p["attn"], x, ang, cfg)
      o, aux = dsa.attend(dict(p, indexer=p_indexer), x, proj, mode, cfg,
                          None, ang_i)
      return aux.indexer_kl, o

    g, o = jax.grad(kl, has_aux=True)(p["indexer"])
    out = mla.output_projection(o, p["attn"]["wo"]).astype(jnp.float32)
    return g, jnp.sum(out * ct)

  def full_loss(p, x, ct):
    proj = mla.project(p["attn"], x, ang, cfg)
    o = mla.output_projection(full_attention(p["attn"], proj, cfg),
                              p["attn"]["wo"])
    return jnp.sum(o.astype(jnp.float32) * ct)

  # Inputs of the core and the indexer, as the sparse layer forms them.
  scale = mla.softmax_scale(cfg)

  @jax.jit
  def core_inputs(p, x):
    proj = mla.project(p["attn"], x, ang, cfg)
    q_full, kv_full = mla.absorbed_inputs(p["attn"], proj, proj.rows, cfg)
    return q_full, kv_full, proj.cq

  def indexer(pi, x, cq):
    iq, ik, iw = dsa.indexer_project(pi, x, cq, ang_i, cfg)
    return kernels.indexer_topk(iq, ik, iw, args.k, None,
                                q_chunk=cfg.indexer.q_chunk, impl="reference")

  def core_loss(q_full, kv_full, idx, valid, ct_o):
    o, _ = kernels.sparse_mla(q_full, kv_full, idx, valid, scale, args.c,
                              q_chunk=cfg.indexer.q_chunk, impl="reference")
    return jnp.sum(o.astype(jnp.float32) * ct_o)

  q_full, kv_full, cq = core_inputs(p, x)
  t0 = time.perf_counter()
  idx_fn = jax.jit(indexer).lower(p["indexer"], x, cq).compile()
  compiled = {"indexer": (idx_fn, (p["indexer"], x, cq),
                          time.perf_counter() - t0)}
  idx, valid = idx_fn(p["indexer"], x, cq)
  ct_o = jax.random.normal(kq, q_full.shape[:3] + (args.c,), dtype) * 1e-3
  fns = {
      "dense": (jax.jit(jax.grad(dense_loss, (0, 1))), (p, x, ct)),
      "full": (jax.jit(jax.grad(full_loss, (0, 1))), (p, x, ct)),
      "warmup": (jax.jit(warmup_step), (p, x, ct)),
      "sparse": (jax.jit(jax.grad(sparse_loss, (0, 1))), (p, x, ct)),
      "gather": (jax.jit(jax.grad(forced(False), (0, 1))), (p, x, ct)),
      "masked": (jax.jit(jax.grad(forced(True), (0, 1))), (p, x, ct)),
      "core": (jax.jit(jax.grad(core_loss, (0, 1))),
               (q_full, kv_full, idx, valid, ct_o)),
  }
  for name, (fn, inputs) in fns.items():
    if name in args.variants:
      t0 = time.perf_counter()
      compiled[name] = (fn.lower(*inputs).compile(), inputs,
                        time.perf_counter() - t0)
  return compiled


def run_once(fn, inputs) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*inputs))
  return time.perf_counter() - t0


def measure(args) -> list[dict]:
  """Compiles every (T, variant) first, then runs rounds over all of them.

  Round r runs, for each T in turn, each variant in VARIANTS' order: the
  variants of one T are interleaved, and each T's repetitions are spread over
  the whole run, so a background load that comes and goes (other processes
  share the 2 cores) biases neither a ratio nor the slope over T. Every call
  of an ahead-of-time compiled executable is a measurement; the min over reps
  is reported. After round 0 each T's reps are cut to fit the budgets: dense
  full and warmup >= 1 rep each (--dense-budget-s), the others >= 2
  (--budget-s).
  """
  compiled, compile_s = {}, {}
  for t in args.lengths:
    t0 = time.perf_counter()
    compiled[t] = build(args, t, jax.random.PRNGKey(t))
    compile_s[t] = time.perf_counter() - t0
    print(f"  compiled T={t} in {compile_s[t]:.1f} s", flush=True)
  names = [n for n in VARIANTS if n in args.variants]
  times = {t: {n: [] for n in VARIANTS} for t in args.lengths}
  reps = {(t, n): args.reps for t in args.lengths for n in names}
  start = time.perf_counter()
  for r in range(args.reps):
    for t in args.lengths:
      for n in names:
        if r < reps[(t, n)]:
          times[t][n].append(run_once(*compiled[t][n][:2]))
      if r == 0:
        tt = times[t]
        for n in SLOW:
          if tt[n]:
            reps[(t, n)] = max(1, min(args.reps, int(
                args.dense_budget_s // tt[n][0])))
        other0 = sum(tt[n][0] for n in names if n not in SLOW)
        for n in names:
          if n not in SLOW:
            reps[(t, n)] = min(args.reps, max(2, 1 + int(
                args.budget_s // max(other0, 1e-9))))
    print(f"  round {r} done, elapsed {time.perf_counter() - start:.0f} s",
          flush=True)
  rows = []
  for t in args.lengths:
    row = dict(t=t, compile_s=compile_s[t])
    for n in VARIANTS:
      tn = times[t][n]
      row[f"{n}_ms"] = min(tn) * 1e3 if tn else float("nan")
      row[f"{n}_all_ms"] = [round(x * 1e3, 1) for x in tn]
      row[f"{n}_mb"] = (peak_mb(compiled[t][n][0]) if n in compiled[t]
                        else float("nan"))
      row[f"{n}_compile_s"] = (compiled[t][n][2] if n in compiled[t]
                               else float("nan"))
    f = flops(args, t)
    row["gf_dense"] = 3 * f["dense"] / 1e9
    row["gf_core"] = 3 * f["sparse"] / 1e9
    row["gf_indexer"] = f["indexer"] / 1e9
    row["gf_sparse"] = row["gf_core"] + row["gf_indexer"]
    for n, g in (("dense", "gf_dense"), ("full", "gf_dense"),
                 ("sparse", "gf_sparse"),
                 ("core", "gf_core"), ("indexer", "gf_indexer")):
      row[f"{n}_gflops"] = row[g] / (row[f"{n}_ms"] / 1e3)
    rows.append(row)
  return rows


def slope(ts, ys) -> float:
  if len(ts) < 2:
    return float("nan")
  return float(np.polyfit(np.log(ts), np.log(ys), 1)[0])


def main(argv=None):
  args = parse_args(argv)
  print(f"jax {jax.__version__} on {jax.default_backend()} "
        f"({os.cpu_count()} cpus); B={args.batch} D={args.d} Q={args.q} "
        f"N={args.n} C={args.c} R={args.r} H={args.h} E={args.e} I={args.i} "
        f"J={args.j} k={args.k} dtype={args.dtype}; dense chunk "
        f"{args.dense_chunk}, sparse/indexer chunk {args.sparse_chunk}; "
        f"min of up to {args.reps} reps, rounds interleaved over T and "
        "variants")
  print("peak MB = XLA compiled memory analysis (temp + args + outputs - "
        "aliased) of the jitted fwd+bwd; GFLOP = DESIGN.md formulas, "
        "fwd+bwd = 3x fwd, indexer fwd only")
  hdr = (f"{'T':>6} {'dense_ms':>9} {'full_ms':>9} {'dns/full':>8} "
         f"{'warmup_ms':>9} {'wup/dns':>7} "
         f"{'sparse_ms':>9} {'core_ms':>8} {'idx_ms':>8} {'dense_MB':>8} "
         f"{'full_MB':>8} {'sparse_MB':>9} {'core_MB':>8} {'GF_dense':>8} "
         f"{'GF_sp':>7} {'GF_core':>7} {'GF_idx':>7} {'dense':>6} "
         f"{'full':>6} {'sparse':>6} {'core':>6} {'idx':>6}  (GFLOP/s)")
  t_start = time.perf_counter()
  rows = measure(args)
  print(hdr, flush=True)
  for r in rows:
    t = r["t"]
    print(f"{t:6d} {r['dense_ms']:9.1f} {r['full_ms']:9.1f} "
          f"{r['dense_ms'] / r['full_ms']:8.3f} {r['warmup_ms']:9.1f} "
          f"{r['warmup_ms'] / r['dense_ms']:7.3f} "
          f"{r['sparse_ms']:9.1f} {r['core_ms']:8.1f} {r['indexer_ms']:8.1f} "
          f"{r['dense_mb']:8.1f} {r['full_mb']:8.1f} {r['sparse_mb']:9.1f} "
          f"{r['core_mb']:8.1f} {r['gf_dense']:8.1f} {r['gf_sparse']:7.1f} "
          f"{r['gf_core']:7.1f} {r['gf_indexer']:7.1f} "
          f"{r['dense_gflops']:6.1f} {r['full_gflops']:6.1f} "
          f"{r['sparse_gflops']:6.1f} {r['core_gflops']:6.1f} "
          f"{r['indexer_gflops']:6.1f}")
  for r in rows:
    n = -(-r["t"] // args.dense_chunk)
    print(f"T={r['t']} dense: {n} blocks of {min(args.dense_chunk, r['t'])}, "
          f"{n * (n + 1) // 2} of {n * n} tiles scored; full: all {n * n}")
    print(f"T={r['t']} reps ms: dense {r['dense_all_ms']} full "
          f"{r['full_all_ms']} warmup {r['warmup_all_ms']} sparse {r['sparse_all_ms']} core "
          f"{r['core_all_ms']} indexer {r['indexer_all_ms']}; sparse - core "
          f"- indexer (projections, absorb/expand) "
          f"{r['sparse_ms'] - r['core_ms'] - r['indexer_ms']:.0f} ms")
    way = ("masked" if dsa.use_masked(AttentionMode(kind="sparse",
                                                    topk=args.k), r["t"])
           else "gather")
    print(f"T={r['t']} sparse layer ({way}) {r['sparse_ms']:.0f} ms, gather {r['gather_ms']:.0f} ms, masked "
          f"(dense-mask layer) {r['masked_ms']:.0f} ms ({r['masked_mb']:.0f}"
          f" MB): sparse/masked {r['sparse_ms'] / r['masked_ms']:.3f}")
    print(f"T={r['t']} compile s: " + " ".join(
        f"{n} {r[f'{n}_compile_s']:.1f}" for n in VARIANTS
        if r[f"{n}_compile_s"] == r[f"{n}_compile_s"])
        + f" (all, with inputs: {r['compile_s']:.1f})")
  print(f"wall {time.perf_counter() - t_start:.0f} s")
  last = rows[-1]
  half = [r for r in rows if r["t"] * 2 == last["t"]]
  mem_growth = (last["sparse_mb"] / half[0]["sparse_mb"] if half
                else float("nan"))
  ts = [r["t"] for r in rows]
  print(f"sparse-core slope {slope(ts, [r['core_ms'] for r in rows]):.3f}, "
        f"indexer slope {slope(ts, [r['indexer_ms'] for r in rows]):.3f}, "
        f"dense slope {slope(ts, [r['dense_ms'] for r in rows]):.3f}, "
        f"sparse-layer slope {slope(ts, [r['sparse_ms'] for r in rows]):.3f}"
        f"; indexer share of the sparse layer at T={last['t']}: "
        f"{last['indexer_ms'] / last['sparse_ms']:.2f}")
  print(f"summary: time_ratio={last['sparse_ms'] / last['dense_ms']:.3f} "
        f"mem_growth={mem_growth:.3f} "
        f"slope={slope(ts, [r['core_ms'] for r in rows]):.3f} "
        f"dense_over_full={last['dense_ms'] / last['full_ms']:.3f}")


if __name__ == "__main__":
  main()
