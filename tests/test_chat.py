"""dsax.chat: golden strings of the DeepSeek-V3.2 format (the published
README example and hand-written tool-use cases), SmolLM2's template against
its own Jinja template, the parser round trip, the context rules as
properties over generated conversations (bytes, a small trained BPE, and
SmolLM2's tokenizer when prepared), the budget policies, and the errors.

SmolLM2's tokenizer: ``$DSAX_SMOLLM2_TOKENIZER`` or
work/models/smollm2-135m-instruct/tokenizer.json (``launch.py prepare
smollm2``); those cases skip without it.
"""

from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import pytest

from dsax import tokenizer as tokenizer_lib
from dsax.chat import (ELIDED, Assistant, BudgetError, Chat, ChatError,
                       ChatTokenizer, DeepSeekV32, SmolLM2, System, ToolCall,
                       ToolResult, ToolSpec, User, discard_all_tool_history,
                       discard_oldest_tool_results, is_tool_history,
                       model_view, summarize_tool_history, user_turns,
                       validate)
from dsax.chat import deepseek_v32 as V

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = range(40)

# ------------------------------------------------------------ generator

WORDS = ["alpha", "beta", "ß", "日本語", "😀", "<", ">", "\"", "{", "}", "[1]",
         "\n", "\n\n", "  ", "\t", "'s", "12", "3.5", "</b>", "x=1;", "think",
         "tool", "result", "a\\b", "json:", "–", "\r\n"]


class Gen:
  """Random conversations with a unique tag in every text (``t17;``), so a
  text's presence in the encoding can be checked."""

  def __init__(self, seed: int):
    self.rng = random.Random(seed)
    self.n = 0

  def text(self, empty_ok: bool = True) -> str:
    if empty_ok and self.rng.random() < 0.2:
      return ""
    self.n += 1
    while True:  # "<" "think" ">" would be a marker: draw again
      words = self.rng.choices(WORDS, k=self.rng.randint(0, 6))
      k = self.rng.randint(0, len(words))
      text = "".join(words[:k]) + f"t{self.n};" + "".join(words[k:])
      if "think>" not in text:
        return text

  def value(self, depth: int = 0):
    r = self.rng.random()
    if r < 0.35:
      return self.text()
    if r < 0.5:
      return self.rng.randint(-1000, 10**6)
    if r < 0.6:
      return self.rng.choice([0.5, -2.25, 1e-3, 3.0])
    if r < 0.7:
      return self.rng.choice([True, False, None])
    if depth > 1:
      return self.text()
    if r < 0.85:
      return [self.value(depth + 1) for _ in range(self.rng.randint(0, 3))]
    return {f"k{j}": self.value(depth + 1)
            for j in range(self.rng.randint(0, 3))}

  def call(self) -> ToolCall:
    self.n += 1
    keys = self.rng.sample(["city", "n", "flag", "items", "opts", "q x"],
                           self.rng.randint(0, 3))
    return ToolCall(self.rng.choice(["search", "get_weather", "kv.get"]),
                    {"tag": f"c{self.n}", **{k: self.value() for k in keys}})

  def assistant(self, calls: bool) -> Assistant:
    return Assistant(self.text(), self.text(),
                     [self.call() for _ in range(self.rng.randint(1, 2))]
                     if calls else ())

  def conversation(self) -> list:
    """[System] then 1-3 user turns of 0-3 tool exchanges and an answer;
    the last turn may stop anywhere a message ends."""
    rng, out = self.rng, []
    if rng.random() < 0.6:
      tools = [ToolSpec("search", "find text", {"type": "object"})]
      out.append(System(self.text(False), tools if rng.random() < 0.5 else ()))
    turns = rng.randint(1, 3)
    for t in range(turns):
      out.append(User(self.text(False)))
      for _ in range(rng.randint(0, 3)):
        a = self.assistant(calls=True)
        out.append(a)
        out.extend(ToolResult(self.text()) for _ in a.tool_calls)
      out.append(self.assistant(calls=False))
    if rng.random() < 0.5:
      ends = [i + 1 for i in range(len(out)) if _can_end(out, i + 1)]
      last_user = max(i for i, m in enumerate(out) if isinstance(m, User))
      out = out[:rng.choice([e for e in ends if e > last_user])]
    return out


def _can_end(messages, n) -> bool:
  """Whether messages[:n] is a conversation (not inside a result group)."""
  try:
    validate(messages[:n])
    return True
  except ChatError:
    return False


# ------------------------------------------------------------ tokenizers


def _smollm2_path():
  path = os.environ.get("DSAX_SMOLLM2_TOKENIZER") or os.path.join(
      ROOT, "work", "models", "smollm2-135m-instruct", "tokenizer.json")
  return path if os.path.isfile(path) else None


@pytest.fixture(scope="module")
def bases():
  """name -> base tokenizer: bytes; a 400-token BPE trained on generated
  conversations (merges across the markers and line breaks); SmolLM2's."""
  out = {"bytes": tokenizer_lib.Tokenizer("bytes")}
  sample = []
  for seed in range(30):
    conv = Gen(1000 + seed).conversation()
    for fmt in (DeepSeekV32(), SmolLM2()):
      sample.append(Chat(fmt, base=out["bytes"]).encode(conv).text)
  train = tokenizer_lib._train_bpe  # pylint: disable=protected-access
  out["bpe"] = tokenizer_lib.Tokenizer("bpe", train(sample, 400))
  if _smollm2_path():
    out["smollm2"] = tokenizer_lib.load_file("file:" + _smollm2_path())
  return out


CASES = [(f, b) for f in ("v32", "smollm2") for b in ("bytes", "bpe",
                                                      "smollm2")]


def _chat(bases, fmt, base):
  if base not in bases:
    pytest.skip("SmolLM2's tokenizer is not prepared (launch.py prepare "
                "smollm2, or $DSAX_SMOLLM2_TOKENIZER)")
  return Chat(DeepSeekV32() if fmt == "v32" else SmolLM2(), base=bases[base])


def _is_prefix(a, b) -> bool:
  return len(a) <= len(b) and np.array_equal(a, b[:len(a)])


def _decode(chat, ids):
  return chat.tok.decode([int(i) for i in ids])


# ------------------------------------------------------------ golden strings

B, E = V.BOS, V.EOS
U, A = V.USER, V.ASSISTANT


def _v32(messages, thinking=True):
  return Chat(DeepSeekV32(thinking), base=tokenizer_lib.Tokenizer(
      "bytes")).encode(messages).text


def test_v32_golden_readme_example():
  """The example of DeepSeek-V3.2's encoding/README.md, verbatim."""
  messages = [User("hello"),
              Assistant("Hello! I am DeepSeek.", reasoning="thinking..."),
              User("1+1=?")]
  assert _v32(messages) == (
      "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>Hello! I am "
      "DeepSeek.<｜end▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜><think>")


CALL = ToolCall("get_weather", {"location": "Seoul", "days": 3})
INVOKE = (
    "<｜DSML｜invoke name=\"get_weather\">\n"
    "<｜DSML｜parameter name=\"location\" string=\"true\">Seoul"
    "</｜DSML｜parameter>\n"
    "<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>")
TWO_CALLS = ("\n\n<｜DSML｜function_calls>\n" + INVOKE + "\n" + INVOKE
             + "\n</｜DSML｜function_calls>")
RESULTS = ("\n\n<function_results>\n<result>sunny</result>\n"
           "<result>rain</result>\n</function_results>\n\n")
TOOL_TURN = [User("Weather?"),
             Assistant("Let me look.", "Need the tool.", [CALL, CALL]),
             ToolResult("sunny"), ToolResult("rain"),
             Assistant("Sunny, then rain.", "Both came back.")]


def test_v32_golden_tool_turn():
  """Thinking with tools in the current turn: reasoning kept, the results
  in one <function_results> block, then <think> again."""
  assert _v32([System("Be brief.")] + TOOL_TURN) == (
      f"{B}Be brief.{U}Weather?{A}<think>Need the tool.</think>Let me look."
      f"{TWO_CALLS}{E}{RESULTS}<think>Both came back.</think>"
      f"Sunny, then rain.{E}")


def test_v32_golden_new_user_drops_reasoning():
  """After a new user message the earlier turn loses its reasoning and its
  openers become </think>; calls and results stay."""
  assert _v32(TOOL_TURN + [User("Thanks!")]) == (
      f"{B}{U}Weather?{A}</think>Let me look.{TWO_CALLS}{E}{RESULTS}</think>"
      f"Sunny, then rain.{E}{U}Thanks!{A}<think>")


def test_v32_golden_chat_mode_and_tools_block():
  assert _v32([User("hi"), Assistant("yo", "ignored")], thinking=False) == (
      f"{B}{U}hi{A}</think>yo{E}")
  chat = Chat(DeepSeekV32(False), base=tokenizer_lib.Tokenizer("bytes"))
  enc = chat.encode(TOOL_TURN)
  assert [chat.parse_ids(enc.ids_T[enc.owner_T == i]) for i in (1, 4)] == [
      Assistant("Let me look.", "", [CALL, CALL]),
      Assistant("Sunny, then rain.")]
  text = _v32([System("S", [ToolSpec("f", "d", {"type": "object"})]),
               User("x")])
  assert text.startswith(f"{B}S\n\n## Tools\n")
  assert text.endswith('<functions>\n{"name": "f", "description": "d", '
                       '"parameters": {"type": "object"}}\n</functions>\n'
                       f"{U}x{A}<think>")


# SmolLM2-135M-Instruct's tokenizer.chat_template (from its GGUF).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] "
    "!= 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant "
    "named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("seed", range(10))
def test_smollm2_matches_its_jinja_template(seed):
  """Our rendering is SmolLM2's own template applied to the messages (the
  assistant's content in our think / tool_call convention)."""
  jinja2 = pytest.importorskip("jinja2")
  template = jinja2.Template(SMOLLM2_TEMPLATE)
  fmt = SmolLM2()
  conv = Gen(seed).conversation()
  chat = Chat(fmt, base=tokenizer_lib.Tokenizer("bytes"))
  rows = []
  for m in model_view(conv):
    if isinstance(m, Assistant):
      rows.append({"role": "assistant", "content": fmt.body(m)})
    elif isinstance(m, System) and m.tools:
      rows.append({"role": "system", "content": chat.encode(
          [m, User("x")]).text.split("\n", 1)[1].split("<|im_end|>")[0]})
    else:
      rows.append({"role": {System: "system", User: "user",
                            ToolResult: "tool"}[type(m)],
                   "content": m.content})
  expected = template.render(
      messages=rows,
      add_generation_prompt=isinstance(conv[-1], (User, ToolResult)))
  assert chat.encode(conv).text == expected


def test_smollm2_real_tokenizer_ids(bases):
  """With SmolLM2's tokenizer the markers keep its ids, and a prompt's ids
  equal encoding its whole text in one call (no piece boundary inside)."""
  chat = _chat(bases, "smollm2", "smollm2")
  assert chat.tok.id_of("<|im_start|>") == 1 and chat.end_id == 2
  assert chat.tok.vocab_size == bases["smollm2"].vocab_size
  conv = [System("You add."), User("What is 12 + 30?")]
  enc = chat.prompt(conv)
  assert enc.ids_T.tolist() == bases["smollm2"].encode(enc.text)
  assert enc.ids_T[:3].tolist() == [1, *bases["smollm2"].encode("system\n")]


def test_v32_tokenizer_adds_special_ids():
  base = tokenizer_lib.Tokenizer("bytes")
  chat = Chat(DeepSeekV32(), base=base)
  assert [chat.tok.id_of(s) for s in V.SPECIAL_TOKENS] == list(range(256,
                                                                      263))
  assert chat.tok.vocab_size == 263 and chat.end_id == 257
  text = f"{B}a<think>ß{E}"
  assert chat.tok.encode(text) == [256, 97, 260, 195, 159, 257]
  assert chat.tok.decode(chat.tok.encode(text)) == text


# ------------------------------------------------------------ round trip


@pytest.mark.parametrize("fmt,base", CASES)
def test_parse_inverts_encode(bases, fmt, base):
  """For every assistant message of every generated conversation: the
  tokens it generated (owner_T), decoded and parsed, give it back."""
  chat = _chat(bases, fmt, base)
  n = 0
  for seed in SEEDS:
    conv = Gen(seed).conversation()
    for i, m in enumerate(conv):
      if isinstance(m, Assistant):
        enc = chat.encode(conv[:i + 1])
        gen_ids = enc.ids_T[enc.owner_T == i]
        assert chat.parse_ids(gen_ids) == m
        assert chat.parse_ids(list(gen_ids) + [0, 0]) == m  # padding after
        assert chat.parse(_decode(chat, gen_ids[:-1])) == m  # no end token
        n += 1
  assert n > 100


# ------------------------------------------------------------ context rules


@pytest.mark.parametrize("fmt,base", CASES)
def test_context_rules(bases, fmt, base):
  """Rule 1: reasoning before the last user message is absent; rule 2:
  reasoning after it, every tool call and every tool result are present;
  the mask is 1 exactly on the assistants' generated text."""
  chat = _chat(bases, fmt, base)
  for seed in SEEDS:
    conv = Gen(seed).conversation()
    enc = chat.encode(conv)
    last = max(i for i, m in enumerate(conv) if isinstance(m, User))
    for i, m in enumerate(conv):
      if isinstance(m, Assistant) and m.reasoning:
        assert (m.reasoning in enc.text) == (i > last), (seed, i)
      if isinstance(m, Assistant):
        for c in m.tool_calls:
          assert f'"{c.arguments["tag"]}"' in enc.text or (
              f">{c.arguments['tag']}<" in enc.text)
        assert m.content in enc.text
      if isinstance(m, (ToolResult, User, System)):
        assert m.content in enc.text
    # The mask: generated tokens are exactly the assistants', in order.
    owners = sorted(set(enc.owner_T[enc.mask_T == 1].tolist()))
    assert owners == [i for i, m in enumerate(conv)
                      if isinstance(m, Assistant)]
    assert np.all((enc.owner_T >= 0) == (enc.mask_T == 1))
    view = model_view(conv)
    for i in owners:
      text = _decode(chat, enc.ids_T[enc.owner_T == i])
      assert text.endswith(chat.fmt.end_token)
      if fmt == "smollm2":
        assert text == chat.fmt.body(view[i]) + chat.fmt.end_token
      elif i < last:  # no reasoning and no </think> before the last user
        assert V.END_THINK not in text and view[i].reasoning == ""


@pytest.mark.parametrize("fmt,base", CASES)
def test_prompts_extend_within_a_turn(bases, fmt, base):
  """Within a user turn every prompt's ids, followed by its completion's,
  are a prefix of every later encoding in the turn (masks too); a new user
  message after reasoning breaks it, and ``extend`` says so."""
  chat = _chat(bases, fmt, base)
  broke = 0
  for seed in SEEDS:
    conv = Gen(seed).conversation()
    cuts = [n for n in range(1, len(conv) + 1) if _can_end(conv, n)]
    encs = {n: chat.encode(conv[:n]) for n in cuts}
    for start, end in user_turns(conv):
      inside = [n for n in cuts if start < n <= end]
      for a in inside:
        for b in inside:
          if a < b:
            assert _is_prefix(encs[a].ids_T, encs[b].ids_T), (seed, a, b)
            assert _is_prefix(encs[a].mask_T, encs[b].mask_T)
      for a, b in zip(inside, inside[1:]):
        tail = chat.extend(conv[:a], conv[a:b])
        np.testing.assert_array_equal(tail.ids_T, encs[b].ids_T[len(encs[a]):])
        np.testing.assert_array_equal(tail.mask_T,
                                      encs[b].mask_T[len(encs[a]):])
        assert encs[a].text + tail.text == encs[b].text
      for a in inside:
        if isinstance(conv[a - 1], (User, ToolResult)) and a < len(conv):
          # prompt a + the completion's ids == the encoding after it
          full = encs[a + 1]
          p = len(encs[a])
          assert np.all(full.mask_T[:p] == encs[a].mask_T)
          gen = full.owner_T == a
          assert np.all(gen[p:p + gen.sum()]) and not np.any(gen[:p])
      if end < len(conv) and end in encs and end + 1 in encs:
        reasoned = any(isinstance(m, Assistant) and m.reasoning
                       for m in conv[:end])
        same = _is_prefix(encs[end].ids_T, encs[end + 1].ids_T)
        if fmt == "v32" and any(isinstance(m, Assistant)
                                for m in conv[:end]):
          assert not same  # the old turn's openers become </think>
        if reasoned:
          assert not same
          with pytest.raises(ChatError, match="rewrite earlier tokens"):
            chat.extend(conv[:end], conv[end:end + 1])
          broke += 1
  assert broke > 5


@pytest.mark.parametrize("fmt", ["v32", "smollm2"])
def test_turn_samples_score_in_the_sampled_context(bases, fmt):
  """Each turn's sample has every prompt of that turn as a prefix, and its
  mask covers that turn's assistant messages and nothing else."""
  chat = _chat(bases, fmt, "bytes")
  for seed in SEEDS:
    conv = Gen(seed).conversation()
    samples = chat.turn_samples(conv)
    assert len(samples) == len(user_turns(conv))
    for (start, end), sample in zip(user_turns(conv), samples):
      mine = [i for i in range(start, end) if isinstance(conv[i], Assistant)]
      assert sorted(set(sample.owner_T[sample.mask_T == 1].tolist())) == mine
      for i in mine:
        prompt = chat.prompt(conv[:i]).ids_T
        assert _is_prefix(prompt, sample.ids_T)
        reply = chat.encode(conv[:i + 1])
        np.testing.assert_array_equal(
            sample.ids_T[sample.owner_T == i], reply.ids_T[reply.owner_T == i])


# ------------------------------------------------------------ budgets


def _tool_conv(seed):
  """A generated conversation with some tool history; tool results of
  every length from empty to long, as tools give."""
  while True:
    conv = Gen(seed).conversation()
    if sum(isinstance(m, ToolResult) for m in conv) >= 2:
      return [ToolResult(m.content * (1 + i % 7)) if isinstance(m, ToolResult)
              else m for i, m in enumerate(conv)]
    seed += 1000


def _check_policy_result(chat, conv, kept, report, budget):
  validate(kept)
  assert chat.count(kept) <= budget and report.tokens_after == chat.count(
      kept)
  assert report.tokens_before == chat.count(conv) > budget
  assert all(is_tool_history(conv[i]) for i in report.dropped)
  # system, users and final answers all stay, in order
  core = [m for m in conv if not is_tool_history(m)]
  assert [m for m in kept if not is_tool_history(m)][:len(core)] == core


@pytest.mark.parametrize("fmt", ["v32", "smollm2"])
def test_budget_policies(bases, fmt):
  chat = _chat(bases, fmt, "bytes")
  seen = {"elide_only": 0, "drop_too": 0, "summary": 0}
  for seed in range(20):
    conv = _tool_conv(seed)
    full = chat.count(conv)
    core = [m for m in conv if not is_tool_history(m)]
    low = chat.count(core)
    assert low < full
    for budget in sorted({low, (low + full) // 2, full - 1}):
      kept, rep = discard_all_tool_history(chat, conv, budget)
      _check_policy_result(chat, conv, kept, rep, budget)
      assert kept == core and rep.policy == "discard_all"
      kept, rep = discard_oldest_tool_results(chat, conv, budget)
      _check_policy_result(chat, conv, kept, rep, budget)
      results = [i for i, m in enumerate(conv) if isinstance(m, ToolResult)]
      gone = set(rep.dropped)
      # elided: the oldest results first (skipping those the placeholder
      # would not shorten), only as many as needed
      assert list(rep.elided) == sorted(rep.elided)
      for i in results:
        if (rep.elided and i < rep.elided[-1] and i not in rep.elided
            and i not in gone):
          alone = list(conv)
          alone[i] = ToolResult(ELIDED)
          assert chat.count(alone) >= full
      assert all(kept[[j for j in range(len(conv)) if j not in gone].index(i)]
                 == ToolResult(ELIDED) for i in rep.elided)
      if not rep.dropped:
        undo = list(conv)
        for i in rep.elided[:-1]:
          undo[i] = ToolResult(ELIDED)
        assert chat.count(undo) > budget  # one fewer would not fit
        seen["elide_only"] += 1
      else:
        seen["drop_too"] += 1
      given = []

      def summarize(dropped):
        given.append(dropped)
        return f"{len(dropped)} tool messages done."

      text = f"{sum(map(is_tool_history, conv))} tool messages done."
      sbudget = chat.count(core + [User(text)]) + budget - low
      if sbudget >= full:
        continue
      kept, rep = summarize_tool_history(summarize)(chat, conv, sbudget)
      _check_policy_result(chat, conv, kept, rep, sbudget)
      seen["summary"] += 1
      assert given == [[m for m in conv if is_tool_history(m)]]
      assert kept == core + [rep.summary]
      assert rep.summary == User(f"{len(given[0])} tool messages done.")
    # within the budget: unchanged, nothing reported
    for policy in (discard_all_tool_history, discard_oldest_tool_results,
                   summarize_tool_history(lambda d: "s")):
      kept, rep = policy(chat, conv, full)
      assert kept == conv and not rep.acted
  assert min(seen.values()) > 3, seen


def test_budget_errors_are_one_line(bases):
  chat = _chat(bases, "v32", "bytes")
  conv = _tool_conv(0)
  low = chat.count([m for m in conv if not is_tool_history(m)])
  for policy in (discard_all_tool_history, discard_oldest_tool_results,
                 summarize_tool_history(lambda d: "summary")):
    with pytest.raises(BudgetError) as e:
      policy(chat, conv, low - 1)
    msg = str(e.value)
    assert "\n" not in msg and f"over the budget of {low - 1}" in msg
  with pytest.raises(BudgetError, match="positive number of tokens, got 0"):
    discard_all_tool_history(chat, conv, 0)
  with pytest.raises(BudgetError, match="str or a User message, got"):
    summarize_tool_history(lambda d: Assistant("x"))(chat, conv, low)


# ------------------------------------------------------------ errors


@pytest.mark.parametrize("messages,match", [
    ([], "empty conversation"),
    ([Assistant("x")], "message 0 must be a User"),
    ([System("s"), System("t")], "message 1 must be a User"),
    ([User("u"), System("s")], "only message 0"),
    ([User("u"), ToolResult("r")], "answers no tool call"),
    ([User("u"), Assistant("a"), Assistant("b")], "only a User may follow"),
    ([User("u"), Assistant("a", "", [CALL, CALL]), ToolResult("r")],
     "inside a group of tool results"),
    ([User("u"), Assistant("a", "", [CALL]), User("v")], "still owed"),
    ([User("u"), Assistant("a", "", [CALL]), ToolResult("r"), User("v")],
     "the assistant answers first"),
    ([User("u"), "hello"], "message 1 is a str"),
    ([User(3)], "content must be a str"),
    ([User("u"), Assistant("a", "", [ToolCall("", {})])], "non-empty name"),
])
def test_malformed_conversations(messages, match):
  for fmt in (DeepSeekV32(), SmolLM2()):
    with pytest.raises(ChatError, match=match) as e:
      Chat(fmt, base=tokenizer_lib.Tokenizer("bytes")).encode(messages)
    assert "\n" not in str(e.value)


def test_special_tokens_in_text_are_refused():
  bytes_tok = tokenizer_lib.Tokenizer("bytes")
  v32, smol = Chat(DeepSeekV32(), base=bytes_tok), Chat(SmolLM2(),
                                                        base=bytes_tok)
  with pytest.raises(ChatError, match="message 0 .User. contains the special "
                     "token '</think>'"):
    v32.encode([User("a</think>b")])
  with pytest.raises(ChatError, match="argument 'q'"):
    v32.encode([User("u"), Assistant("", "", [ToolCall("f", {"q": E})])])
  with pytest.raises(ChatError, match="quote"):
    v32.encode([User("u"), Assistant("", "", [ToolCall("f", {'a"b': 1})])])
  with pytest.raises(ChatError, match="<\\|im_end\\|>"):
    smol.encode([User("x<|im_end|>")])
  with pytest.raises(ChatError, match="reasoning holds '<tool_call>'"):
    smol.encode([User("u"), Assistant("", "see <tool_call>")])
  with pytest.raises(ChatError, match="not a prompt"):
    smol.prompt([User("u"), Assistant("a")])
  with pytest.raises(ChatError, match="exactly one of"):
    Chat(SmolLM2())
  for chat in (v32, smol):
    with pytest.raises(ChatError, match="not a JSON value: {1}"):
      chat.encode([User("u"), Assistant("", "", [ToolCall("f", {"a": {1}})])])
    with pytest.raises(ChatError, match="must hold ToolSpecs"):
      chat.encode([System("s", [{"name": "f"}]), User("u")])


@pytest.mark.parametrize("text,match", [
    ("no close" + E, "no '</think>'"),
    ("r</think>a</think>", "unexpected"),
    (f"r</think>a{U}b", "holds"),
    ("r</think>a\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n"
     "\n</｜DSML｜invoke>", "not closed"),
    ("r</think>a\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n"
     "<｜DSML｜parameter name=\"x\" string=\"false\">nope</｜DSML｜parameter>"
     "\n</｜DSML｜invoke>\n</｜DSML｜function_calls>", "not JSON"),
    ("r</think>a\n\n<｜DSML｜function_calls>\njunk\n</｜DSML｜function_calls>",
     "malformed invoke"),
    ("r</think>a <｜DSML｜", "malformed tool calls"),
])
def test_v32_parse_errors(text, match):
  with pytest.raises(ChatError, match=match):
    DeepSeekV32().parse(text)


@pytest.mark.parametrize("text,match", [
    ("<think>\nnever closed", "without"),
    ("a\n<tool_call>\n{bad}\n</tool_call>", "not JSON"),
    ("a\n<tool_call>\n{\"name\": \"f\"}\n</tool_call>", "must be"),
    ("a\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}", "without"),
    ("a\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>x",
     "after the tool calls"),
    ("a <think> b", "misplaced"),
    ("a<|im_start|>", "holds"),
])
def test_smollm2_parse_errors(text, match):
  with pytest.raises(ChatError, match=match):
    SmolLM2().parse(text)


def test_chat_tokenizer_round_trip(bases):
  for name, base in bases.items():
    for fmt in (DeepSeekV32(), SmolLM2()):
      tok = ChatTokenizer(base, fmt.special_tokens)
      for seed in range(5):
        text = Chat(fmt, tokenizer=tok).encode(Gen(seed).conversation()).text
        assert tok.decode(tok.encode(text)) == text, name


def test_model_view_and_messages_are_values():
  conv = [User("a"), Assistant("b", "r1"), User("c"), Assistant("d", "r2")]
  assert model_view(conv) == [User("a"), Assistant("b"), User("c"),
                              Assistant("d", "r2")]
  assert conv[1].reasoning == "r1"  # the input is not changed
  a = Assistant("x", tool_calls=[CALL])
  assert isinstance(a.tool_calls, tuple)
  assert dataclasses.replace(a, content="y").tool_calls == (CALL,)
