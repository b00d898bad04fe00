"""Rotary position embeddings, with YaRN, in the two layouts DeepSeek uses.

Frequencies: ``f_i = theta ** (-2i / R)`` for i < R/2. With YaRN enabled
(DeepSeek-V3 inference code), the correction range [lo, hi] is where
``R * ln(L0 / (2 pi b)) / (2 ln theta)`` falls between b = beta_fast and
b = beta_slow; with ramp ``s_i = clip((i - lo) / (hi - lo), 0, 1)`` and
``m_i = 1 - s_i``, ``f_i <- f_i / factor * (1 - m_i) + f_i * m_i``. The softmax
scale gains ``mscale**2``, ``mscale = 0.1 * mscale_cfg * ln(factor) + 1``.

Llama 3 scaling (``kind="llama3"``): with wavelength ``w_i = 2 pi / f_i``, lo =
L0 / low_freq_factor and hi = L0 / high_freq_factor, ``f_i <- f_i / factor``
where w_i > lo, f_i where w_i < hi, and in between ``(1 - a) f_i / factor + a
f_i`` with ``a = (L0 / w_i - low_freq_factor) / (high_freq_factor -
low_freq_factor)``; no softmax factor.

Layouts: MLA rotates interleaved pairs (x[2i], x[2i+1]); the V3.2 indexer rotates
half-split pairs (x[i], x[i + R/2]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsax.config import RopeScaling


def _correction_dim(rotations: float, dim: int, base: float,
                    max_pos: int) -> float:
  return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(dim: int, theta: float,
                    scaling: RopeScaling | None = None) -> np.ndarray:
  """The R/2 inverse frequencies, YaRN-corrected when scaling is enabled."""
  freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if scaling is not None and scaling.enabled and scaling.kind == "llama3":
    return _llama3(freqs, scaling).astype(np.float32)
  if scaling is not None and scaling.enabled:
    lo = math.floor(_correction_dim(scaling.beta_fast, dim, theta,
                                    scaling.original_max_position))
    hi = math.ceil(_correction_dim(scaling.beta_slow, dim, theta,
                                   scaling.original_max_position))
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
      hi += 0.001
    ramp = np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0.0, 1.0)
    smooth = 1.0 - ramp
    freqs = freqs / scaling.factor * (1 - smooth) + freqs * smooth
  return freqs.astype(np.float32)


def _llama3(freqs: np.ndarray, s: RopeScaling) -> np.ndarray:
  wavelen = 2 * math.pi / freqs
  old = s.original_max_position
  a = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor
                                             - s.low_freq_factor)
  blended = (1 - a) * freqs / s.factor + a * freqs
  return np.where(wavelen > old / s.low_freq_factor, freqs / s.factor,
                  np.where(wavelen < old / s.high_freq_factor, freqs, blended))


def softmax_mscale(scaling: RopeScaling | None) -> float:
  """Multiplier of the softmax scale: mscale**2 under YaRN, else 1."""
  if scaling is None or not scaling.enabled or scaling.kind != "yarn":
    return 1.0
  m = 0.1 * scaling.mscale * math.log(scaling.factor) + 1.0
  return m * m


def angles(positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """positions [...] -> angles [..., R/2] in f32."""
  inv = jnp.asarray(inv_freq, jnp.float32)
  return (positions.astype(jnp.float32)[..., None]
          * inv.reshape((1,) * positions.ndim + inv.shape))


def _cos_sin(x: jax.Array, ang: jax.Array):
  """cos and sin of ang [B,T,R/2], broadcast over x's middle (head) axes."""
  extra = x.ndim - ang.ndim
  ang = ang.reshape(ang.shape[:2] + (1,) * extra + ang.shape[2:])
  return jnp.cos(ang), jnp.sin(ang)


def apply_interleaved(x: jax.Array, ang: jax.Array) -> jax.Array:
  """Rotates pairs (x[2i], x[2i+1]). x [B,T,...,R], ang [B,T,R/2]."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  cos, sin = _cos_sin(x, ang)
  x1, x2 = x[..., 0::2], x[..., 1::2]
  y1 = x1 * cos - x2 * sin
  y2 = x1 * sin + x2 * cos
  return jnp.stack([y1, y2], axis=-1).reshape(x.shape).astype(dtype)


def apply_half(x: jax.Array, ang: jax.Array) -> jax.Array:
  """Rotates pairs (x[i], x[i+R/2]) (non-interleaved). x [B,T,...,R]."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  cos, sin = _cos_sin(x, ang)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos],
                         axis=-1).astype(dtype)
