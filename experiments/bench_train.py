"""Tokens/s and model FLOP utilisation of the pretrain, warm-up and sparse
train steps at a config's shapes.

  python experiments/bench_train.py                       # configs/main.py
  python experiments/bench_train.py --batch-size 2 --seq-len 2048
  python experiments/bench_train.py --config main:full --set model.remat=true
  python experiments/bench_train.py --config experiments/smollm2_dsa.py:cpu \\
      --seq-len 2048 --set model.indexer.topk=128 \\
      --set phases.original.init_from=           # SmolLM2 shape, no files
  python experiments/bench_train.py --reps 0 --compile-cache /tmp/jaxcache

The config is any that launch.py accepts (``sweep.load_config``: configs/
NAME[:ARG] or PATH.py[:ARG]) with dotted ``--set`` overrides. Each phase kind
(the first phase of that kind) gets the step the trainer builds:
``train.make_train_step`` with the trainer's partitioning (``labels_for``)
and optimizer (``train.optimizer``), state donated. Inputs are random
tokens, one document per row.

Timing: one compiling call per phase (``lower`` then ``compile``, timed
apart from the first step; ``--reps 0`` stops there), then repetitions
interleaved (pretrain, warmup, sparse, matmul, pretrain, ...); each times
``--steps`` consecutive steps and blocks at the end, as the trainer's loop
reads metrics a step late. Reported: the median step time (and the min),
tokens/s = B T / step time, the step-time ratios.

Machine rate: a jitted f32 [n x n] @ [n x n] (``--matmul-n``, 2 n^3 FLOPs),
best of 5 before the phases and best of 3 in every repetition round; the
best of all is the rate R (per-round rates are printed: a loaded machine
shows there). A phase's utilisation is F / (step time * R).

Model FLOPs F of one step (B rows of T tokens, one document each, L layers;
sums over the causal sequence: S1 = sum_{l=1..T} l, Sk = sum_{l=1..T}
min(k, l)); per (query, key) pair forward FLOPs, DESIGN.md's: dense MLA
a_d = 2 N (H+R+E), sparse MLA a_s = 2 N (C+R+C); GQA a_d = a_s = 2 N (2 H);
indexer a_i = 2 I J:
  pretrain  6 P T B + 3 a_d S1 B L
  warmup    2 P' T B + a_d S1 B L + 4 P_I T B + 3 a_i S1 B L
            (what the step does: the frozen trunk's forward without the
            head (no LM loss), the dense attention's forward, the indexer's
            projections forward + weight gradients (inputs detached), its
            logits over every causal key forward + backward; the KL
            pass's second scoring of the attention and its indexer-only
            lse pass, causal_blocks.warmup_kl_mean, are not counted)
  sparse    6 P T B + 3 a_s Sk B L + 4 P_I T B + a_i S1 B L
            + (3 a_i + a_t) Sk B L
            (the indexer's logits over every causal key for the top-k,
            forward only; the KL on the selected set: the indexer logits
            forward + backward and the detached target scores, a_t =
            2 N (C+R) for MLA, 2 N H for GQA)
P = the matrices a token multiplies: attention and MLP (MoE: the routed
experts times n_activated / n_routed), norms, and the output head (the
embedding when tied; an untied embedding is a lookup); P' = P without the
head; P_I = the indexer's. Backward = 2 x forward (3 x in all, remat not
counted). The attention terms are bench_attention.py's.

``--breakdown`` also times each phase's forward alone (the loss value,
jitted) and the head alone (final norm + the trainer's chunked LM loss,
forward), so a step splits
into forward and backward + update, and the warm-up's forward into the
trunk's and the probe's (warm-up fwd - (pretrain fwd - head fwd)); and the
pretrain step's parts, forward + backward each, timed alone (``part_fns``):
one layer (and its attention sublayer), the head, the optimizer update.

``--compile-cache DIR`` runs under JAX's persistent compilation cache in
DIR (``checkpoint.compilation_cache``, as a run does in <workdir>/cache/jax): a
second invocation with the same DIR and shapes shows the cached compile.

Ends with one line:
  summary: pretrain_util=<F/(t R)> warmup_over_pretrain=<t_w/t_p>
  sparse_util=<F/(t R)> compile_s=<max over phases of lower + compile>
(nan for what was not measured).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsax import config as C  # noqa: E402
from dsax import model  # noqa: E402
from dsax import params as P  # noqa: E402
from dsax import checkpoint, lm_loss, sweep, train  # noqa: E402

KINDS = ("pretrain", "warmup", "sparse")
CACHE_HITS = [0]  # persistent compilation cache hits so far


def _count_hits(event: str, **kwargs) -> None:
  del kwargs
  if event == "/jax/compilation_cache/cache_hits":
    CACHE_HITS[0] += 1


jax.monitoring.register_event_listener(_count_hits)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="main",
                  help="NAME[:ARG] in configs/, or PATH.py[:ARG]")
  ap.add_argument("--batch-size", type=int, default=None,
                  help="override data.batch_size")
  ap.add_argument("--seq-len", type=int, default=None,
                  help="override data.seq_len")
  ap.add_argument("--set", action="append", default=[],
                  help="dotted override key=value (repeatable)")
  ap.add_argument("--reps", type=int, default=5,
                  help="interleaved repetitions per phase (0: compile only)")
  ap.add_argument("--steps", type=int, default=3,
                  help="consecutive steps per repetition")
  ap.add_argument("--matmul-n", type=int, default=2048,
                  help="size n of the f32 [n x n] @ [n x n] rate")
  ap.add_argument("--breakdown", action="store_true",
                  help="also time each phase's forward and the head alone")
  ap.add_argument("--compile-cache", metavar="DIR", default=None,
                  help="JAX's persistent compilation cache in DIR")
  return ap.parse_args(argv)


def load(args) -> C.ExperimentConfig:
  cfg = sweep.load_config(args.config)  # configs/NAME[:ARG] or PATH.py[:ARG]
  overrides = dict(s.split("=", 1) for s in args.set)
  if args.batch_size is not None:
    overrides["data.batch_size"] = args.batch_size
  if args.seq_len is not None:
    overrides["data.seq_len"] = args.seq_len
  return C.override(cfg, overrides)


def random_batch(cfg: C.ExperimentConfig, seed: int = 0) -> dict:
  b, t = cfg.data.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
  batch = {
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "segment_ids": np.ones((b, t), np.int32),
      "positions": np.broadcast_to(np.arange(t, dtype=np.int32),
                                   (b, t)).copy(),
      "weights": np.ones((b, t), np.float32)}
  return {k: jnp.asarray(v) for k, v in batch.items()}


# ------------------------------------------------------------------ FLOPs


def param_groups(m: C.ModelConfig) -> dict[str, float]:
  """Parameters by what multiplies them (see the docstring's P, P_I):
  trunk, head, indexer."""
  out = {"trunk": 0.0, "head": 0.0, "indexer": 0.0}
  for path, v in train.flatten(P.abstract_params(m)).items():
    n = float(np.prod(v.shape))
    parts = path.split("/")
    if "indexer" in parts:
      out["indexer"] += n
    elif path == "head" or (path == "embed" and m.tie_embeddings):
      out["head"] += n
    elif path == "embed":  # an untied embedding is a lookup
      continue
    elif parts[0] == "moe" and parts[1] in ("w_gate", "w_up", "w_down"):
      out["trunk"] += n * m.moe.n_activated / m.moe.n_routed_experts
    else:
      out["trunk"] += n
  return out


def pair_flops(m: C.ModelConfig) -> dict[str, float]:
  """Forward FLOPs per (query, key) pair and layer: dense attention a_d,
  sparse a_s, the sparse KL's target scores a_t, the indexer a_i."""
  n, ix = m.n_heads, m.indexer
  out = {"indexer": 2.0 * ix.n_heads * ix.head_dim}
  if m.attention_type == "gqa":
    h = m.head_dim
    return {**out, "dense": 2.0 * n * 2 * h, "sparse": 2.0 * n * 2 * h,
            "target": 2.0 * n * h}
  h, r, e, c = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim,
                m.kv_lora_rank)
  return {**out, "dense": 2.0 * n * (h + r + e),
          "sparse": 2.0 * n * (2 * c + r), "target": 2.0 * n * (c + r)}


def step_flops(cfg: C.ExperimentConfig, kind: str,
               topk: int) -> dict[str, float]:
  """Model FLOPs of one step of a phase kind, by the docstring's rule:
  {"matmul": the parameter terms, "attention", "indexer"}."""
  m = cfg.model
  b, t, layers = cfg.data.batch_size, cfg.data.seq_len, m.n_layers
  kk = min(topk, t)
  s1 = t * (t + 1) / 2
  sk = kk * (kk + 1) / 2 + (t - kk) * kk
  pg, a = param_groups(m), pair_flops(m)
  tok, rows = b * t, b * layers
  if kind == "pretrain":
    return {"matmul": 6 * (pg["trunk"] + pg["head"]) * tok,
            "attention": 3 * a["dense"] * s1 * rows, "indexer": 0.0}
  if kind == "warmup":
    return {"matmul": 2 * pg["trunk"] * tok,
            "attention": a["dense"] * s1 * rows,
            "indexer": 4 * pg["indexer"] * tok + 3 * a["indexer"] * s1 * rows}
  return {"matmul": 6 * (pg["trunk"] + pg["head"]) * tok,
          "attention": 3 * a["sparse"] * sk * rows,
          "indexer": (4 * pg["indexer"] * tok + a["indexer"] * s1 * rows
                      + (3 * a["indexer"] + a["target"]) * sk * rows)}


# ----------------------------------------------------------------- timing


def matmul_timer(n: int):
  """A function timing one jitted f32 [n x n] @ [n x n] (compiled here);
  returns seconds."""
  ka, kb = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.normal(ka, (n, n), jnp.float32)
  y = jax.random.normal(kb, (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(x, y).block_until_ready()

  def once() -> float:
    t0 = time.perf_counter()
    f(x, y).block_until_ready()
    return time.perf_counter() - t0
  return once


def phase_step(cfg, phase, params):
  """(step_fn, state, frozen, labels) as ``train.run_phase`` builds them."""
  flat = train.flatten(params)
  labels = train.labels_for(phase, list(flat))
  trainable = {k: jnp.array(v) for k, v in flat.items() if k in labels}
  frozen = {k: v for k, v in flat.items() if k not in labels}
  tx, sched = train.optimizer(phase, labels)
  state = {"trainable": trainable, "opt": tx.init(trainable),
           "step": jnp.int32(0)}
  return train.make_train_step(cfg, phase, tx, sched), state, frozen, labels


def compile_timed(jitted, *args):
  """(compiled, trace + lower seconds, compile seconds)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def head_loss(params, x_BTD, batch, m: C.ModelConfig):
  """The output head alone, as the trainer runs it: the final norm and the
  chunked LM loss (``dsax.lm_loss``, no [B, T, V] logits)."""
  return lm_loss.loss(params, model.final_hidden(params, x_BTD, m),
                      batch["targets"], batch["weights"], m)


def head_fn(cfg: C.ExperimentConfig):
  return jax.jit(lambda params, x_BTD, batch: head_loss(params, x_BTD, batch,
                                                        cfg.model))


def part_fns(cfg: C.ExperimentConfig, params, batch) -> dict:
  """The pretrain step's parts, forward + backward each, jitted with their
  arguments: one layer (its first segment's first: attention sublayer,
  output projection, feed-forward), that layer's attention alone (norm,
  projections, dense core), the head (final norm + the trainer's chunked
  LM loss, ``dsax.lm_loss``) and the update
  of the pretrain phase's optimizer on every parameter."""
  from dsax import dsa  # pylint: disable=import-outside-toplevel
  from dsax.attention import AttentionMode  # pylint: disable=import-outside-toplevel
  m = cfg.model
  seg = model.layer_segments(params, m)[0]
  p = jax.tree.map(lambda a: a[0], seg)
  fam, mode = dsa.family(m), AttentionMode.of(m)
  ang = fam.angles(model.default_positions(batch["inputs"]), m)
  dtype = jnp.dtype(m.compute_dtype)
  x = jax.random.normal(jax.random.PRNGKey(3), batch["inputs"].shape
                        + (m.d_model,), jnp.float32).astype(dtype)

  def attention(p, x):
    h = model.attention_input(p, x, m)
    o, _ = dsa.attend(p, h, fam.project(p["attn"], h, ang, m), mode, m)
    return o

  def layer(p, x):
    return model.finish_layer(p, x, attention(p, x), m)[0]

  def grad_of(f):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(
        f(p, x).astype(jnp.float32) ** 2), (0, 1)))

  def head(params, x):
    return head_loss(params, x, batch, m)

  phase = next(ph for ph in cfg.phases if ph.kind == "pretrain")
  flat = train.flatten(params)
  tx, _ = train.optimizer(phase, train.labels_for(phase, list(flat)))
  grads = jax.tree.map(jnp.ones_like, flat)

  def update(flat, opt, grads):
    upd, opt = tx.update(grads, opt, flat)
    return optax.apply_updates(flat, upd), opt

  return {"layer f+b": (grad_of(layer), (p, x)),
          "attn f+b": (grad_of(attention), (p, x)),
          "head f+b": (jax.jit(jax.grad(head, (0, 1))), (params, x)),
          "update": (jax.jit(update), (flat, tx.init(flat), grads))}


def fmt(x: float, digits: int = 3) -> str:
  return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def main(argv=None):
  args = parse_args(argv)
  cfg = load(args)
  cache = (checkpoint.compilation_cache(args.compile_cache) if args.compile_cache
           else contextlib.nullcontext())
  with cache:
    bench(args, cfg)


def bench(args, cfg: C.ExperimentConfig) -> None:
  m = cfg.model
  phases = {}
  for kind in KINDS:
    found = [p for p in cfg.phases if p.kind == kind]
    if found:
      phases[kind] = found[0]
  tokens = cfg.data.batch_size * cfg.data.seq_len
  pg = param_groups(m)
  print(f"jax {jax.__version__} on {jax.default_backend()} "
        f"({os.cpu_count()} cpus); config {args.config} ({cfg.name}, "
        f"{m.attention_type}): batch {cfg.data.batch_size} x seq_len "
        f"{cfg.data.seq_len} = {tokens} tokens/step; D={m.d_model} "
        f"L={m.n_layers} N={m.n_heads} F={m.d_ff} remat={m.remat} "
        f"attn_q_chunk={m.attn_q_chunk}; indexer I={m.indexer.n_heads} J="
        f"{m.indexer.head_dim} q_chunk={m.indexer.q_chunk}; "
        f"{P.param_count(m)} params (P: trunk {pg['trunk']:.0f} + head "
        f"{pg['head']:.0f}, P_I {pg['indexer']:.0f})"
        + (f"; compile cache {args.compile_cache}" if args.compile_cache
           else ""), flush=True)
  mm = matmul_timer(args.matmul_n)
  mm_flops = 2.0 * args.matmul_n ** 3
  mm_first = min(mm() for _ in range(5))
  print(f"matmul f32 [{args.matmul_n}x{args.matmul_n}] @ [{args.matmul_n}x"
        f"{args.matmul_n}]: {mm_flops / mm_first / 1e9:.1f} GFLOP/s (best "
        "of 5)", flush=True)

  params = P.init_params(m, jax.random.PRNGKey(cfg.seed))
  batch = random_batch(cfg)
  runs, states, frozens, flops, compile_s, meshes = {}, {}, {}, {}, {}, {}
  for kind, phase in phases.items():
    step, states[kind], frozens[kind], labels = phase_step(cfg, phase, params)
    meshes[kind] = step.mesh
    mode = train.phase_mode(cfg, phase)
    flops[kind] = step_flops(cfg, kind, mode.topk)
    n_train = sum(int(np.prod(v.shape)) for k, v in
                  train.flatten(params).items() if k in labels)
    hits = CACHE_HITS[0]
    with jax.set_mesh(step.mesh):
      compiled, lower_s, comp_s = compile_timed(
          step.jitted, states[kind], frozens[kind], batch)
    compile_s[kind] = lower_s + comp_s
    line = (f"  {kind:8s} phase {phase.name!r}: {n_train} trainable params "
            f"in groups {sorted(set(labels.values()))}, attention "
            f"{mode.kind}" + (f" top-{mode.topk}" if mode.sparse else "")
            + f"; {sum(flops[kind].values()) / 1e9:.1f} GFLOP/step ("
            + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops[kind].items())
            + f"); trace+lower {lower_s:.1f} s, compile {comp_s:.1f} s"
            + (" (cache hit)" if CACHE_HITS[0] > hits else ""))
    if not args.reps:  # compile only
      print(line, flush=True)
      continue
    t0 = time.perf_counter()
    runs[kind] = compiled  # later calls skip jit's dispatch and cache
    states[kind], out = compiled(states[kind], frozens[kind], batch)
    jax.block_until_ready((states[kind], out))
    print(line + f", first step {time.perf_counter() - t0:.1f} s, loss "
          f"{float(out['loss']):.4f}", flush=True)

  fwds = {}
  if args.breakdown and args.reps:
    for kind, phase in phases.items():
      fwd = jax.jit(lambda tr, fr, b, f=train.make_loss_fn(cfg, phase):
                    f(tr, fr, b)[0])
      # A copy: the steps donate (delete) the state's own buffers.
      trainable = jax.tree.map(jnp.copy, states[kind]["trainable"])
      with jax.set_mesh(meshes[kind]):
        compiled = compile_timed(fwd, trainable, frozens[kind], batch)[0]
      fwds[f"{kind} fwd"] = (compiled, (trainable, frozens[kind], batch))
    x_BTD = jax.random.normal(jax.random.PRNGKey(2), (
        cfg.data.batch_size, cfg.data.seq_len, m.d_model), jnp.float32)
    x_BTD = x_BTD.astype(jnp.dtype(m.compute_dtype))
    fwds["head fwd"] = (head_fn(cfg).lower(params, x_BTD, batch).compile(),
                        (params, x_BTD, batch))
    if "pretrain" in phases:
      for name, (fn, fargs) in part_fns(cfg, params, batch).items():
        fwds[name] = (fn.lower(*fargs).compile(), fargs)

  if args.reps:
    times, mm_rates = time_rounds(args, runs, states, frozens, batch, fwds,
                                  mm)
  else:
    times, mm_rates = {}, []
  rate = max([mm_flops / mm_first] + [mm_flops / s for s in mm_rates])
  report(args, phases, times, mm_rates, mm_flops, rate, flops, tokens,
         compile_s, fwds, m.n_layers)


def time_rounds(args, runs, states, frozens, batch, fwds, mm):
  """Interleaved repetitions: {name: [seconds per step]}, [matmul s]."""
  times = {k: [] for k in list(runs) + list(fwds)}
  mm_times = []
  for _ in range(args.reps):
    for kind, compiled in runs.items():
      t0 = time.perf_counter()
      for _ in range(args.steps):
        states[kind], out = compiled(states[kind], frozens[kind], batch)
      jax.block_until_ready((states[kind], out))
      times[kind].append((time.perf_counter() - t0) / args.steps)
    for name, (compiled, fargs) in fwds.items():
      t0 = time.perf_counter()
      for _ in range(args.steps):
        out = compiled(*fargs)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / args.steps)
    mm_times.append(min(mm() for _ in range(3)))
  return times, mm_times


def report(args, phases, times, mm_times, mm_flops, rate, flops, tokens,
           compile_s, fwds, n_layers):
  """The table, the ratios and the summary line."""
  med = {k: statistics.median(v) for k, v in times.items() if v}
  util = {}
  if med:
    print(f"matmul per round (best of 3): "
          f"{[round(mm_flops / s / 1e9, 1) for s in mm_times]} GFLOP/s; "
          f"R = {rate / 1e9:.1f} GFLOP/s (best of all)")
    print(f"{'phase':13s} {'step_ms':>9s} {'min_ms':>9s} {'tokens/s':>9s} "
          f"{'GFLOP/s':>8s} {'util':>6s}  per-rep step ms ({args.reps} reps "
          f"x {args.steps} steps, interleaved)")
  for name, t in med.items():
    gflops = ""
    if name in flops:
      achieved = sum(flops[name].values()) / t
      util[name] = achieved / rate
      gflops = f"{achieved / 1e9:8.1f} {util[name]:6.3f}"
    print(f"{name:13s} {t * 1e3:9.1f} {min(times[name]) * 1e3:9.1f} "
          f"{tokens / t:9.0f} {gflops:>15s}  "
          f"{[round(x * 1e3, 1) for x in times[name]]}")
  if "pretrain" in med:
    print("step-time ratios (median): " + " ".join(
        f"{k}/pretrain={med[k] / med['pretrain']:.3f}"
        for k in ("warmup", "sparse") if k in med))
  if fwds and {"pretrain fwd", "warmup fwd", "head fwd"} <= set(med):
    trunk = med["pretrain fwd"] - med["head fwd"]
    print("warm-up breakdown (ms): forward "
          f"{med['warmup fwd'] * 1e3:.1f} = trunk + dense attention "
          f"{trunk * 1e3:.1f} (pretrain fwd - head fwd) + probe "
          f"{(med['warmup fwd'] - trunk) * 1e3:.1f}; backward + update "
          f"{(med['warmup'] - med['warmup fwd']) * 1e3:.1f}")
  if {"pretrain", "layer f+b", "attn f+b", "head f+b", "update"} <= set(med):
    n = n_layers
    parts = (n * med["layer f+b"] + med["head f+b"] + med["update"])
    print(f"pretrain step parts (ms, each timed alone): {n} x layer "
          f"{n * med['layer f+b'] * 1e3:.0f} (of which attention sublayer "
          f"{n * med['attn f+b'] * 1e3:.0f}) + head "
          f"{med['head f+b'] * 1e3:.0f} + update {med['update'] * 1e3:.0f} "
          f"= {parts * 1e3:.0f}; the step {med['pretrain'] * 1e3:.0f} "
          f"(the rest: embedding, the layer scan "
          f"{(med['pretrain'] - parts) * 1e3:.0f})")
  ratio = (med["warmup"] / med["pretrain"]
           if {"warmup", "pretrain"} <= set(med) else float("nan"))
  print(f"summary: pretrain_util={fmt(util.get('pretrain', float('nan')))} "
        f"warmup_over_pretrain={fmt(ratio)} "
        f"sparse_util={fmt(util.get('sparse', float('nan')))} "
        f"compile_s={fmt(max(compile_s.values(), default=float('nan')), 1)}")


if __name__ == "__main__":
  main()
