"""RL sampling (dsax.rl.sampling): the kept set of temperature / top-k / top-p
equals a float64 numpy reference, the packed record round-trips, the
sampler's log-prob is the renormalised one, and draws follow the
renormalised distribution (chi-square)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dsax.rl import sampling
from dsax.rl.sampling import SamplingConfig


def ref_kept(logits_V, temperature, top_k, top_p):
  """(kept ids as a sorted list, the renormalised probabilities over them,
  the distance of top_p from the nearest mass boundary)."""
  z = np.asarray(logits_V, np.float64)
  if temperature > 0:
    z = z / temperature
  else:
    top_k = 1
  v = z.shape[0]
  order = np.argsort(-z, kind="stable")
  nk = v if top_k == 0 else min(top_k, v)
  zs = z[order[:nk]]
  p = np.exp(zs - zs.max())
  p /= p.sum()
  margin = np.inf
  if top_p >= 1.0:
    count = nk
  else:
    before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
    count = max(1, int(np.sum(before < top_p)))
    margin = float(np.min(np.abs(before - top_p)))
  kept = order[:count]
  q = np.exp(z[kept] - z[kept].max())
  probs = np.zeros(v)
  probs[kept] = q / q.sum()
  return sorted(kept.tolist()), probs, margin


CONFIGS = [SamplingConfig(1.0, 0, 1.0), SamplingConfig(0.7, 5, 1.0),
           SamplingConfig(1.3, 0, 0.8), SamplingConfig(1.0, 12, 0.6),
           SamplingConfig(0.5, 3, 0.95), SamplingConfig(0.0, 0, 1.0),
           SamplingConfig(2.0, 1, 0.5), SamplingConfig(1.0, 100, 0.3)]


@pytest.mark.parametrize("scfg", CONFIGS, ids=str)
def test_kept_set_matches_numpy(scfg):
  v = 37  # not a multiple of 32: the last mask word is partial
  logits = np.array(jax.random.normal(jax.random.PRNGKey(0), (64, v)) * 2.5)
  # Ties: whole-number logits; the lower id wins, as in select_topk.
  logits[:8] = np.round(logits[:8])
  mask, count = sampling.kept_mask(sampling.scaled(jnp.asarray(logits), scfg),
                                   scfg)
  draw = sampling.sample(jnp.asarray(logits), jax.random.PRNGKey(1), scfg)
  mask, count = np.asarray(mask), np.asarray(count)
  unpacked = np.asarray(sampling.unpack(draw.bits, v))
  assert draw.bits.shape == (64, 2) and draw.bits.dtype == jnp.uint32
  checked = 0
  for b in range(64):
    kept, probs, margin = ref_kept(logits[b], scfg.temperature, scfg.top_k,
                                   scfg.top_p)
    if margin < 1e-5:  # f32 cumsum may fall either side of top_p
      continue
    checked += 1
    assert np.flatnonzero(mask[b]).tolist() == kept, b
    assert np.flatnonzero(unpacked[b]).tolist() == kept, b
    assert count[b] == len(kept) == int(draw.count[b])
    tok = int(draw.token[b])
    assert tok in kept
    np.testing.assert_allclose(float(draw.logp[b]), np.log(probs[tok]),
                               atol=2e-6)
  assert checked >= 60


def test_pack_round_trip():
  for v in (1, 31, 32, 33, 64, 100):
    m = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(v), 0.3,
                                        (3, 5, v)))
    bits = sampling.pack(jnp.asarray(m))
    assert bits.shape == (3, 5, -(-v // 32)) and bits.dtype == jnp.uint32
    np.testing.assert_array_equal(sampling.unpack(bits, v), m)
  # Bit j of word w is token 32 w + j.
  m = np.zeros(40, bool)
  m[[0, 5, 33]] = True
  np.testing.assert_array_equal(sampling.pack(jnp.asarray(m)),
                                [1 + 32, 2])


@pytest.mark.parametrize("scfg", [SamplingConfig(0.8, 6, 0.9),
                                  SamplingConfig(1.0, 0, 0.7),
                                  SamplingConfig(1.5, 4, 1.0)], ids=str)
def test_draw_frequencies_follow_the_renormalised_distribution(scfg):
  v, n = 12, 40_000
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (v,)) * 1.5)
  kept, probs, margin = ref_kept(logits, scfg.temperature, scfg.top_k,
                                 scfg.top_p)
  assert margin > 1e-3 and len(kept) >= 2
  draw = jax.jit(sampling.sample, static_argnums=2)(
      jnp.broadcast_to(jnp.asarray(logits), (n, v)), jax.random.PRNGKey(4),
      scfg)
  counts = np.bincount(np.asarray(draw.token), minlength=v)
  assert counts[[i for i in range(v) if i not in kept]].sum() == 0
  expected = probs[kept] * n
  chi2 = float(np.sum((counts[kept] - expected) ** 2 / expected))
  # Fails one time in 10^4 when the sampler is right.
  assert chi2 < stats.chi2.ppf(1 - 1e-4, len(kept) - 1), (chi2, counts)
  # The sampler's log-prob of each draw is the renormalised one.
  np.testing.assert_allclose(np.exp(np.asarray(draw.logp)),
                             probs[np.asarray(draw.token)], rtol=1e-5)


def test_greedy_and_config_checks():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 3.0]])
  d = sampling.sample(logits, jax.random.PRNGKey(0), SamplingConfig(0.0))
  assert int(d.token[0]) == 1 and float(d.logp[0]) == 0.0
  assert int(d.count[0]) == 1
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(-1.0)
  with pytest.raises(ValueError, match="top_k"):
    SamplingConfig(1.0, -2)
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(1.0, 0, 0.0)
