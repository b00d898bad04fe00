"""RoPE layouts and YaRN against independent complex-number references."""

import math

import jax.numpy as jnp
import numpy as np

from dsax import dsa, rope
from dsax.config import RopeScaling


def _angles(pos, dim, theta=10000.0):
  f = theta ** (-np.arange(0, dim, 2) / dim)
  return pos[:, None] * f[None]


def test_mla_rope_is_interleaved_and_indexer_rope_is_half_split():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 5, 8)).astype(np.float32)
  pos = np.arange(5, dtype=np.float32) * 3
  ang = _angles(pos, 8)[None]
  inter = np.asarray(rope.apply_interleaved(jnp.asarray(x), jnp.asarray(ang)))
  half = np.asarray(rope.apply_half(jnp.asarray(x), jnp.asarray(ang)))
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)
  np.testing.assert_allclose(inter[..., 0::2], z.real, atol=1e-5)
  np.testing.assert_allclose(inter[..., 1::2], z.imag, atol=1e-5)
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * ang)
  np.testing.assert_allclose(half[..., :4], z.real, atol=1e-5)
  np.testing.assert_allclose(half[..., 4:], z.imag, atol=1e-5)
  assert np.abs(inter - half).max() > 0.1


def test_yarn_frequencies_and_mscale_match_closed_form():
  # dim 64, theta 1e4, L0 4096: correction range [10, 23] (beta 32 and 1).
  s = RopeScaling(enabled=True, factor=40.0, original_max_position=4096)
  base = 1e4 ** (-np.arange(0, 64, 2) / 64)
  got = rope.inv_frequencies(64, 1e4, s)
  np.testing.assert_allclose(got[:10], base[:10], rtol=1e-6)
  np.testing.assert_allclose(got[23:], base[23:] / 40, rtol=1e-6)
  ramp = (np.arange(10, 23) - 10) / 13
  np.testing.assert_allclose(got[10:23], base[10:23] / 40 * ramp
                             + base[10:23] * (1 - ramp), rtol=1e-6)
  assert math.isclose(rope.softmax_mscale(s), (0.1 * math.log(40) + 1) ** 2,
                      rel_tol=1e-9)
  assert rope.softmax_mscale(RopeScaling()) == 1.0
  np.testing.assert_allclose(rope.inv_frequencies(64, 1e4, RopeScaling()),
                             base, rtol=1e-6)


def test_hadamard_is_orthogonal_and_fp8_error_is_bounded():
  h = dsa.hadamard(32)
  np.testing.assert_allclose(h @ h.T, np.eye(32), atol=1e-6)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 256)), jnp.float32)
  y = dsa.fp8_roundtrip(x)
  rel = float(jnp.abs(y - x).max() / jnp.abs(x).max())
  assert 0 < rel < 2 ** -3  # e4m3: 3 mantissa bits
