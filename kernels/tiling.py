"""Tile arithmetic shared by the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def resolve_interpret(interpret: bool | None) -> bool:
  """None: interpret on CPU, compile elsewhere."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return bool(interpret)


def pow2(x: int, least: int = 16) -> int:
  """The next power of two >= x, at least ``least`` (Triton tiles)."""
  return max(least, pl.next_power_of_2(int(x)))


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads ``axis`` of x at the end up to ``size``."""
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads, constant_values=value)


def check_blocks(block, names) -> None:
  """Each named field of a block-size dataclass is a positive int."""
  for name in names:
    val = getattr(block, name)
    if not isinstance(val, int) or val < 1:
      raise ValueError(f"{type(block).__name__}.{name} must be a positive "
                       f"int, got {val!r}")
