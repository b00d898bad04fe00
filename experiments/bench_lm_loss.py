"""Times the LM loss's forward+backward at the output head: chunked over
positions (dsax.lm_loss) against the full [B, T, V] logits (model.lm_loss),
in one run, interleaved.

  python experiments/bench_lm_loss.py          # SmolLM2's head: D 576,
                                               # V 49152, T 2048, f32
  python experiments/bench_lm_loss.py --quick  # tiny sizes (smoke test)

The step is the value and gradient of the weighted mean cross entropy of
h_BTD @ w_DV w.r.t. h_BTD (the final-normed hidden state) and w_DV (the
head), a quarter of the positions weighted 0. Each rep times chunked then
full (after one untimed call each); the ratio is of the median times. Peak
memory is XLA's compiled memory_analysis (arguments + outputs + temporaries
- aliases). FLOPs: 2 B T D V forward, 4 B T D V backward (the chunked loss
recomputes the logits: + 2 B T D V). Ends with ``summary:
chunked_over_full=<ratio> chunked_peak_mb=<MB> full_peak_mb=<MB>``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dsax import lm_loss, model
from dsax.config import ModelConfig

from bench_util import compile_all, interleaved, machine


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--d", type=int, default=576, help="d_model")
  ap.add_argument("--vocab", type=int, default=49152)
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--chunk", type=int, default=ModelConfig.lm_loss_chunk)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--quick", action="store_true",
                  help="D 64, V 512, T 256, chunk 64, 1 rep")
  args = ap.parse_args(argv)
  if args.quick:
    args.d, args.vocab, args.seq_len = 64, 512, 256
    args.chunk, args.reps = 64, 1
  return args


def main(argv=None):
  args = parse(argv)
  cfg = ModelConfig(d_model=args.d, vocab_size=args.vocab,
                    lm_loss_chunk=args.chunk)
  b, t = args.batch, args.seq_len
  kh, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
  h_BTD = jax.random.normal(kh, (b, t, args.d), jnp.float32)
  w_DV = 0.02 * jax.random.normal(kw, (args.d, args.vocab), jnp.float32)
  y_BT = jax.random.randint(ky, (b, t), 0, args.vocab)
  w_BT = (jnp.arange(t) % 4 != 0).astype(jnp.float32)[None].repeat(b, 0)

  def full(h_BTD, w_DV):
    return model.lm_loss(model.head_logits(h_BTD, w_DV, cfg), y_BT, w_BT)

  def chunked(h_BTD, w_DV):
    return model.mean_nll(lm_loss.token_nll(h_BTD, w_DV, y_BT, cfg), w_BT)

  fns = {"chunked": chunked, "full": full}
  print(f"LM loss fwd+bwd: B={b} T={t} D={args.d} V={args.vocab} "
        f"chunk={args.chunk} f32, {machine()}")
  compiled, peaks, vals = compile_all(
      {n: jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
       for n, fn in fns.items()}, h_BTD, w_DV)
  (lc, (gh_c, gw_c)), (lf, (gh_f, gw_f)) = vals["chunked"], vals["full"]
  rel = max(float(jnp.max(jnp.abs(a - c)) / jnp.max(jnp.abs(c)))
            for a, c in ((gh_c, gh_f), (gw_c, gw_f)))
  print(f"  loss chunked {float(lc):.6f} full {float(lf):.6f}; "
        f"max relative gradient difference {rel:.1e}")
  med = interleaved(compiled, (h_BTD, w_DV), args.reps)
  gflop = {"full": 6.0 * b * t * args.d * args.vocab / 1e9}
  gflop["chunked"] = gflop["full"] * 4 / 3
  for n in fns:
    print(f"  {n}: median {med[n] * 1e3:.0f} ms, {gflop[n]:.1f} GFLOP at "
          f"{gflop[n] / med[n]:.1f} GFLOP/s, peak {peaks[n]:.0f} MB")
  print(f"summary: chunked_over_full={med['chunked'] / med['full']:.3f} "
        f"chunked_peak_mb={peaks['chunked']:.0f} "
        f"full_peak_mb={peaks['full']:.0f}")


if __name__ == "__main__":
  main()
