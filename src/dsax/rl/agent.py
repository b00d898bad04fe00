"""Multi-turn tool-use rollouts: an offline tool environment, a sampler that
drives a chat turn by turn on the latent-cache decode, per-user-turn
training samples, and context-budget policies.

Environment (``PointerStore``): a key-value store whose values are either
another key or a final value, and one tool, ``get(key)``. A question names
a start key; its answer is the final value at the end of the key's pointer
chain (``hops`` lookups). Final values are random letters (``letters``:
lower case, or ``UPPER`` so that no value character occurs in the chat
template) that occur nowhere but in the store, so the answer reaches the
model only through tool results. An ``Episode`` asks ``turns`` such
questions, one per user turn, over one store. ``trace(episode)`` is the
scripted solver's conversation (supervised traces; reasoning is a short
plan before each call and before the answer, each opening with the key or
value just read: ``plan``, ``settle``).

Sampler (``AgentSampler``): B rows, one episode each, stepped together one
token per row and step by a jitted decode step vmapped over rows, so each
row has its own cache position. A row feeds given tokens (the prompt, tool
results) until its queue is empty, then samples (``sampling.sample``, the
rollout's sampler: log pi_old renormalised over the kept set, which is
recorded) until ``chat.end_id`` or ``max_reply_tokens``. The completion is
parsed (``Chat.parse_ids``); its tool calls run in the environment and the
ids ``Chat.extend`` appends (results, next opener) are queued after the
sampled ids: within a user turn the cache is reused, never re-encoded. A
new user message (rule 1 rewrites earlier tokens) or a budget policy that
acted starts a new *segment*: the row's cache position goes back to 0 and
it feeds the re-encoded conversation. A segment is one training sample
(``Segment``): every token in it was sampled in exactly the context before
it, so a training forward on it reproduces the sampler's log-probs (DSA:
with the key sets each decode step recorded, index replay).

Context policies (``AgentConfig.policy``), the prompt kept within
``budget - max_reply_tokens`` tokens:

  keep_all        every message, reasoning of earlier user turns included
                  (``SmolLM2(keep_reasoning=True)``-style formats); a prompt
                  over the budget ends the episode
  drop_reasoning  V3.2's rule 1 (reasoning before the last user message
                  dropped); over the budget ends the episode
  discard_tools   rule 1, and over the budget ``discard_all_tool_history``
                  (then a new segment; BudgetError ends the episode)

Reward: per user turn, 1 when the answer (the content of the assistant
message without tool calls) equals the final value exactly; an episode's
reward is the mean over its turns (a turn never answered scores 0: a parse
error, the per-turn call cap, the reply cap or the budget ends the episode).

``to_rollout(segments, ...)`` pads segments into a ``dsax.rl.rollout.
Rollout`` (prompt_len 1: every position is scored, the mask keeps the
generated ones) for ``dsax.rl.policy.completion_logprobs`` and the GRPO
loss.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsax import decode
from dsax.attention import AttentionMode
from dsax.chat import (Assistant, BudgetError, Chat, ChatError, System,
                       ToolCall, ToolResult, ToolSpec, User,
                       discard_all_tool_history)
from dsax.config import ModelConfig
from dsax.rl import grpo, sampling
from dsax.rl.rollout import Rollout

POLICIES = ("keep_all", "drop_reasoning", "discard_tools")
GET = ToolSpec("get", "the value stored under a key", {
    "type": "object", "properties": {"key": {"type": "string"}},
    "required": ["key"]})
SYSTEM = "Answer with the value at the end of the chain; call get(key)."
LETTERS = "abcdefghijmnopqrstuvwxyz"   # final values: no 'k', no digits
UPPER = "BCDEFGHIJKLMNOPQRSTUVWXYZ"   # no 'A' (the system prompt's)


class AgentError(ValueError):
  """A bad agent configuration; the message names the value."""


# -------------------------------------------------------------- environment


@dataclasses.dataclass(frozen=True)
class Episode:
  """``turns`` questions over one store: question u asks for the end of
  the chain from ``starts[u]``; its answer is ``answers[u]``."""
  store: dict
  starts: tuple[str, ...]
  answers: tuple[str, ...]
  hops: int

  def question(self, u: int) -> str:
    return f"chain {self.starts[u]}"

  def system(self, tools: bool = False) -> System:
    return System(SYSTEM, tools=(GET,) if tools else ())


class PointerStore:
  """The tool environment: ``get(key)`` returns the stored value, or
  ``missing`` for an unknown key; any other call gets an error string."""

  def __init__(self, store: dict):
    self.store = store

  def __call__(self, call: ToolCall) -> str:
    if call.name != "get" or set(call.arguments) != {"key"}:
      return "error: call get with {\"key\": ...}"
    return str(self.store.get(call.arguments["key"], "missing"))


def make_episode(rng: np.random.Generator, turns: int = 3, hops: int = 2,
                 n_keys: int = 100, value_len: int = 4,
                 letters: str = LETTERS) -> Episode:
  """A random store of ``turns`` disjoint chains of ``hops`` lookups (keys
  ``k00`` .. ``k{n_keys-1}``), plus distractor keys holding other values
  (``value_len`` characters drawn from ``letters``)."""
  if turns * hops > n_keys or hops < 1 or turns < 1:
    raise AgentError(f"make_episode needs 1 <= turns * hops <= n_keys, got "
                     f"turns={turns} hops={hops} n_keys={n_keys}")
  if not letters or "k" in letters or any(c.isdigit() or c.isspace()
                                          for c in letters):
    raise AgentError(f"make_episode: letters must be non-empty, without "
                     f"'k', digits or spaces (values must not look like "
                     f"keys), got {letters!r}")
  width = len(str(n_keys - 1))
  keys = [f"k{i:0{width}d}" for i in rng.permutation(n_keys)]

  def value():
    return "".join(rng.choice(list(letters), value_len))

  store, starts, answers = {}, [], []
  for u in range(turns):
    chain = keys[u * hops:(u + 1) * hops]
    for a, b in zip(chain, chain[1:]):
      store[a] = b
    answers.append(value())
    store[chain[-1]] = answers[-1]
    starts.append(chain[0])
  for k in keys[turns * hops:turns * hops + 2 * turns]:   # distractors
    store[k] = value()
  return Episode(store, tuple(starts), tuple(answers), hops)


def plan(key: str) -> str:
  """The scripted reasoning before a call."""
  return f"{key} may point on; look it up"


def settle(value: str) -> str:
  """The scripted reasoning before the answer. Like ``plan`` it opens with
  what the last message ended with, so one copy rule writes both."""
  return f"{value} is a value, not a key: done"


def trace(ep: Episode, tools_in_system: bool = False) -> list:
  """The scripted solver's conversation: per question, one ``get`` per hop
  (reasoning: ``plan``), then the answer (reasoning: where it was read)."""
  env = PointerStore(ep.store)
  conv = [ep.system(tools_in_system)]
  for u in range(len(ep.starts)):
    conv.append(User(ep.question(u)))
    key = ep.starts[u]
    for _ in range(ep.hops):
      call = ToolCall("get", {"key": key})
      conv.append(Assistant(reasoning=plan(key), tool_calls=(call,)))
      conv.append(ToolResult(env(call)))
      key = conv[-1].content
    conv.append(Assistant(content=key, reasoning=settle(key)))
  return conv


def oracle(ctx: Sequence) -> Assistant:
  """The scripted solver as a policy (``AgentSampler.run(force=)``): the
  message ``trace`` would write next, read off the conversation as the
  model sees it (a User message: call get on its key; a tool result that
  is a key: call get on it; else answer with it)."""
  last = ctx[-1]
  key = last.content.split()[-1] if isinstance(last, User) else last.content
  if key.startswith("k"):
    return Assistant(reasoning=plan(key),
                     tool_calls=(ToolCall("get", {"key": key}),))
  return Assistant(content=key, reasoning=settle(key))


def answer_of(reply: Assistant) -> str:
  return reply.content.strip()


# ------------------------------------------------------------------ sampler


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  """How agent rollouts run (hashable)."""
  policy: str = "drop_reasoning"
  budget: int = 1024              # prompt + reply tokens, at most
  max_reply_tokens: int = 96      # per assistant message
  max_calls: int = 4              # assistant messages with calls per turn
  sampling: sampling.SamplingConfig = sampling.SamplingConfig()

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise AgentError(f"AgentConfig.policy must be one of {POLICIES}, got "
                       f"{self.policy!r}")
    if not 0 < self.max_reply_tokens < self.budget:
      raise AgentError(f"AgentConfig needs 0 < max_reply_tokens < budget, "
                       f"got {self.max_reply_tokens} and {self.budget}")
    if self.max_calls < 0:
      raise AgentError(f"AgentConfig.max_calls must be >= 0, got "
                       f"{self.max_calls}")


@dataclasses.dataclass
class Segment:
  """One training sample: a stream of ids fed from cache position 0.

  ids      [S] int32   the tokens in the order the row saw them
  gen      [S] bool    sampled by the model (else given)
  logp     [S] f32     log pi_old of a sampled token (0 elsewhere)
  bits     [S, W]      its kept set (all ones elsewhere)
  count    [S] int32
  idx, valid [L, S, K] the key sets the decode step at each input position
                       chose (sparse; invalid slots point at the query)
  turn     the user turn (0-based) it belongs to
  """
  ids: list
  gen: list
  logp: list
  bits: list
  count: list
  idx: list
  valid: list
  turn: int


@dataclasses.dataclass
class Trajectory:
  """One row's episode: the full conversation (reasoning kept), its
  segments, per-turn rewards, why it stopped, and token counts."""
  episode: Episode
  messages: list
  segments: list
  rewards: list
  stop: str = ""
  fed: int = 0          # tokens fed to the model (given + sampled)
  generated: int = 0
  peak: int = 0         # the longest context (a segment's length)
  budget_events: int = 0

  @property
  def reward(self) -> float:
    return float(np.mean(self.rewards)) if self.rewards else 0.0


class _Row:
  """A row's host state."""

  def __init__(self, ep: Episode, tools_in_system: bool):
    self.traj = Trajectory(ep, [ep.system(tools_in_system)], [],
                           [0.0] * len(ep.starts))
    self.ctx: list = []        # the conversation as the model sees it
    self.turn = -1
    self.calls = 0
    self.next_tok = -1         # fed at the next step (-1: done)
    self.queue: list = []
    self.reset = True
    self.reply: list = []      # ids sampled for the current message
    self.forced: list | None = None   # ids a forced policy still emits
    self.seg: Segment | None = None
    self.pos = 0

  @property
  def done(self) -> bool:
    return self.next_tok < 0


def _row_step(params, cache, tok, cfg, mode):
  """decode_step_recorded for one row (cache arrays without the B axis)."""
  c = {n: (a if n == "length" else a[:, None]) for n, a in cache.items()}
  logits_1V, new, rec = decode.decode_step_recorded(params, c, tok[None], cfg,
                                                    mode)
  new = {n: (a if n == "length" else a[:, 0]) for n, a in new.items()}
  sel = (rec.idx[:, 0, 0], rec.valid[:, 0, 0]) if mode.sparse else ()
  return logits_1V[0], new, sel


@functools.partial(jax.jit, static_argnums=(6, 7, 8), donate_argnums=1)
def _step(params, cache, fed_B, reset_B, force_B, key, cfg, mode, scfg):
  cache = dict(cache, length=jnp.where(reset_B, 0, cache["length"]))
  axes = {n: (0 if n == "length" else 1) for n in cache}
  logits_BV, new, sel = jax.vmap(
      functools.partial(_row_step, cfg=cfg, mode=mode),
      in_axes=(None, axes, 0), out_axes=(0, axes, 1))(params, cache, fed_B)
  draw = sampling.sample(logits_BV, key, scfg)
  # A forced token (>= 0) replaces the draw; its log-prob over the kept set
  # (-inf outside it) is the sampler's function applied to it.
  z_BV = sampling.scaled(logits_BV, scfg)
  logp_BV = sampling.kept_logprobs(z_BV, sampling.unpack(draw.bits,
                                                         z_BV.shape[-1]))
  tok_B = jnp.where(force_B >= 0, force_B, draw.token)
  logp_B = jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]
  return new, dataclasses.replace(draw, token=tok_B, logp=logp_B), sel


class AgentSampler:
  """Runs episodes with a model (module docstring). ``chat`` encodes with
  context rule 1 (drop_reasoning, discard_tools); ``keep_chat`` (a chat
  whose format keeps every reasoning) is needed for ``keep_all``."""

  def __init__(self, cfg: ModelConfig, acfg: AgentConfig, chat: Chat,
               keep_chat: Chat | None = None,
               mode: AttentionMode | None = None,
               tools_in_system: bool = False):
    if acfg.policy == "keep_all" and keep_chat is None:
      raise AgentError("policy 'keep_all' needs keep_chat= (a Chat whose "
                       "format keeps reasoning, e.g. SmolLM2(keep_reasoning"
                       "=True))")
    if chat.tok.vocab_size > cfg.vocab_size:
      raise AgentError(f"the chat's vocabulary ({chat.tok.vocab_size}) is "
                       f"larger than the model's ({cfg.vocab_size})")
    self.cfg, self.acfg = cfg, acfg
    self.chat = keep_chat if acfg.policy == "keep_all" else chat
    self.mode = AttentionMode.of(cfg) if mode is None else mode
    self.tools_in_system = tools_in_system

  # -- host logic --------------------------------------------------------

  def _start_segment(self, row: _Row, ids) -> None:
    row.next_tok, row.queue = int(ids[0]), [int(i) for i in ids[1:]]
    row.reset, row.pos = True, 0
    row.seg = Segment([], [], [], [], [], [], [], row.turn)
    row.traj.segments.append(row.seg)

  def _end(self, row: _Row, why: str) -> None:
    row.traj.stop, row.next_tok, row.queue = why, -1, []

  def _prompt(self, row: _Row) -> None:
    """Starts a segment on ``row.ctx`` within the budget (policy), or ends
    the episode."""
    room = self.acfg.budget - self.acfg.max_reply_tokens
    if self.acfg.policy == "discard_tools":
      try:
        row.ctx, rep = discard_all_tool_history(self.chat, row.ctx, room)
      except BudgetError:
        return self._end(row, "budget")
      row.traj.budget_events += int(rep.acted)
    ids = self.chat.prompt(row.ctx).ids_T
    if len(ids) > room:
      return self._end(row, "budget")
    self._start_segment(row, ids)

  def _next_turn(self, row: _Row) -> None:
    row.turn += 1
    row.calls = 0
    if row.turn == len(row.traj.episode.starts):
      return self._end(row, "answered")
    q = User(row.traj.episode.question(row.turn))
    row.ctx.append(q)
    row.traj.messages.append(q)
    self._prompt(row)

  def _finish_reply(self, row: _Row, env) -> None:
    """The row sampled a whole message (ids in ``row.reply``)."""
    try:
      reply = self.chat.parse_ids(row.reply)
    except ChatError:
      return self._end(row, "parse")
    row.reply, row.forced = [], None
    row.traj.messages.append(reply)
    if not reply.tool_calls:
      ep = row.traj.episode
      row.traj.rewards[row.turn] = float(
          answer_of(reply) == ep.answers[row.turn])
      row.ctx.append(reply)
      return self._next_turn(row)
    row.calls += 1
    if row.calls > self.acfg.max_calls:
      return self._end(row, "calls")
    results = [ToolResult(env(c)) for c in reply.tool_calls]
    row.traj.messages.extend(results)
    try:
      more = self.chat.extend(row.ctx, [reply] + results)
    except ChatError:
      return self._end(row, "parse")
    # What follows the sampled ids: the reply's rendering after its end
    # token (SmolLM2: a line break), then the results and the next opener.
    tail = [int(i) for i in more.ids_T[np.flatnonzero(more.mask_T)[-1] + 1:]]
    row.ctx += [reply] + results
    room = self.acfg.budget - self.acfg.max_reply_tokens
    if row.pos + 1 + len(tail) <= room:   # + 1: the end token, not yet fed
      row.queue = tail
      return
    if self.acfg.policy != "discard_tools":
      return self._end(row, "budget")
    row.next_tok = -1     # close this segment; the end token stays its last
    self._prompt(row)

  # -- the loop ----------------------------------------------------------

  def _forced(self, row: _Row, force) -> list:
    """The ids of ``force(ctx)``'s reply through the end token."""
    reply = force(list(row.ctx))
    enc = self.chat.extend(row.ctx, [reply])
    return [int(i) for i in enc.ids_T[:np.flatnonzero(enc.mask_T)[-1] + 1]]

  def run(self, params: dict[str, Any], episodes: Sequence[Episode],
          key: jax.Array, max_steps: int = 100000,
          force: Callable[[list], Assistant] | None = None
          ) -> list[Trajectory]:
    """One trajectory per episode, all rows stepped together. ``force``
    (tests, scripted baselines): a function of the conversation as the
    model sees it to the next assistant message, whose ids replace the
    draws; their log-probs under the model are still recorded (use no
    top-k / top-p, or they may be -inf)."""
    b = len(episodes)
    max_len = self.acfg.budget
    _, cache = decode.prefill(params, jnp.zeros((b, 1), jnp.int32), self.cfg,
                              max_len, self.mode)
    cache = dict(cache, length=jnp.zeros((b,), jnp.int32))
    rows = [_Row(ep, self.tools_in_system) for ep in episodes]
    envs = [PointerStore(ep.store) for ep in episodes]
    for row in rows:
      row.ctx = list(row.traj.messages)
      self._next_turn(row)
    v = self.cfg.vocab_size
    w = -(-v // sampling.WORD)
    ones_W = np.full((w,), 0xFFFFFFFF, np.uint32)
    for t in range(max_steps):
      if all(r.done for r in rows):
        break
      fed_B = np.array([max(r.next_tok, 0) for r in rows], np.int32)
      reset_B = np.array([r.reset for r in rows])
      force_B = np.full((b,), -1, np.int32)
      if force is not None:
        for i, row in enumerate(rows):
          if not row.done and not row.queue:   # it samples after this step
            if row.forced is None:
              row.forced = self._forced(row, force)
            force_B[i] = row.forced[0]
      cache, draw, sel = _step(params, cache, jnp.asarray(fed_B),
                               jnp.asarray(reset_B), jnp.asarray(force_B),
                               jax.random.fold_in(key, t), self.cfg,
                               self.mode, self.acfg.sampling)
      tok_B, logp_B, bits_BW, count_B = jax.device_get(
          (draw.token, draw.logp, draw.bits, draw.count))
      if self.mode.sparse:
        idx_LBK, valid_LBK = jax.device_get(sel)
      for i, row in enumerate(rows):
        if row.done:
          continue
        row.reset = False
        seg = row.seg
        if not seg.ids:   # the segment's first token: given
          seg.ids.append(row.next_tok)
          seg.gen.append(False)
          seg.logp.append(0.0)
          seg.bits.append(ones_W)
          seg.count.append(v)
        if self.mode.sparse:  # the key sets at this input position
          seg.idx.append(np.where(valid_LBK[:, i], idx_LBK[:, i], row.pos))
          seg.valid.append(valid_LBK[:, i])
        row.pos += 1
        row.traj.fed += 1
        if row.queue:
          tok = row.queue.pop(0)
          seg.ids.append(tok)
          seg.gen.append(False)
          seg.logp.append(0.0)
          seg.bits.append(ones_W)
          seg.count.append(v)
          row.next_tok = tok
          continue
        tok = int(tok_B[i])
        if row.forced:
          row.forced.pop(0)
        seg.ids.append(tok)
        seg.gen.append(True)
        seg.logp.append(float(logp_B[i]))
        seg.bits.append(bits_BW[i])
        seg.count.append(int(count_B[i]))
        row.reply.append(tok)
        row.next_tok = tok
        row.traj.generated += 1
        row.traj.peak = max(row.traj.peak, len(seg.ids))
        if tok == self.chat.end_id:
          self._finish_reply(row, envs[i])
        elif len(row.reply) >= self.acfg.max_reply_tokens:
          self._end(row, "reply_cap")
      if t == max_steps - 1:
        for row in rows:
          if not row.done:
            self._end(row, "steps")
    for row in rows:   # a segment's last token is never fed: no key sets
      for seg in row.traj.segments:
        del seg.idx[len(seg.ids) - 1:], seg.valid[len(seg.ids) - 1:]
        row.traj.peak = max(row.traj.peak, len(seg.ids))
    return [r.traj for r in rows]


# ----------------------------------------------------------------- training


def to_rollout(segments: Sequence[Segment], pad_to: int | None = None,
               pad_id: int = 0) -> Rollout:
  """Segments -> one ``Rollout`` (prompt_len 1, rows padded to S tokens):
  ``policy.completion_logprobs`` scores every position, ``mask`` keeps the
  sampled ones. Key sets are included when the segments have them."""
  s = max(len(g.ids) for g in segments) if pad_to is None else pad_to
  n = len(segments)
  w = len(segments[0].bits[0])
  tokens = np.full((n, s), pad_id, np.int32)
  mask = np.zeros((n, s - 1), bool)
  logp = np.zeros((n, s - 1), np.float32)
  bits = np.full((n, s - 1, w), 0xFFFFFFFF, np.uint32)
  count = np.zeros((n, s - 1), np.int32)
  sparse = bool(segments[0].idx)
  if sparse:
    n_layers, k = segments[0].idx[0].shape
    q_T = np.arange(s - 1, dtype=np.int32)
    idx = np.broadcast_to(q_T[None, None, :, None],
                          (n_layers, n, s - 1, k)).copy()
    valid = np.zeros((n_layers, n, s - 1, k), bool)
    valid[..., 0] = True
  for r, g in enumerate(segments):
    m = len(g.ids)
    if m > s:
      raise AgentError(f"a segment of {m} tokens does not fit pad_to={s}")
    tokens[r, :m] = g.ids
    mask[r, :m - 1] = g.gen[1:]
    logp[r, :m - 1] = g.logp[1:]
    bits[r, :m - 1] = np.stack(g.bits[1:])
    count[r, :m - 1] = g.count[1:]
    if sparse:
      idx[:, r, :m - 1] = np.stack(g.idx, axis=1)
      valid[:, r, :m - 1] = np.stack(g.valid, axis=1)
  return Rollout(tokens=jnp.asarray(tokens), mask=jnp.asarray(mask),
                 logp=jnp.asarray(logp), kept_bits=jnp.asarray(bits),
                 kept_count=jnp.asarray(count),
                 idx=jnp.asarray(idx) if sparse else None,
                 valid=jnp.asarray(valid) if sparse else None, experts=None,
                 prompt_len=1)


def grpo_batch(trajs: Sequence[Trajectory], group_size: int,
               std_normalise: bool = True, pad_to: int | None = None):
  """(Rollout, adv_B) for ``grpo.loss``: trajectories are prompt-major
  groups of ``group_size`` runs of one episode; each trajectory's reward
  gives its group-relative advantage, which every one of its segments (one
  row each) carries. ``grpo.loss`` averages tokens per row, then rows: an
  episode whose context was re-encoded more often has more rows."""
  if len(trajs) % group_size:
    raise AgentError(f"{len(trajs)} trajectories do not split into groups "
                     f"of {group_size}")
  adv_T = grpo.advantages(jnp.asarray([t.reward for t in trajs]), group_size,
                          std_normalise)
  segs, adv = [], []
  for t, a in zip(trajs, np.asarray(adv_T)):
    segs += t.segments
    adv += [a] * len(t.segments)
  return to_rollout(segs, pad_to), jnp.asarray(adv, jnp.float32)
