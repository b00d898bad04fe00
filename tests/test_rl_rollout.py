"""Rollouts (dsax.rl.rollout) and the training side's log-probabilities
(dsax.rl.policy): records, EOS and the length cap; index replay reproduces
the sampler's log-probs (MLA and GQA, and with MoE keep routing) where
re-selecting does not, and a perturbed recorded index changes them; the
keep-sampling-mask ratio at theta = theta_old on real rollouts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init, tiny
from dsax import model
from dsax.attention import AttentionMode
from dsax.config import MoEConfig
from dsax.rl import grpo, policy, sampling
from dsax.rl import rollout as R
from dsax.rl.grpo import GRPOConfig

P, N = 12, 8  # prompt longer than k = 4
SCFG = sampling.SamplingConfig(1.0, 20, 0.95)
RCFG = R.RolloutConfig(group_size=2, max_new_tokens=N, sampling=SCFG)


def dsa_cfg(**kw):
  cfg = tiny(init_std=0.1, attn_q_chunk=8, **kw)
  return dataclasses.replace(cfg, indexer=dataclasses.replace(
      cfg.indexer, topk=4, q_chunk=8))


def fp8_sampler(cfg):
  """The sampler's numerics differ from the trainer's (an FP8 indexer, as
  inference engines run it): its top-k sets differ at some positions."""
  return dataclasses.replace(cfg, indexer=dataclasses.replace(cfg.indexer,
                                                              fp8=True))


def prompts(o=2, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (o, P), 0, 256)


def max_gap(ro, logp):
  return float(jnp.max(jnp.abs(jnp.where(ro.mask, logp - ro.logp, 0.0))))


def test_rollout_records_dense():
  cfg = tiny(init_std=0.1)
  params = init(cfg)
  scfg = sampling.SamplingConfig(1.0, 8)
  rcfg = R.RolloutConfig(group_size=3, max_new_tokens=6, sampling=scfg)
  pr = prompts()
  ro = R.rollout(params, pr, jax.random.PRNGKey(2), cfg, rcfg)
  b = 6
  assert ro.tokens.shape == (b, P + 6) and ro.prompt_len == P
  assert ro.idx is None and ro.experts is None
  np.testing.assert_array_equal(ro.tokens[:, :P], np.repeat(pr, 3, axis=0))
  assert bool(ro.mask.all())  # no EOS: the cap
  assert ro.kept_bits.shape == (b, 6, 8) and bool(jnp.all(ro.kept_count == 8))
  kept = sampling.unpack(ro.kept_bits, 256)
  assert bool(jnp.all(jnp.take_along_axis(kept, ro.completion[..., None],
                                          -1)))
  # The expanded forward, teacher-forced on the samples, gives the sampler's
  # log-probs (renormalised over its kept sets) and the same kept sets.
  logits, _ = model.forward(params, ro.tokens[:, :-1], cfg)
  z = sampling.scaled(logits[:, P - 1:], scfg)
  np.testing.assert_array_equal(sampling.kept_mask(z, scfg)[0], kept)
  lp, _ = policy.completion_logprobs(params, ro, cfg, GRPOConfig(), scfg)
  assert max_gap(ro, lp) < 1e-5
  # Samples differ within a group (a draw per row, not per prompt).
  assert bool(jnp.any(ro.completion[0] != ro.completion[1]))
  # EOS: the token row 0 drew at step 2 ends it there (same key, same draws
  # up to it); a row stops at its first EOS and is padded after.
  eos = int(ro.completion[0, 2])
  ro2 = R.rollout(params, pr, jax.random.PRNGKey(2), cfg,
                  dataclasses.replace(rcfg, eos_id=eos, pad_id=7))
  np.testing.assert_array_equal(ro2.mask[0], [1, 1, 1, 0, 0, 0])
  for row, m, c in zip(ro.completion, ro2.mask, ro2.completion):
    hits = np.flatnonzero(np.asarray(row) == eos)
    n = 6 if not len(hits) else hits[0] + 1
    np.testing.assert_array_equal(m, np.arange(6) < n)
    np.testing.assert_array_equal(c[:n], row[:n])
    assert bool(jnp.all(c[n:] == 7))


@pytest.mark.parametrize("attention_type", ["mla", "gqa"])
def test_index_replay_reproduces_sampler_logprobs(attention_type):
  kw = (dict(attention_type="gqa", n_heads=4, n_kv_heads=2, head_dim=16)
        if attention_type == "gqa" else {})
  cfg = dsa_cfg(**kw)
  params = init(cfg)
  mode = AttentionMode.of(cfg, "sparse")
  ro = R.rollout(params, prompts(), jax.random.PRNGKey(2), fp8_sampler(cfg),
                 RCFG, mode)
  assert ro.idx.shape == (cfg.n_layers, 4, P + N - 1, 4)
  gcfg = GRPOConfig()
  lp, _ = policy.completion_logprobs(params, ro, cfg, gcfg, SCFG, mode)
  assert max_gap(ro, lp) < 1e-5
  # Re-running the (f32) indexer picks other sets than the sampler did.
  off = dataclasses.replace(gcfg, index_replay=False)
  lp_off, _ = policy.completion_logprobs(params, ro, cfg, off, SCFG, mode)
  assert max_gap(ro, lp_off) > 1e-3
  # One recorded index moved (layer 0, row 0, the input of completion token
  # 3) to a visible key outside its set: that token's log-prob and later
  # ones change, earlier ones do not.
  t = P + 2
  chosen = set(np.asarray(ro.idx[0, 0, t])[np.asarray(ro.valid[0, 0, t])])
  other = min(set(range(t + 1)) - chosen)
  bad = dataclasses.replace(ro, idx=ro.idx.at[0, 0, t, 0].set(other))
  lp_bad, _ = policy.completion_logprobs(params, bad, cfg, gcfg, SCFG, mode)
  diff = np.abs(np.asarray(lp_bad - lp))
  assert diff[0, 3:].max() > 1e-6 and diff[0, :3].max() == 0.0
  assert diff[1:].max() == 0.0


def test_recorded_sets_are_the_forward_sets_and_placeholders():
  """Same numerics: the recorded key sets are the sparse forward's own top-k
  at every input position. A batch that ends early (every row hit EOS)
  fills the rest with placeholders, and the replayed forward stays
  finite."""
  cfg = dsa_cfg()
  params = init(cfg)
  mode = AttentionMode.of(cfg, "sparse")
  ro = R.rollout(params, prompts(), jax.random.PRNGKey(2), cfg, RCFG, mode)
  _, aux = model.forward(params, ro.tokens[:, :-1], cfg,
                         mode=dataclasses.replace(mode, indices=True))
  for key in np.ndindex(*ro.idx.shape[:3]):
    ours = set(np.asarray(ro.idx[key])[np.asarray(ro.valid[key])].tolist())
    fwd = set(np.asarray(aux.idx[key])[np.asarray(aux.valid[key])].tolist())
    assert ours == fwd, key
  # Greedy, one prompt, two identical rows, EOS = the greedy token at step 1.
  greedy = R.RolloutConfig(group_size=2, max_new_tokens=N,
                           sampling=sampling.SamplingConfig(0.0))
  ro_g = R.rollout(params, prompts(1), jax.random.PRNGKey(3), cfg, greedy,
                   mode)
  eos = int(ro_g.completion[0, 1])
  ro_e = R.rollout(params, prompts(1), jax.random.PRNGKey(3), cfg,
                   dataclasses.replace(greedy, eos_id=eos), mode)
  np.testing.assert_array_equal(ro_e.mask.sum(-1), [2, 2])
  # Inputs P + 1 .. were never decoded: the query alone.
  np.testing.assert_array_equal(ro_e.idx[:, :, P + 1:, 0],
                                np.broadcast_to(np.arange(P + 1, P + N - 1),
                                                (2, 2, N - 2)))
  assert not bool(ro_e.valid[:, :, P + 1:, 1:].any())
  lp, _ = policy.completion_logprobs(params, ro_e, cfg, GRPOConfig(),
                                     greedy.sampling, mode)
  assert bool(jnp.all(jnp.isfinite(jnp.where(ro_e.mask, lp, 0.0))))
  assert max_gap(ro_e, lp) < 1e-5


def test_keep_routing_and_replay_with_moe():
  """DSA + MoE (V3 routing: sigmoid scores, selection-only bias). The
  trainer's router bias has moved since sampling (it moves every step), so
  re-routing picks other experts; keep routing forces the recorded ones and
  the replayed forward reproduces the sampler's log-probs."""
  cfg = dsa_cfg(n_layers=3, moe=MoEConfig(
      n_routed_experts=6, n_activated=2, d_expert=8, n_group=3, topk_group=2,
      topk_method="noaux_tc", score_func="sigmoid", first_k_dense=1))
  params = init(cfg)
  mode = AttentionMode.of(cfg, "sparse")
  ro = R.rollout(params, prompts(), jax.random.PRNGKey(2), fp8_sampler(cfg),
                 RCFG, mode)
  assert ro.experts.shape == (2, 4, P + N - 1, 2)
  _, aux = model.forward(params, ro.tokens[:, :-1], fp8_sampler(cfg),
                         mode=dataclasses.replace(mode, selection="given",
                                                  experts=True),
                         selection=(ro.idx, ro.valid))
  np.testing.assert_array_equal(jnp.sort(aux.experts, -1),
                                jnp.sort(ro.experts, -1))
  moved = dict(params, moe=dict(params["moe"], router_bias=jax.random.normal(
      jax.random.PRNGKey(9), params["moe"]["router_bias"].shape)))
  gcfg = GRPOConfig()
  lp, _ = policy.completion_logprobs(moved, ro, cfg, gcfg, SCFG, mode)
  assert max_gap(ro, lp) < 1e-5
  lp_rr, _ = policy.completion_logprobs(
      moved, ro, cfg, dataclasses.replace(gcfg, keep_routing=False), SCFG,
      mode)
  assert max_gap(ro, lp_rr) > 1e-3
  lp_ir, _ = policy.completion_logprobs(
      moved, ro, cfg, dataclasses.replace(gcfg, index_replay=False), SCFG,
      mode)
  assert max_gap(ro, lp_ir) > 1e-3


def test_keep_sampling_mask_ratio_on_rollouts():
  """theta = theta_old, replayed: with the kept sets the ratio is 1 on
  every token (to float error between the decode and the expanded
  forward); over all V it is the kept mass of each position."""
  cfg = dsa_cfg()
  params = init(cfg)
  mode = AttentionMode.of(cfg, "sparse")
  scfg = sampling.SamplingConfig(0.8, 6, 0.7)
  rcfg = dataclasses.replace(RCFG, sampling=scfg)
  ro = R.rollout(params, prompts(), jax.random.PRNGKey(4), cfg, rcfg, mode)
  gcfg = GRPOConfig()
  lp, _ = policy.completion_logprobs(params, ro, cfg, gcfg, scfg, mode)
  ratio = np.asarray(jnp.exp(lp - ro.logp))
  np.testing.assert_allclose(ratio, 1.0, atol=1e-5)
  lp_full, _ = policy.completion_logprobs(
      params, ro, cfg, dataclasses.replace(gcfg, keep_sampling_mask=False),
      scfg, mode)
  logits, _ = model.forward(params, ro.tokens[:, :-1], cfg,
                            mode=dataclasses.replace(mode, selection="given"),
                            selection=(ro.idx, ro.valid))
  z = np.asarray(logits[:, P - 1:], np.float64) / 0.8
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  mass = np.sum(p * np.asarray(sampling.unpack(ro.kept_bits, 256)), -1)
  assert mass.max() < 0.99
  np.testing.assert_allclose(np.exp(np.asarray(lp_full - ro.logp)), mass,
                             rtol=1e-5)
  # The GRPO loss on it (pi_ref = pi_old here): finite gradients, and at
  # theta = theta_old no drift and no clipping.
  adv = grpo.advantages(jnp.arange(4.0), 2)

  def loss_fn(p):
    logp, _ = policy.completion_logprobs(p, ro, cfg, gcfg, scfg, mode)
    return grpo.loss(logp, ro.logp, ro.logp, adv, ro.mask, gcfg)

  (val, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  assert np.isfinite(float(val)) and float(metrics["mismatch"]) < 1e-5
  assert float(metrics["clip_frac"]) == 0.0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
