"""What the benchmark scripts share: a compiled program's peak memory, and
timing several programs interleaved in one run (these machines are noisy:
a ratio is only meaningful between times taken side by side).

Scripts run as ``python experiments/bench_x.py`` (this directory is then on
sys.path) or are imported by the tests with it put there.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import numpy as np


def peak_mb(compiled) -> float:
  """XLA's estimate of a compiled program's peak: temporaries plus
  arguments plus outputs, less what outputs alias (MiB); NaN if unknown."""
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  total = (m.temp_size_in_bytes + m.argument_size_in_bytes
           + m.output_size_in_bytes - m.alias_size_in_bytes)
  return total / 2**20


def machine() -> str:
  """The machine line's tail: cores and the load when the run started."""
  return (f"{jax.default_backend()}; machine cpus={os.cpu_count()} "
          f"load1={os.getloadavg()[0]:.2f}")


def compile_all(fns: dict[str, Callable], *args) -> tuple[dict, dict, dict]:
  """Each jitted fn lowered and compiled on ``args`` and called once
  (untimed warm-up): (compiled, peak MB, first outputs) by name."""
  compiled, peaks, first = {}, {}, {}
  for n, fn in fns.items():
    t0 = time.perf_counter()
    compiled[n] = fn.lower(*args).compile()
    peaks[n] = peak_mb(compiled[n])
    first[n] = jax.block_until_ready(compiled[n](*args))
    print(f"  {n}: compile+first {time.perf_counter() - t0:.1f}s, "
          f"peak {peaks[n]:.0f} MB")
  return compiled, peaks, first


def interleaved(compiled: dict[str, Any], args: tuple,
                reps: int) -> dict[str, float]:
  """Median seconds per call of each program, the programs taking turns
  within every repetition (so drifting load hits all of them alike)."""
  times: dict[str, list[float]] = {n: [] for n in compiled}
  for rep in range(reps):
    row = []
    for n, fn in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[n].append(time.perf_counter() - t0)
      row.append(f"{n} {times[n][-1] * 1e3:.0f} ms")
    print(f"  rep {rep}: " + ", ".join(row))
  return {n: float(np.median(t)) for n, t in times.items()}
