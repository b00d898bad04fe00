"""Tokens/s of the pretrain, warm-up and sparse train steps at a config's shapes.

  python experiments/bench_train.py                       # configs/main.py
  python experiments/bench_train.py --batch-size 2 --seq-len 2048
  python experiments/bench_train.py --config main:full --set model.remat=true

Each phase kind (the first phase of that kind in the config) gets the step the
trainer builds: ``train.make_train_step`` with the trainer's partitioning
(``labels_for``: trainable vs frozen parameters, regexes of the phase) and
optimizer (``train.optimizer``), state donated. Inputs are random tokens, one
document per row. The config is read at run time (``sweep.load_config``).

After one compiling call per phase, repetitions are interleaved (pretrain,
warmup, sparse, pretrain, ...); each repetition times ``--steps`` consecutive
steps and blocks at the end, as the trainer's loop only reads metrics a step
late. Reported: the median step time over repetitions (and the min), tokens/s
= batch_size * seq_len / step time, and warmup/pretrain and sparse/pretrain
step-time ratios. The warm-up differentiates only the indexer (the trunk is
frozen and the indexer's inputs are detached), so its step should cost well
under a pretrain step: a forward, the dense-probe recompute and the indexer's
small backward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsax import config as C  # noqa: E402
from dsax import params as P  # noqa: E402
from dsax import sweep, train  # noqa: E402

KINDS = ("pretrain", "warmup", "sparse")


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


def phase_step(cfg, phase, params):
  """(step_fn, state, frozen) exactly as ``train.run_phase`` builds them."""
  flat = train.flatten(params)
  labels = train.labels_for(phase, list(flat))
  trainable = {k: jnp.array(v) for k, v in flat.items() if k in labels}
  frozen = {k: v for k, v in flat.items() if k not in labels}
  tx, sched = train.optimizer(phase, labels)
  state = {"trainable": trainable, "opt": tx.init(trainable),
           "step": jnp.int32(0)}
  return train.make_train_step(cfg, phase, tx, sched), state, frozen, labels


def main(argv=None):
  args = parse_args(argv)
  cfg = load(args)
  m = cfg.model
  phases = {}
  for kind in KINDS:
    found = [p for p in cfg.phases if p.kind == kind]
    if found:
      phases[kind] = found[0]
  tokens = cfg.data.batch_size * cfg.data.seq_len
  print(f"jax {jax.__version__} on {jax.default_backend()} "
        f"({os.cpu_count()} cpus); config {args.config} ({cfg.name}): "
        f"batch {cfg.data.batch_size} x seq_len {cfg.data.seq_len} = "
        f"{tokens} tokens/step; D={m.d_model} L={m.n_layers} N={m.n_heads} "
        f"C={m.kv_lora_rank} F={m.d_ff} remat={m.remat} attn_q_chunk="
        f"{m.attn_q_chunk}; indexer I={m.indexer.n_heads} J="
        f"{m.indexer.head_dim} q_chunk={m.indexer.q_chunk}; {P.param_count(m)}"
        " params")
  params = P.init_params(m, jax.random.PRNGKey(cfg.seed))
  batch = random_batch(cfg)
  steps, states, frozens = {}, {}, {}
  for kind, phase in phases.items():
    steps[kind], states[kind], frozens[kind], labels = phase_step(
        cfg, phase, params)
    n_train = sum(int(np.prod(v.shape)) for k, v in
                  train.flatten(params).items() if k in labels)
    mode = train.phase_mode(cfg, phase)
    t0 = time.perf_counter()
    with jax.set_mesh(steps[kind].mesh):
      compiled = steps[kind].jitted.lower(states[kind], frozens[kind],
                                          batch).compile()
    compile_s = time.perf_counter() - t0
    if not args.reps:  # compile only
      print(f"  {kind:8s} phase {phase.name!r}: compile {compile_s:.1f} s",
            flush=True)
      continue
    t0 = time.perf_counter()
    steps[kind] = compiled  # later calls skip jit's dispatch and cache
    states[kind], out = compiled(states[kind], frozens[kind], batch)
    jax.block_until_ready((states[kind], out))
    print(f"  {kind:8s} phase {phase.name!r}: {n_train} trainable params "
          f"in groups {sorted(set(labels.values()))}, attention "
          f"{mode.kind}" + (f" top-{mode.topk}" if mode.sparse else "")
          + f"; compile {compile_s:.1f} s, first step "
          f"{time.perf_counter() - t0:.1f} s, "
          f"loss {float(out['loss']):.4f}", flush=True)

  if not args.reps:
    return
  times = {kind: [] for kind in phases}
  for _ in range(args.reps):
    for kind in phases:
      t0 = time.perf_counter()
      for _ in range(args.steps):
        states[kind], out = steps[kind](states[kind], frozens[kind], batch)
      jax.block_until_ready((states[kind], out))
      times[kind].append((time.perf_counter() - t0) / args.steps)

  print(f"{'phase':9s} {'step_ms':>9s} {'min_ms':>9s} {'tokens/s':>10s}  "
        f"per-rep step ms ({args.reps} reps x {args.steps} steps, "
        "interleaved)")
  med = {}
  for kind in phases:
    med[kind] = statistics.median(times[kind])
    print(f"{kind:9s} {med[kind] * 1e3:9.1f} {min(times[kind]) * 1e3:9.1f} "
          f"{tokens / med[kind]:10.0f}  "
          f"{[round(x * 1e3, 1) for x in times[kind]]}")
  parts = []
  for kind in ("warmup", "sparse"):
    if kind in med and "pretrain" in med:
      parts.append(f"{kind}/pretrain={med[kind] / med['pretrain']:.3f}")
  print("step-time ratios (median): " + " ".join(parts))


if __name__ == "__main__":
  main()
