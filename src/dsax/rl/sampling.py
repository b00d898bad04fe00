"""Sampling with temperature, top-k and top-p, and a compact record of the
kept set.

Per position, with logits l over V tokens and temperature tau:
  z        = l / tau                     (tau = 0: greedy, i.e. top_k = 1)
  order    = the tokens by z, descending, ties to the lower id
  K_k      = the first top_k tokens of order     (top_k = 0: all V)
  p'       = softmax(z) renormalised over K_k
  K        = the tokens of K_k, in order, whose p'-mass before them is
             < top_p (at least one; top_p >= 1: all of K_k)
  sample   o ~ softmax(z) restricted to K and renormalised
  log-prob log pi_old(o) = z_o - logsumexp_{v in K} z_v
This is the HF / vLLM order: temperature, then top-k, then top-p over the
top-k distribution. K is a prefix of ``order``, so ``count`` = |K| and the
sort describe it; the record keeps a bit mask of K packed into W =
ceil(V / 32) uint32 words per position (``pack`` / ``unpack``): V / 8 bytes
instead of 4 V for a float mask, and the training forward needs no sort to
rebuild it. ``kept_logprobs`` is the one function that renormalises over K:
the sampler and the training side (keep sampling mask, dsax.rl.policy) both
use it, so at theta = theta_old the two agree bit for bit.

Axes beyond DESIGN's key: W the 32-token words of a packed vocab mask.
Leading axes are any (written B).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

WORD = 32  # tokens per mask word


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the rollout samples (hashable: a static argument)."""
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0            # 0: off
  top_p: float = 1.0        # >= 1: off

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0, got "
                       f"{self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got "
                       f"{self.top_k}")
    if not 0.0 < self.top_p:
      raise ValueError(f"SamplingConfig.top_p must be > 0 (>= 1 = off), got "
                       f"{self.top_p}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Draw:
  """One sampled token per row and what the sampler kept."""
  token: jax.Array  # [B] int32
  logp: jax.Array   # [B] f32: log pi_old(token), renormalised over K
  bits: jax.Array   # [B, W] uint32: K packed (``unpack``)
  count: jax.Array  # [B] int32: |K|


def scaled(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """z = logits / temperature in f32 (the logits themselves when greedy)."""
  z_BV = logits_BV.astype(jnp.float32)
  return z_BV if cfg.temperature == 0.0 else z_BV / cfg.temperature


def kept_mask(z_BV: jax.Array, cfg: SamplingConfig):
  """(mask_BV bool, count_B int32): the kept set K of each row of scaled
  logits ``z_BV`` (module docstring)."""
  v = z_BV.shape[-1]
  top_k = 1 if cfg.temperature == 0.0 else cfg.top_k
  n_k = v if top_k == 0 else min(top_k, v)
  order_BV = jnp.argsort(-z_BV, axis=-1, stable=True)
  rank_BV = jnp.argsort(order_BV, axis=-1, stable=True)
  if cfg.top_p >= 1.0 or n_k == 1:
    count_B = jnp.full(z_BV.shape[:-1], n_k, jnp.int32)
  else:
    zs_BV = jnp.take_along_axis(z_BV, order_BV, axis=-1)
    in_k_BV = jax.lax.broadcast_to_rank(jnp.arange(v) < n_k, zs_BV.ndim)
    p_BV = jax.nn.softmax(jnp.where(in_k_BV, zs_BV, -jnp.inf), axis=-1)
    before_BV = jnp.cumsum(p_BV, axis=-1) - p_BV
    # Kept: inside the top-k and less than top_p of mass before it. Both are
    # prefixes of the order, so the count says it all.
    count_B = jnp.maximum(
        jnp.sum(in_k_BV & (before_BV < cfg.top_p), axis=-1), 1).astype(
            jnp.int32)
  return rank_BV < count_B[..., None], count_B


def kept_logprobs(z_BV: jax.Array, mask_BV: jax.Array) -> jax.Array:
  """log softmax of ``z_BV`` over the kept tokens (-inf elsewhere), f32."""
  return jax.nn.log_softmax(jnp.where(mask_BV, z_BV, -jnp.inf), axis=-1)


def pack(mask_BV: jax.Array) -> jax.Array:
  """Bool [..., V] -> uint32 [..., W]: bit j of word w is token 32 w + j."""
  v = mask_BV.shape[-1]
  w = -(-v // WORD)
  pad = [(0, 0)] * (mask_BV.ndim - 1) + [(0, w * WORD - v)]
  m = jnp.pad(mask_BV, pad).reshape(mask_BV.shape[:-1] + (w, WORD))
  shifts = jax.lax.broadcast_to_rank(jnp.arange(WORD, dtype=jnp.uint32),
                                     m.ndim)
  return jnp.sum(m.astype(jnp.uint32) << shifts, axis=-1, dtype=jnp.uint32)


def unpack(bits_BW: jax.Array, v: int) -> jax.Array:
  """uint32 [..., W] -> bool [..., V] (``pack``'s inverse)."""
  shifts = jax.lax.broadcast_to_rank(jnp.arange(WORD, dtype=jnp.uint32),
                                     bits_BW.ndim + 1)
  m = (bits_BW[..., None] >> shifts) & jnp.uint32(1)
  return m.reshape(bits_BW.shape[:-1] + (-1,))[..., :v].astype(bool)


def sample(logits_BV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> Draw:
  """Draws one token per row from softmax(z) over the kept set K."""
  z_BV = scaled(logits_BV, cfg)
  mask_BV, count_B = kept_mask(z_BV, cfg)
  logp_BV = kept_logprobs(z_BV, mask_BV)
  token_B = jax.random.categorical(key, logp_BV, axis=-1).astype(jnp.int32)
  logp_B = jnp.take_along_axis(logp_BV, token_B[..., None], axis=-1)[..., 0]
  return Draw(token_B, logp_B, pack(mask_BV), count_B)
