"""Multi-turn tool-use rollouts (dsax.rl.agent): the pointer-chain store is
reachable only through its tool, the context policies under one budget, the
per-user-turn segments against Chat.turn_samples, and the segments'
log-probs under a training forward against the sampler's (dense, and DSA
with index replay)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init, tiny
from dsax.attention import AttentionMode
from dsax.chat import Assistant, Chat, SmolLM2, ToolCall, User
from dsax.rl import agent as A
from dsax.rl import grpo, policy, sampling
from dsax.rl.grpo import GRPOConfig
from dsax.tokenizer import Tokenizer

CHAT = Chat(SmolLM2(), base=Tokenizer("bytes"))
KEEP = Chat(SmolLM2(keep_reasoning=True), tokenizer=CHAT.tok)
CFG = tiny(vocab_size=CHAT.tok.vocab_size, init_std=0.1)
BUDGET, REPLY = 480, 112
FULL = sampling.SamplingConfig(1.0)   # no truncation: forced tokens finite


def follow(ctx):
  """Calls get on the key in the last message until a value comes back."""
  last = ctx[-1]
  key = last.content.split()[-1] if isinstance(last, User) else last.content
  if key.startswith("k"):
    return Assistant(reasoning="go", tool_calls=(ToolCall("get",
                                                          {"key": key}),))
  return Assistant(content=key)


def guess(ctx):
  """Answers without a tool: the start key's name."""
  return Assistant(content=ctx[-1].content.split()[-1])


def episodes():
  return [A.make_episode(np.random.default_rng(s), turns=2, hops=2)
          for s in range(2)]


@pytest.fixture(scope="module")
def params():
  return init(CFG)


def test_episode_and_trace():
  ep = A.make_episode(np.random.default_rng(0), turns=3, hops=3)
  env = A.PointerStore(ep.store)
  for start, answer in zip(ep.starts, ep.answers):
    key = start
    for _ in range(3):
      key = env(ToolCall("get", {"key": key}))
    assert key == answer and not answer.startswith("k")
  assert env(ToolCall("get", {"key": "zz"})) == "missing"
  assert env(ToolCall("put", {"key": "k1"})).startswith("error")
  conv = A.trace(ep)
  finals = [m.content for m in conv
            if isinstance(m, Assistant) and not m.tool_calls]
  assert finals == list(ep.answers)
  # The answers reach the conversation only through tool results.
  text = CHAT.encode([conv[0], conv[1]]).text
  assert not any(a in text for a in ep.answers)
  with pytest.raises(A.AgentError, match="turns"):
    A.make_episode(np.random.default_rng(0), turns=50, hops=3)
  with pytest.raises(A.AgentError, match="policy"):
    A.AgentConfig(policy="keep")


def test_episode_letters_and_short_keys():
  """The experiment's task: keys k0..k9, one upper-case letter per value;
  the trace's reasoning opens with what the last message ended with."""
  ep = A.make_episode(np.random.default_rng(1), turns=3, hops=2, n_keys=10,
                      value_len=1, letters=A.UPPER)
  assert all(len(k) == 2 and k[0] == "k" and k[1].isdigit()
             for k in ep.store)
  assert all(len(a) == 1 and a in A.UPPER for a in ep.answers)
  conv = A.trace(ep)
  for prev, m in zip(conv, conv[1:]):
    if isinstance(m, Assistant):
      assert m.reasoning.split()[0] == prev.content.split()[-1]
  assert A.oracle(conv[:-1]) == conv[-1]
  with pytest.raises(A.AgentError, match="letters"):
    A.make_episode(np.random.default_rng(0), letters="abk")


def check_segments(chat, traj):
  """Each segment is the prefix of its user turn's sample (what follows
  is prompt: the reply's line break), with the same generated mask;
  before a budget reset the turn's segments are cut short."""
  samples = chat.turn_samples(traj.messages)
  by_turn = {}
  for seg in traj.segments:
    by_turn.setdefault(seg.turn, []).append(seg)
  for turn, segs in by_turn.items():
    if turn >= len(samples):
      continue
    last, sample = segs[-1], samples[turn]
    n = len(last.ids)
    if traj.budget_events:   # the last segment was prompted after a drop
      continue
    np.testing.assert_array_equal(last.ids, sample.ids_T[:n])
    np.testing.assert_array_equal(last.gen, sample.mask_T[:n].astype(bool))
    assert not sample.mask_T[n:].any()


@pytest.fixture(scope="module")
def forced(params):
  """The tool-following policy under each context policy, one budget."""
  out = {}
  for pol in A.POLICIES:
    acfg = A.AgentConfig(policy=pol, budget=BUDGET, max_reply_tokens=REPLY,
                         sampling=FULL)
    sampler = A.AgentSampler(CFG, acfg, CHAT, KEEP)
    out[pol] = sampler.run(params, episodes()[:1], jax.random.PRNGKey(0),
                           force=follow)
  return out


def test_forced_policies_rewards_and_budget(params, forced):
  """One budget, three context policies, the tool-following policy and a
  guessing one, through the model's sampler (the policies' ids forced)."""
  out, eps = forced, episodes()[:1]
  # Turn 1 fits everywhere; turn 2's tool history does not: keep_all and
  # drop_reasoning stop there, discard_tools drops the history and answers.
  for pol, trajs in out.items():
    for t in trajs:
      want = [1.0, 1.0] if pol == "discard_tools" else [1.0, 0.0]
      assert t.rewards == want, (pol, t.stop)
      assert t.peak <= BUDGET
  assert all(t.stop == "budget" for t in out["drop_reasoning"])
  assert all(t.budget_events == 1 and t.stop == "answered"
             for t in out["discard_tools"])
  # keep_all's turn-2 prompt holds turn 1's reasoning; rule 1's does not.
  for t_keep, t_drop in zip(out["keep_all"], out["drop_reasoning"]):
    assert len(t_keep.segments[1].ids) > len(t_drop.segments[1].ids)
    assert "<think>\ngo" in KEEP.tok.decode(t_keep.segments[1].ids[:300])
    seg = t_drop.segments[1]
    assert "<think>" not in CHAT.tok.decode(seg.ids[:seg.gen.index(True)])
  check_segments(KEEP, out["keep_all"][0])
  check_segments(CHAT, out["drop_reasoning"][0])
  # The answer first appears in given tokens (a tool result), then the
  # model's copy of it is generated.
  for t in out["discard_tools"]:
    seg = t.segments[0]
    text = CHAT.tok.decode(seg.ids)
    answer = t.episode.answers[0]
    at = text.index(answer)
    assert text[at - 17:at] == "<|im_start|>tool\n"
    n = len(CHAT.tok.encode(text[:at]))
    assert not any(seg.gen[n:n + len(answer)])
    n = len(CHAT.tok.encode(text[:text.index(answer, at + 1)]))
    assert all(seg.gen[n:n + len(answer)])
  # A policy that never calls the tool cannot know the answers.
  acfg = A.AgentConfig(policy="drop_reasoning", budget=BUDGET,
                       max_reply_tokens=REPLY, sampling=FULL)
  trajs = A.AgentSampler(CFG, acfg, CHAT).run(params, eps,
                                              jax.random.PRNGKey(0),
                                              force=guess)
  assert all(t.rewards == [0.0, 0.0] and t.stop == "answered" for t in trajs)
  assert all(isinstance(m, (User, Assistant)) for t in trajs
             for m in t.messages[1:])


@pytest.mark.parametrize("sparse", [False, True])
def test_segment_logprobs_equal_training_forward(params, forced, sparse):
  """Segments of a multi-turn run with a budget reset (forced ids, full
  distribution) and of a sampled run (top-k / top-p kept sets): a training
  forward on each segment gives the sampler's log-probs (f32, 1e-5); DSA
  replays the key sets each decode step recorded."""
  cfg = CFG
  mode = None
  if sparse:
    cfg = dataclasses.replace(CFG, indexer=dataclasses.replace(
        CFG.indexer, topk=8))
    mode = AttentionMode.of(cfg, "sparse")
  acfg = A.AgentConfig(policy="discard_tools", budget=BUDGET,
                       max_reply_tokens=REPLY, sampling=FULL)
  trajs = forced["discard_tools"]
  if sparse:
    trajs = A.AgentSampler(cfg, acfg, CHAT, mode=mode).run(
        params, episodes()[:1], jax.random.PRNGKey(1), force=follow)
  segs = trajs[0].segments
  assert len(segs) == 3 and trajs[0].rewards == [1.0, 1.0]
  scfg = sampling.SamplingConfig(1.0, 20, 0.9)
  short = dataclasses.replace(acfg, max_reply_tokens=24, sampling=scfg)
  sampled = A.AgentSampler(cfg, short, CHAT, mode=mode).run(
      params, episodes(), jax.random.PRNGKey(2))
  assert all(t.stop in ("reply_cap", "parse") for t in sampled)
  for segments, sc in ((segs, FULL), ([t.segments[0] for t in sampled],
                                      scfg)):
    ro = A.to_rollout(segments)
    assert (ro.idx is not None) == sparse
    lp, _ = policy.completion_logprobs(params, ro, cfg, GRPOConfig(), sc,
                                       mode)
    assert int(ro.mask.sum()) == sum(sum(g.gen) for g in segments)
    gap = float(jnp.max(jnp.abs(jnp.where(ro.mask, lp - ro.logp, 0.0))))
    assert gap < 1e-5
    assert bool(jnp.all(jnp.isfinite(jnp.where(ro.mask, lp, 0.0))))
  if not sparse:   # the GRPO loss on them at theta = theta_old
    ro, adv = A.grpo_batch(trajs + forced["drop_reasoning"], 1,
                           std_normalise=False)
    assert ro.tokens.shape[0] == 5 and float(jnp.abs(adv).max()) == 0.0
    ro, adv = A.grpo_batch(forced["drop_reasoning"] + trajs, 2,
                           std_normalise=False)
    np.testing.assert_allclose(adv, [-0.25, -0.25, 0.25, 0.25, 0.25])

    def loss_fn(p):
      logp, _ = policy.completion_logprobs(p, ro, cfg, GRPOConfig(), FULL)
      return grpo.loss(logp, ro.logp, ro.logp, adv, ro.mask, GRPOConfig())

    (val, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    assert float(metrics["mismatch"]) < 1e-5
    assert float(metrics["clip_frac"]) == 0.0 and np.isfinite(float(val))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  # The records are the context's: the same tokens scored in another
  # context (the segment's first token dropped) give other log-probs.
  g = segs[1]
  moved = dataclasses.replace(g, ids=g.ids[1:], gen=g.gen[1:],
                              logp=g.logp[1:], bits=g.bits[1:],
                              count=g.count[1:], idx=g.idx[1:],
                              valid=g.valid[1:])
  if sparse:   # key positions shift with the tokens
    moved.idx = [np.maximum(i - 1, 0) for i in moved.idx]
  ro = A.to_rollout([moved])
  lp, _ = policy.completion_logprobs(params, ro, cfg, GRPOConfig(), FULL,
                                     mode)
  assert float(jnp.max(jnp.abs(jnp.where(ro.mask, lp - ro.logp, 0.0)))) > 1e-4
