"""Tile arithmetic and the jnp pieces shared by the Pallas kernels.

``NEG_INF`` is the masked logit of every kernel and reference (and of the
model's dense path): finite, so that a row whose keys are all masked gives
exp(0) weights instead of NaN, and exp(NEG_INF - m) underflows to exactly 0
as soon as one real key is seen.

Matmul layouts, all with f32 accumulation (Triton's tl.dot):
  dot_nt(a, b) = a b^T    a [m, d], b [n, d]
  dot_nn(a, b) = a b      a [m, d], b [d, n]
  dot_tn(a, b) = a^T b    a [d, m], b [d, n]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG_INF = -1e30


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [m, d] . b [n, d]^T -> [m, n] f32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [m, d] . b [d, n] -> [m, n] f32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [d, m]^T . b [d, n] -> [m, n] f32."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


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


def pieces(d: int, least: int = 16) -> list[tuple[int, int, int]]:
  """(start, size, padded size): power-of-two pieces of d, largest first;
  a remainder under ``least`` becomes one padded piece. A head dim of 192
  is 128 + 64 and 72 is 64 + (8 padded to 16), so no tile pads 192 to 256."""
  out, start = [], 0
  while start < d:
    rest = d - start
    size = rest if rest < least else 1 << (rest.bit_length() - 1)
    out.append((start, size, pow2(size, least)))
    start += size
  return out


def split_pieces(x_BTNP: jax.Array, length: int,
                 parts: list[tuple[int, int, int]]) -> list[jax.Array]:
  """Pads axis 1 to ``length`` and cuts the last axis into ``parts`` (from
  ``pieces``), each zero-padded to its padded size."""
  x = pad_axis(x_BTNP, 1, length)
  return [pad_axis(x[..., a:a + size], 3, padded)
          for a, size, padded in parts]


def tile_mask(qpos_T: jax.Array, kpos_S: jax.Array, seg_q_T: jax.Array | None,
              seg_k_S: jax.Array | None, s_real: int) -> jax.Array:
  """[T, S] bool inside a kernel tile: causal, a real key (not padding), and
  the same segment when segments are given."""
  m = (kpos_S[None, :] <= qpos_T[:, None]) & (kpos_S < s_real)[None, :]
  if seg_q_T is not None:
    m = m & (seg_q_T[:, None] == seg_k_S[None, :])
  return m


def take(it, n: int) -> list:
  """The next n items of an iterator (unpacking a kernel's refs)."""
  return [next(it) for _ in range(n)]


def check_blocks(block, names) -> None:
  """Each named field of a block-size dataclass is a positive int."""
  for name in names:
    val = getattr(block, name)
    if not isinstance(val, int) or val < 1:
      raise ValueError(f"{type(block).__name__}.{name} must be a positive "
                       f"int, got {val!r}")
