"""The GRPO objective with DeepSeek-V3.2's stabilisers, as pure functions over
per-token log-probabilities (../shared/RL.md has the maths).

Rows are completions (B = O prompts x G samples, prompt-major), T their
token positions, ``mask_BT`` the generated tokens. Per token:
  r     = pi_theta / pi_old = exp(logp - logp_old)      (not detached)
  pg    = min(r A, clip(r, 1 - eps, 1 + eps) A)
  k3    = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1
  KL    = r k3    (``unbiased_kl``: unbiased for KL(pi_theta || pi_ref) and
                   its gradient under samples from pi_old)   else k3
  J     = mean_i (1 / |o_i|) sum_t (pg M_i - beta KL)
and the loss is -J. Advantages (``advantages``): A_i = r_i - mean of the
group, divided by the group's std (population, + eps) when
``std_normalise``. Sequence mask (``sequence_mask``, ``seq_mask``): M_i = 0
when A_i < 0 and mean_t log(pi_old / pi_theta) > delta, else 1; it masks the
policy-gradient term only. The other switches (``keep_sampling_mask``,
``index_replay``, ``keep_routing``) decide how the log-probabilities are
computed (dsax.rl.policy); they are here so one config ablates all five.

Axes beyond DESIGN's key: O prompts, Y samples of one prompt (G in RL.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """The GRPO loss and its five switches (hashable: a static argument)."""
  group_size: int = 4            # G completions per prompt
  clip_eps: float = 0.2          # PPO clip
  kl_coef: float = 0.01          # beta (0: no KL term)
  std_normalise: bool = True     # A / std of the group
  adv_eps: float = 1e-6          # A / (std + adv_eps)
  unbiased_kl: bool = True       # KL = (pi_theta / pi_old) k3, else k3
  seq_mask: bool = True          # off-policy sequence masking
  seq_mask_delta: float = 0.5    # its threshold on mean log(pi_old/pi_theta)
  keep_routing: bool = True      # MoE: force the sampled experts
  keep_sampling_mask: bool = True  # renormalise over the kept token sets
  index_replay: bool = True      # DSA: attend to the sampled key sets

  def __post_init__(self):
    if self.group_size < 1:
      raise ValueError(f"GRPOConfig.group_size must be >= 1, got "
                       f"{self.group_size}")
    if not 0.0 <= self.clip_eps < 1.0:
      raise ValueError(f"GRPOConfig.clip_eps must be in [0, 1), got "
                       f"{self.clip_eps}")
    if self.kl_coef < 0:
      raise ValueError(f"GRPOConfig.kl_coef must be >= 0, got "
                       f"{self.kl_coef}")
    if self.adv_eps <= 0:
      raise ValueError(f"GRPOConfig.adv_eps must be > 0, got "
                       f"{self.adv_eps}")


def advantages(reward_B: jax.Array, group_size: int,
               std_normalise: bool = True, eps: float = 1e-6) -> jax.Array:
  """Group-relative advantages A_B (f32): reward minus its group's mean,
  over its group's std + eps when ``std_normalise``. Rows are prompt-major
  groups of ``group_size``."""
  r_OY = reward_B.astype(jnp.float32).reshape(-1, group_size)
  a_OY = r_OY - jnp.mean(r_OY, axis=1, keepdims=True)
  if std_normalise:
    a_OY = a_OY / (jnp.std(r_OY, axis=1, keepdims=True) + eps)
  return a_OY.reshape(reward_B.shape)


def k3(logp_BT: jax.Array, logp_ref_BT: jax.Array) -> jax.Array:
  """k3 = x - log x - 1, x = pi_ref / pi_theta, per token."""
  d_BT = logp_ref_BT - logp_BT
  return jnp.exp(d_BT) - d_BT - 1.0


def kl_estimate(logp_BT: jax.Array, logp_old_BT: jax.Array,
                logp_ref_BT: jax.Array, unbiased: bool = True) -> jax.Array:
  """The per-token KL(pi_theta || pi_ref) estimate at tokens drawn from
  pi_old: (pi_theta / pi_old) k3 when ``unbiased`` (the ratio carries
  gradient: it supplies the score-function term), else k3."""
  est_BT = k3(logp_BT, logp_ref_BT)
  if unbiased:
    est_BT = jnp.exp(logp_BT - logp_old_BT) * est_BT
  return est_BT


def sequence_mask(adv_B: jax.Array, logp_BT: jax.Array,
                  logp_old_BT: jax.Array, mask_BT: jax.Array,
                  delta: float) -> jax.Array:
  """M_B (f32, no gradient): 0 where A < 0 and the mean over the row's
  tokens of log(pi_old / pi_theta) exceeds ``delta``, else 1."""
  m_BT = mask_BT.astype(jnp.float32)
  drift_BT = jax.lax.stop_gradient(logp_old_BT - logp_BT) * m_BT
  drift_B = jnp.sum(drift_BT, -1) / jnp.maximum(jnp.sum(m_BT, -1), 1.0)
  off_B = (adv_B < 0) & (drift_B > delta)
  return 1.0 - off_B.astype(jnp.float32)


def token_means(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Mean over each row's tokens, then over rows with a token: a scalar."""
  m_BT = mask_BT.astype(jnp.float32)
  n_B = jnp.sum(m_BT, -1)
  row_B = jnp.sum(x_BT * m_BT, -1) / jnp.maximum(n_B, 1.0)
  has_B = (n_B > 0).astype(jnp.float32)
  return jnp.sum(row_B * has_B) / jnp.maximum(jnp.sum(has_B), 1.0)


def loss(logp_BT: jax.Array, logp_old_BT: jax.Array, logp_ref_BT: jax.Array,
         adv_B: jax.Array, mask_BT: jax.Array, gcfg: GRPOConfig):
  """(loss, metrics): -J (module docstring). ``logp_BT`` carries the
  gradient; pi_old and pi_ref are data. Positions outside ``mask_BT`` may
  hold anything (e.g. -inf off the kept set): they are zeroed first."""
  mask_BT = mask_BT.astype(bool)
  zero = lambda x_BT: jnp.where(mask_BT, x_BT, 0.0)  # noqa: E731
  logp_BT = zero(logp_BT)
  logp_old_BT = zero(jax.lax.stop_gradient(logp_old_BT))
  logp_ref_BT = zero(jax.lax.stop_gradient(logp_ref_BT))
  adv_B = jax.lax.stop_gradient(adv_B)
  ratio_BT = jnp.exp(logp_BT - logp_old_BT)
  a_B1 = adv_B[:, None]
  clipped_BT = jnp.clip(ratio_BT, 1.0 - gcfg.clip_eps, 1.0 + gcfg.clip_eps)
  pg_BT = jnp.minimum(ratio_BT * a_B1, clipped_BT * a_B1)
  if gcfg.seq_mask:
    keep_B = sequence_mask(adv_B, logp_BT, logp_old_BT, mask_BT,
                           gcfg.seq_mask_delta)
  else:
    keep_B = jnp.ones(adv_B.shape, jnp.float32)
  kl_BT = kl_estimate(logp_BT, logp_old_BT, logp_ref_BT, gcfg.unbiased_kl)
  objective = token_means(pg_BT * keep_B[:, None] - gcfg.kl_coef * kl_BT,
                          mask_BT)
  sg = jax.lax.stop_gradient
  m_BT = mask_BT.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m_BT), 1.0)
  metrics = {
      "kl": token_means(sg(kl_BT), mask_BT),
      "clip_frac": jnp.sum((sg(ratio_BT) != sg(clipped_BT)) * m_BT) / n,
      "ratio": jnp.sum(sg(ratio_BT) * m_BT) / n,
      "masked_frac": 1.0 - jnp.mean(keep_B),
      "mismatch": jnp.sum(jnp.abs(sg(logp_BT) - logp_old_BT) * m_BT) / n,
  }
  return -objective, metrics
