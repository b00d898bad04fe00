"""Which of the passkey's tokens a sparse layer keeps: for a run's phase,
at the query that predicts the first passkey digit, per layer, how many of
the passkey's prompt tokens are in the indexer's top-k and in the oracle
top-k of the dense attention, and whether each predicts the digit.

  python experiments/passkey_selection.py work/smollm2_dsa_cpu
  python experiments/passkey_selection.py RUN --phase sparse --depths 0,1

The passkey examples are the page's (``retrieval.build_eval_set``, seed 0,
lengths T/2 and T, one per depth). Mean recall over all tokens can hide a
retrieval failure: this looks at the one query that needs the far keys.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def passkey_positions(ids: np.ndarray, n_prompt: int,
                      answer: np.ndarray) -> list[int]:
  """Prompt positions covered by an occurrence of the answer's tokens."""
  n = len(answer)
  return sorted({j for i in range(n_prompt - n + 1)
                 if np.array_equal(ids[i:i + n], answer)
                 for j in range(i, i + n)})


def measure(run_dir: str, phase: str, lengths=None,
            depths=(0.0, 0.5, 1.0)) -> list[dict]:
  """Per example: length, depth, the passkey's token count and, for the
  indexer and the oracle, the count kept per layer and the first digit's
  argmax hit."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dsax import checkpoint, evals, model  # pylint: disable=import-outside-toplevel
  from dsax import params as P  # pylint: disable=import-outside-toplevel
  from dsax.attention import AttentionMode  # pylint: disable=import-outside-toplevel
  from dsax.evals import retrieval  # pylint: disable=import-outside-toplevel
  cfg, tok, _ = evals.load_run(run_dir)
  params = checkpoint.load_params(os.path.join(run_dir, "phases", phase),
                                  P.abstract_params(cfg.model))
  t = cfg.data.seq_len
  lengths = lengths or [t // 2, t]
  k = cfg.model.indexer.topk
  fns = {}
  for sel in ("indexer", "oracle"):
    mode = AttentionMode.of(cfg.model, "sparse", topk=k, selection=sel,
                            indices=True)

    def f(p, tokens, mode=mode):
      logits, aux = model.forward(p, tokens, cfg.model, mode=mode)
      return logits[0, -1], aux.idx[:, 0, -1], aux.valid[:, 0, -1]
    fns[sel] = jax.jit(f)
  out = []
  for ex in retrieval.build_eval_set(tok, 0, lengths, tuple(depths),
                                     ("passkey",), 1):
    e = retrieval.encode(ex, tok)
    answer = e.ids[e.n_prompt:]
    pos = set(passkey_positions(e.ids, e.n_prompt, answer))
    row = {"length": ex.meta["cell"]["length"],
           "depth": ex.meta["cell"]["depth"], "tokens": len(pos)}
    for sel, f in fns.items():
      logits, idx, valid = (np.asarray(a) for a in f(
          params, jnp.asarray(e.ids[None, :e.n_prompt])))
      row[sel] = [len(pos & set(i[v].tolist())) for i, v in zip(idx, valid)]
      row[sel + "_right"] = bool(np.argmax(logits) == answer[0])
    out.append(row)
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("run_dir")
  ap.add_argument("--phase", default="warmup")
  ap.add_argument("--depths", default="0,0.5,1")
  ap.add_argument("--lengths", default="",
                  help="comma-separated prompt lengths (default T/2,T)")
  args = ap.parse_args(argv)
  if not os.path.isdir(os.path.join(args.run_dir, "phases", args.phase)):
    print(f"error: no phase {args.phase!r} under {args.run_dir}/phases; "
          "name a finished phase with --phase", file=sys.stderr)
    return 2
  rows = measure(args.run_dir, args.phase,
                 [int(x) for x in args.lengths.split(",") if x],
                 [float(d) for d in args.depths.split(",")])
  print("| length | depth | passkey tokens | layers keeping all: indexer | "
        "oracle | digit right: indexer | oracle | kept per layer: indexer "
        "| oracle |")
  print("|" + "---|" * 9)
  for r in rows:
    n = r["tokens"]
    print(f"| {r['length']} | {r['depth']:g} | {n} | "
          f"{sum(c == n for c in r['indexer'])}/{len(r['indexer'])} | "
          f"{sum(c == n for c in r['oracle'])} | {r['indexer_right']} | "
          f"{r['oracle_right']} | {' '.join(map(str, r['indexer']))} | "
          f"{' '.join(map(str, r['oracle']))} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
