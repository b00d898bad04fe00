"""Test-only GGUF K-quant encoders (Q6_K, Q4_K): the ``gguf`` package can
read these types but not write them, so tests/test_gguf.py makes its K-quant
files with these, each returning the bytes and a worst-case error bound that
its round-trip test checks against the package's dequantiser."""

from __future__ import annotations

import numpy as np


def _f16_up(x):
  """The smallest float16 >= x (x >= 0): scales that never clip."""
  h = np.asarray(x, np.float32).astype(np.float16)
  return np.where(h.astype(np.float32) < x,
                  np.nextafter(h, np.float16(np.inf)), h)


def quantize_q6_k(x):
  """[rows, 256 m] -> (Q6_K bytes [rows, 210 m], error bound like x).
  block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16]
  (one per 16 values), f16 d; x = d * scales[v // 16] * (q - 32)."""
  rows = x.shape[0]
  blocks = x.reshape(-1, 16, 16).astype(np.float32)
  scale = np.abs(blocks).max(-1) / 31  # [nb, 16], q in [-31, 31]
  d = _f16_up(scale.max(-1) / 126)     # [nb]
  dd = np.where(d > 0, d.astype(np.float32), 1)[:, None]
  sc = np.ceil(scale / dd).astype(np.int8)  # <= 127
  step = dd * sc  # [nb, 16]
  q = np.clip(np.round(blocks / np.where(step > 0, step, 1)[..., None]),
              -32, 31).astype(np.int16)
  slack = 1e-6 * np.abs(blocks).max(-1) + 1e-7  # f32 rounding
  bound = np.broadcast_to((0.5 * step + slack)[..., None], blocks.shape)
  u = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [nb, half, k, l]
  ql = np.concatenate([(u[:, :, 0] & 15) | ((u[:, :, 2] & 15) << 4),
                       (u[:, :, 1] & 15) | ((u[:, :, 3] & 15) << 4)],
                      axis=2).reshape(-1, 128)
  qh = ((u[:, :, 0] >> 4) | ((u[:, :, 1] >> 4) << 2) | ((u[:, :, 2] >> 4) << 4)
        | ((u[:, :, 3] >> 4) << 6)).reshape(-1, 64)
  raw = np.concatenate([ql, qh, sc.view(np.uint8),
                        d.astype("<f2")[:, None].view(np.uint8)], axis=1)
  return raw.reshape(rows, -1), bound.reshape(x.shape)


def quantize_q4_k(x):
  """[rows, 256 m] -> (Q4_K bytes [rows, 144 m], error bound like x).
  block_q4_K: f16 d, f16 dmin, scales[12] (6-bit sc and m of 8 sub-blocks
  of 32, packed as get_scale_min_k4 reads them), qs[128] (32 bytes per 64
  values: low nibbles the first 32, high nibbles the next);
  x = d * sc[j] * q - dmin * m[j]."""
  rows = x.shape[0]
  blocks = x.reshape(-1, 8, 32).astype(np.float32)
  offset = -np.minimum(blocks.min(-1), 0)           # >= 0
  scale = (blocks.max(-1) + offset) / 15
  d, dmin = _f16_up(scale.max(-1) / 62), _f16_up(offset.max(-1) / 62)
  dd = np.where(d > 0, d.astype(np.float32), 1)[:, None]
  dm = np.where(dmin > 0, dmin.astype(np.float32), 1)[:, None]
  sc = np.ceil(scale / dd).astype(np.uint8)   # <= 63
  m = np.floor(offset / dm).astype(np.uint8)  # <= 62
  step, shift = dd * sc, dm * m
  q = np.clip(np.round((blocks + shift[..., None])
                       / np.where(step > 0, step, 1)[..., None]), 0, 15)
  slack = 1e-6 * np.abs(blocks).max(-1) + 1e-7  # f32 rounding
  bound = np.broadcast_to((0.5 * step + dm + slack)[..., None],
                          blocks.shape)
  packed = np.empty((len(blocks), 12), np.uint8)
  packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
  packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
  packed[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
  q = q.astype(np.uint8).reshape(-1, 4, 2, 32)  # [nb, chunk, nibble, l]
  qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
  raw = np.concatenate([d.astype("<f2")[:, None].view(np.uint8),
                        dmin.astype("<f2")[:, None].view(np.uint8), packed, qs],
                       axis=1)
  return raw.reshape(rows, -1), bound.reshape(x.shape)


K_QUANTS = {"Q6_K": quantize_q6_k, "Q4_K": quantize_q4_k}
