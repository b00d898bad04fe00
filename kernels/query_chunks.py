"""Mapping a function over consecutive query chunks.

Attention-like ops compute a [chunk, S] slab per step so that nothing of size
T x S x (heads) is ever materialised; with rematerialisation the backward keeps
only the chunk inputs, not the slabs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def map_query_chunks(fn: Callable[..., Any], chunk: int, *xs_BT: jax.Array,
                     remat: bool = True) -> Any:
  """Applies ``fn(start, *x_chunks)`` to consecutive query chunks of size
  ``chunk`` and stitches the outputs back along T.

  Each x has leading axes [B, T]; each output leaf has leading [B, chunk]. T is
  padded to a multiple of ``chunk`` (padded rows are computed and dropped).
  With ``remat`` the chunk is recomputed in the backward.
  """
  b, t = xs_BT[0].shape[:2]
  if t <= chunk:
    return fn(jnp.int32(0), *xs_BT)
  n = -(-t // chunk)
  pad = n * chunk - t

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  body = jax.checkpoint(fn) if remat else fn
  starts = jnp.arange(n, dtype=jnp.int32) * chunk
  out = jax.lax.map(lambda a: body(a[0], *a[1:]),
                    (starts,) + tuple(split(x) for x in xs_BT))

  def join(y):
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape((b, n * chunk) + y.shape[3:])[:, :t]

  return jax.tree.map(join, out)


def causal_segment_mask(q_index_T: jax.Array, k_index_S: jax.Array,
                        q_seg_BT: jax.Array | None,
                        k_seg_BS: jax.Array | None) -> jax.Array:
  """[B or 1, T, S] bool: key index <= query index, same segment when given."""
  mask = (k_index_S[None, :] <= q_index_T[:, None])[None]
  if q_seg_BT is not None:
    mask = mask & (q_seg_BT[:, :, None] == k_seg_BS[:, None, :])
  return mask


def map_causal_chunks(fn: Callable[..., Any], chunk: int,
                      xs_BT: tuple[jax.Array, ...],
                      keys_BS: tuple[jax.Array, ...], remat: bool = True,
                      max_groups: int = 8) -> Any:
  """Like ``map_query_chunks`` for causal self-attention, but a query chunk
  sees only a key prefix: ``fn(start, *x_chunks, *key_prefixes)``.

  The n chunks are cut into at most ``max_groups`` runs of consecutive
  chunks; run g (chunks [c0, c1)) is one rolled ``map_query_chunks`` whose
  chunks all see the keys [0, c1 * chunk), the prefix of its last chunk
  (the keys past a chunk are masked anyway). With G equal runs that scores
  (G + 1) / (2G) of all keys (9/16 at G = 8; each chunk exactly its own
  prefix when n <= G) at any length, and compiles G loop bodies whatever T.
  One chunk's [chunk, S] slab is live at a time inside each run. This is
  the dense path's probe route (recall needs each query's whole row); the
  plain dense attention runs ``causal_blocks``.
  """
  t = xs_BT[0].shape[1]
  n = -(-t // chunk)
  groups = min(n, max_groups)
  bounds = [round(g * n / groups) for g in range(groups + 1)]
  nx = len(xs_BT)
  outs = []
  for c0, c1 in zip(bounds[:-1], bounds[1:]):
    s0, s1 = c0 * chunk, min(t, c1 * chunk)
    prefixes = tuple(k[:, :s1] for k in keys_BS)

    def run(start, *a, s0=s0, prefixes=prefixes):
      return fn(start + s0, *a[:nx], *prefixes)

    # Checkpointed here: map_query_chunks runs a single chunk unwrapped.
    outs.append(map_query_chunks(jax.checkpoint(run) if remat else run,
                                 chunk, *(x[:, s0:s1] for x in xs_BT),
                                 remat=False))
  if len(outs) == 1:
    return outs[0]
  return jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *outs)
