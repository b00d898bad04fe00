"""The LM loss without a [B, T, V] logits tensor: cross entropy chunked over
positions.

For the final-normed hidden state h_BTD (``model.forward(..., head=False)``)
and the output head w_DV (``model.head_weights``: the embedding transposed
when tied),

  nll[b, t] = logsumexp_v(h[b, t] . w[:, v]) - h[b, t] . w[:, y[b, t]]
  L = sum_{b,t} w_bt nll[b, t] / max(sum_{b,t} w_bt, 1)   (model.mean_nll)

exactly ``model.lm_loss(model.unembed(...))`` up to rounding. The T positions
are cut into M chunks of ``chunk`` positions (default ``cfg.lm_loss_chunk``;
the last chunk padded, its padded rows dropped before the reduction) and a
rolled ``lax.map`` forms one chunk's logits [B, chunk, V] at a time in f32.
Each chunk is a ``jax.checkpoint``: the backward keeps only the chunk's
inputs (h, targets) and recomputes its logits, so neither pass holds more
than a few [B, chunk, V] buffers; the head's gradient dW_DV accumulates over
the chunks in the map's transpose. Cost: one extra head matmul in the
backward (the recompute), 2 D V FLOPs per token. Axis M counts the chunks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dsax import model
from dsax.config import ModelConfig


def token_nll(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array,
              cfg: ModelConfig, chunk: int | None = None) -> jax.Array:
  """nll[b, t] (f32 [B, T]) of the logits h_BTD @ w_DV (``model.head_logits``),
  formed ``chunk`` (default ``cfg.lm_loss_chunk``; [B, 512, V] f32 is 100 MB
  per batch row at V = 49152) positions at a time, recomputed in the
  backward."""
  chunk = cfg.lm_loss_chunk if chunk is None else chunk
  if chunk < 1:
    raise ValueError(f"lm_loss.token_nll: chunk must be >= 1, got {chunk}")
  b, t, d = h_BTD.shape
  c = min(chunk, t)
  m = -(-t // c)
  pad = m * c - t
  h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
  y_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  h_MBTD = h_BTD.reshape(b, m, c, d).transpose(1, 0, 2, 3)
  y_MBT = y_BT.reshape(b, m, c).transpose(1, 0, 2)

  @jax.checkpoint
  def chunk_nll(xs):
    h_BTD, y_BT = xs
    logits_BTV = model.head_logits(h_BTD, w_DV, cfg)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    hit_BT = jnp.take_along_axis(logits_BTV, y_BT[..., None], axis=-1)[..., 0]
    return lse_BT - hit_BT

  nll_MBT = jax.lax.map(chunk_nll, (h_MBTD, y_MBT))
  return nll_MBT.transpose(1, 0, 2).reshape(b, m * c)[:, :t]


def loss(params: dict[str, Any], h_BTD: jax.Array, targets_BT: jax.Array,
         weights_BT: jax.Array | None, cfg: ModelConfig,
         chunk: int | None = None) -> jax.Array:
  """Mean next-token cross entropy over weighted positions (f32) of the
  final-normed hidden state h_BTD; equals ``model.lm_loss`` of the full
  logits, without forming them."""
  nll_BT = token_nll(h_BTD, model.head_weights(params, cfg), targets_BT, cfg,
                     chunk)
  return model.mean_nll(nll_BT, weights_BT)
