"""The GRPO loss (dsax.rl.grpo): the ratio-weighted k3 is unbiased for
KL(pi_theta || pi_ref) and its gradient under pi_old (exact enumeration)
and the plain k3 is not; group advantages; the off-policy sequence mask on
hand-built cases; the loss against a numpy reference; the keep-sampling-mask
ratio at theta = theta_old."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsax.rl import grpo, policy, sampling
from dsax.rl.grpo import GRPOConfig


def _logits(seed, v=7, scale=1.0):
  return jax.random.normal(jax.random.PRNGKey(seed), (v,)) * scale


def _expected_estimate(theta_V, old_V, ref_V, unbiased):
  """E_{o ~ pi_old}[estimate(o)], exactly: sum over the V outcomes."""
  logp_V = jax.nn.log_softmax(theta_V)
  logp_old_V = jax.lax.stop_gradient(jax.nn.log_softmax(old_V))
  logp_ref_V = jax.nn.log_softmax(ref_V)
  est_V = grpo.kl_estimate(logp_V, logp_old_V, logp_ref_V, unbiased)
  return jnp.sum(jnp.exp(logp_old_V) * est_V)


def _true_kl(theta_V, ref_V):
  logp_V = jax.nn.log_softmax(theta_V)
  return jnp.sum(jnp.exp(logp_V) * (logp_V - jax.nn.log_softmax(ref_V)))


@pytest.mark.parametrize("at_old", [False, True])
def test_ratio_weighted_k3_gradient_is_the_kl_gradient(at_old):
  with jax.enable_x64(True):
    theta = _logits(0).astype(jnp.float64)
    old = theta if at_old else _logits(1, scale=0.7).astype(jnp.float64)
    ref = _logits(2, scale=1.3).astype(jnp.float64)
    want = jax.grad(_true_kl)(theta, ref)
    got = jax.grad(_expected_estimate)(theta, old, ref, True)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(_expected_estimate(theta, old, ref, True),
                               _true_kl(theta, ref), atol=1e-6, rtol=0)
    # The plain k3 under pi_old's samples: the gradient is wrong, even at
    # theta = theta_old (its value is right there, the gradient is not).
    plain = jax.grad(_expected_estimate)(theta, old, ref, False)
    gap = float(jnp.max(jnp.abs(plain - want)))
    assert gap > 1e-2, gap
  # f32 as the loss runs: still within 1e-6.
  theta32, old32, ref32 = (x.astype(jnp.float32) for x in (theta, old, ref))
  np.testing.assert_allclose(
      jax.grad(_expected_estimate)(theta32, old32, ref32, True),
      np.asarray(want, np.float32), atol=1e-6, rtol=0)


def test_advantages():
  r = jnp.asarray([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 1.0,
                   0.0])
  g = 4
  a = np.asarray(grpo.advantages(r, g, std_normalise=False))
  rn = np.asarray(r).reshape(-1, g)
  np.testing.assert_allclose(a, (rn - rn.mean(1, keepdims=True)).ravel(),
                             atol=1e-6)
  a = np.asarray(grpo.advantages(r, g, std_normalise=True, eps=1e-6))
  want = (rn - rn.mean(1, keepdims=True)) / (rn.std(1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(a, want.ravel(), atol=1e-5)
  assert np.all(a[4:8] == 0.0)  # a group with one reward has no signal


def test_sequence_mask_hand_built():
  delta = 0.5
  # Row drifts (mean over generated tokens of log pi_old - log pi_theta):
  # 0.6 > delta, 0.4 < delta; the padding position (mask False) holds a
  # huge value that must not count.
  old = jnp.asarray([[-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
  theta_hi = jnp.asarray([-1.6, -1.6, -100.0])  # drift 0.6
  theta_lo = jnp.asarray([-1.4, -1.4, -100.0])  # drift 0.4
  mask = jnp.asarray([[True, True, False]] * 2)
  cases = [  # (advantage, theta row, kept?)
      (-1.0, theta_hi, 0.0),   # negative and drifted: masked
      (-1.0, theta_lo, 1.0),   # negative, within delta
      (1.0, theta_hi, 1.0),    # positive: never masked
      (1.0, theta_lo, 1.0),
      (0.0, theta_hi, 1.0),    # A = 0 is not negative
      (-0.01, theta_hi, 0.0),
  ]
  for adv, th, want in cases:
    m = grpo.sequence_mask(jnp.asarray([adv, adv]), jnp.stack([th, th]), old,
                           mask, delta)
    np.testing.assert_array_equal(m, [want, want], err_msg=str((adv, th)))
  # Exactly at delta: "exceeds" is strict.
  at = jnp.asarray([[-1.5, -1.5, 0.0]])
  assert float(grpo.sequence_mask(jnp.asarray([-1.0]), at, old[:1], mask[:1],
                                  delta)[0]) == 1.0


def _np_loss(logp, old, ref, adv, mask, cfg):
  """A plain loop over rows and tokens of RL.md's objective."""
  rows = []
  for i in range(logp.shape[0]):
    ts = np.flatnonzero(mask[i])
    if not len(ts):
      continue
    drift = np.mean(old[i, ts] - logp[i, ts])
    m = 0.0 if (cfg.seq_mask and adv[i] < 0 and
                drift > cfg.seq_mask_delta) else 1.0
    total = 0.0
    for t in ts:
      r = np.exp(logp[i, t] - old[i, t])
      pg = min(r * adv[i], np.clip(r, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
               * adv[i])
      x = np.exp(ref[i, t] - logp[i, t])
      kl = x - np.log(x) - 1
      if cfg.unbiased_kl:
        kl *= r
      total += pg * m - cfg.kl_coef * kl
    rows.append(total / len(ts))
  return -np.mean(rows)


@pytest.mark.parametrize("cfg", [
    GRPOConfig(), GRPOConfig(unbiased_kl=False, seq_mask=False),
    GRPOConfig(kl_coef=0.1, clip_eps=0.1, seq_mask_delta=0.05)], ids=str)
def test_loss_matches_numpy(cfg):
  b, t = 8, 6
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  old = -jax.random.uniform(ks[0], (b, t), minval=0.1, maxval=3.0)
  logp = old + 0.3 * jax.random.normal(ks[1], (b, t))
  ref = old + 0.3 * jax.random.normal(ks[2], (b, t))
  adv = jax.random.normal(ks[3], (b,))
  lengths = np.asarray([6, 3, 1, 0, 6, 5, 2, 4])
  mask = jnp.asarray(np.arange(t)[None] < lengths[:, None])
  # Off the mask: -inf, as a token outside the kept set would give.
  logp = jnp.where(mask, logp, -jnp.inf)
  got, metrics = grpo.loss(logp, old, ref, adv, mask, cfg)
  want = _np_loss(*(np.asarray(x, np.float64) for x in (logp, old, ref, adv)),
                  np.asarray(mask), cfg)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda x: grpo.loss(x, old, ref, adv, mask, cfg)[0])(logp)
  assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(g[~mask] == 0))
  assert 0.0 <= float(metrics["clip_frac"]) <= 1.0
  assert set(metrics) == {"kl", "clip_frac", "ratio", "masked_frac",
                          "mismatch"}


def test_sequence_mask_removes_only_the_policy_gradient():
  cfg = GRPOConfig(kl_coef=0.5, seq_mask_delta=0.1)
  old = jnp.asarray([[-1.0, -1.0]])
  logp = jnp.asarray([[-1.15, -1.15]])  # drift 0.15 > 0.1, ratio unclipped
  ref = jnp.asarray([[-1.2, -0.8]])
  mask = jnp.ones((1, 2), bool)
  adv = jnp.asarray([-1.0])
  g = jax.grad(lambda x: grpo.loss(x, old, ref, adv, mask, cfg)[0])(logp)
  kl_only = jax.grad(lambda x: 0.5 * grpo.token_means(grpo.kl_estimate(
      x, old, ref), mask))(logp)
  np.testing.assert_allclose(g, kl_only, atol=1e-7)
  off = GRPOConfig(kl_coef=0.5, seq_mask=False)
  g_off = jax.grad(lambda x: grpo.loss(x, old, ref, adv, mask, off)[0])(logp)
  assert float(jnp.max(jnp.abs(g_off - kl_only))) > 1e-2
  _, metrics = grpo.loss(logp, old, ref, adv, mask, cfg)
  assert float(metrics["masked_frac"]) == 1.0


def test_keep_sampling_mask_ratio_at_theta_old():
  """Same logits on both sides: renormalised over the recorded kept set the
  ratio is exactly 1 on every token; over all V it is the kept mass."""
  scfg = sampling.SamplingConfig(0.9, 6, 0.8)
  b, t, v = 3, 5, 40
  logits = jax.random.normal(jax.random.PRNGKey(5), (b, t, v)) * 2.0
  draw = sampling.sample(logits.reshape(b * t, v), jax.random.PRNGKey(6),
                         scfg)
  tok = draw.token.reshape(b, t)
  old = draw.logp.reshape(b, t)
  bits = draw.bits.reshape(b, t, -1)
  kept = policy.token_logprobs(logits, tok, scfg, bits)
  np.testing.assert_array_equal(np.exp(np.asarray(kept - old)), 1.0)
  full = policy.token_logprobs(logits, tok, scfg, None)
  z = np.asarray(logits, np.float64) / 0.9
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  mass = np.sum(p * np.asarray(sampling.unpack(bits, v)), -1)
  assert np.all(mass < 1.0 - 1e-3)  # truncation did cut something
  np.testing.assert_allclose(np.exp(np.asarray(full - old)), mass, rtol=2e-6)


def test_config_checks():
  with pytest.raises(ValueError, match="clip_eps"):
    GRPOConfig(clip_eps=1.5)
  with pytest.raises(ValueError, match="kl_coef"):
    GRPOConfig(kl_coef=-1.0)
  with pytest.raises(ValueError, match="group_size"):
    GRPOConfig(group_size=0)
  hash(GRPOConfig())  # a static argument
