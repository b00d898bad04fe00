"""Collectives in the compiled train step of each phase on a few meshes of 8
simulated CPU devices (the table in docs/context_parallel.md):

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python experiments/collectives.py [T] [N_LAYERS]

Counts and total elements of all-gather / all-reduce / collective-permute /
all-to-all / reduce-scatter ops in the optimised HLO; tiny model, 1 layer,
B = 8, T = 256 by default. On a mesh with a ``sequence`` axis the batch is
placed in the zig-zag layout and the step is context parallel
(``dsax.context``); each op's result shapes and element type are listed
after the counts (``ops``), to tell the latent all-gather from the rest.
An op inside the layer scan's loop body counts once, whatever the layers.
"""

import collections
import math
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402

import test_sharding as T  # noqa: E402
from dsax import train  # noqa: E402

OPS = ("all-gather", "all-reduce", "collective-permute", "all-to-all",
       "reduce-scatter")


def ops(hlo: str) -> list[tuple[str, str]]:
  """(op, result type text) of every collective in the HLO text."""
  out = []
  for line in hlo.splitlines():
    m = re.search(r"= (.*?) (" + "|".join(OPS) + r")(-start)?\(", line)
    if m:
      out.append((m.group(2), m.group(1)))
  return out


def inventory(hlo: str) -> dict[str, tuple[int, int]]:
  """op -> (count, total elements of its results)."""
  count, elems = collections.Counter(), collections.Counter()
  for op, shape_text in ops(hlo):
    shapes = re.findall(r"\[([\d,]*)\]", shape_text)
    count[op] += 1
    elems[op] += sum(math.prod(int(d) for d in s.split(",") if d)
                     for s in shapes)
  return {k: (count[k], elems[k]) for k in count}


def step_hlo(cfg, phase, params, mesh, batch) -> str:
  """The optimised HLO of one phase's compiled train step on ``mesh``."""
  state, frozen, tx, sched = train.init_state(cfg, phase, params, mesh)
  step = train.make_train_step(cfg, phase, tx, sched, mesh)
  gb = train.place_batch(batch, train.data_sharding(cfg, mesh))
  with jax.set_mesh(mesh):
    return step.jitted.lower(state, frozen, gb).compile().as_text()


def main(seq_len: int = 256, n_layers: int = 1) -> None:
  cfg = T._config([f"data.seq_len={seq_len}", "model.attn_q_chunk=64",
                   f"model.n_layers={n_layers}"])
  batch = T._batches(cfg, 1)[0]
  for shape in [(8, 1, 1, 1), (1, 1, 1, 8), (2, 1, 1, 4)]:
    mesh = T._mesh(shape)
    params = train.init_params(cfg, mesh)
    for phase in cfg.phases[:3]:
      hlo = step_hlo(cfg, phase, params, mesh, batch)
      listed = sorted(collections.Counter(
          f"{op} {t}" for op, t in ops(hlo) if op != "all-reduce").items())
      print(f"data,fsdp,tensor,sequence={shape} {phase.name}: "
            f"{inventory(hlo)}; ops {listed}", flush=True)


if __name__ == "__main__":
  main(*(int(a) for a in sys.argv[1:]))
