"""Times one MoE layer's forward+backward: the grouped dispatch against the
dense reference (dsax.moe), in one run, interleaved.

  python experiments/bench_moe.py            # 64 experts, top-6, D 1024,
                                             # F 256, 4K tokens, f32
  python experiments/bench_moe.py --quick    # tiny sizes (smoke test)

The layer is DeepSeek-V2-Lite's routing (softmax scores, greedy top-k, two
shared experts) at the given sizes; the step is the value and gradient of
sum(y * r) (r a fixed random cotangent) w.r.t. every parameter and the
input. Each rep times grouped then dense (after one untimed call each);
the ratio is of the median times. Peak memory is XLA's compiled
memory_analysis (arguments + outputs + temporaries - aliases).
FLOPs (forward, per token): routed experts 6*K*D*F (dense dispatch:
6*X*D*F), shared 6*S*D*F, router 2*D*X; forward+backward counts 3x.
Ends with ``summary: grouped_over_dense=<ratio> grouped_peak_mb=<MB>``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dsax import moe
from dsax import params as P
from dsax.config import ModelConfig, MoEConfig

from bench_util import compile_all, interleaved, machine


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--experts", type=int, default=64)
  ap.add_argument("--topk", type=int, default=6)
  ap.add_argument("--shared", type=int, default=2)
  ap.add_argument("--d", type=int, default=1024, help="d_model")
  ap.add_argument("--f", type=int, default=256, help="expert width")
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--block", type=int, default=moe.BLOCK)
  ap.add_argument("--impl", default="auto", choices=moe.IMPLS)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--quick", action="store_true",
                  help="8 experts, top-2, D 64, F 32, 256 tokens, 1 rep")
  args = ap.parse_args(argv)
  if args.quick:
    args.experts, args.topk, args.shared = 8, 2, 1
    args.d, args.f, args.tokens, args.block, args.reps = 64, 32, 256, 16, 1
  return args


def layer_config(args) -> ModelConfig:
  return ModelConfig(d_model=args.d, n_layers=2, moe=MoEConfig(
      n_routed_experts=args.experts, n_shared_experts=args.shared,
      n_activated=args.topk, d_expert=args.f, first_k_dense=1))


def flops(args, dispatch: str) -> float:
  """Forward+backward FLOPs of the step (module docstring)."""
  active = args.topk if dispatch == "grouped" else args.experts
  per_token = (6 * (active + args.shared) * args.d * args.f
               + 2 * args.d * args.experts)
  return 3.0 * per_token * args.tokens * args.batch


def main(argv=None):
  args = parse(argv)
  cfg = layer_config(args)
  params = P.init_params(cfg, jax.random.PRNGKey(0))
  p = jax.tree.map(lambda a: a[0], params["moe"])
  kx, kr = jax.random.split(jax.random.PRNGKey(1))
  t = args.tokens // args.batch
  x_BTD = jax.random.normal(kx, (args.batch, t, args.d), jnp.float32)
  r_BTD = jax.random.normal(kr, (args.batch, t, args.d), jnp.float32)

  def step(dispatch):
    def loss(p, x_BTD):
      y_BTD, _ = moe.moe_forward(p, x_BTD, cfg, dispatch=dispatch,
                                 impl=args.impl, block=args.block)
      return jnp.sum(y_BTD * r_BTD)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  print(f"MoE layer fwd+bwd: X={args.experts} K={args.topk} "
        f"shared={args.shared} D={args.d} F={args.f} tokens={args.tokens} "
        f"(B={args.batch}) f32, grouped impl={moe.resolve_impl(args.impl)} "
        f"block={args.block}; {machine()}")
  names = ("grouped", "dense")
  compiled, peaks, _ = compile_all({n: step(n) for n in names}, p, x_BTD)
  med = interleaved(compiled, (p, x_BTD), args.reps)
  for n in names:
    print(f"  {n}: median {med[n] * 1e3:.0f} ms, "
          f"{flops(args, n) / 1e9:.1f} GFLOP at "
          f"{flops(args, n) / med[n] / 1e9:.1f} GFLOP/s, peak {peaks[n]:.0f} MB")
  ideal = flops(args, "grouped") / flops(args, "dense")
  print(f"  FLOP ratio grouped/dense {ideal:.3f}")
  print(f"summary: grouped_over_dense={med['grouped'] / med['dense']:.3f} "
        f"grouped_peak_mb={peaks['grouped']:.0f}")


if __name__ == "__main__":
  main()
