"""The DeepSeek-V3.2 thinking format, written from its published
description: the ``encoding/`` folder of huggingface.co/deepseek-ai/
DeepSeek-V3.2 (its README and encoding_dsv32.py, read through the copies in
vLLM and in the rtp-llm pull request that quotes the README; this is our
own encoder, not theirs), and the V3.2 paper's context management for
thinking with tools.

A conversation renders as (thinking mode; ``|`` is the full-width ``｜``)::

  <|begin▁of▁sentence|>{system}[\\n\\n{tools block}]
  <|User|>{user}<|Assistant|>{opener}
  {reasoning}</think>{content}[\\n\\n{calls}]<|end▁of▁sentence|>
  \\n\\n<function_results>\\n<result>{out 1}</result>...
  \\n</function_results>\\n\\n{opener}
  ...

(no line breaks but the written ``\\n``). The opener after a user message
is ``<think>`` for the last user message and ``</think>`` for earlier
ones; after a group of tool results it is ``<think>`` after the last user
message and ``</think>`` before it. Reasoning (and its ``</think>``) is
rendered only for assistant messages after the last user message: the
context rules of ``dsax.chat.messages`` (earlier reasoning was never seen).
The tool calls::

  <|DSML|function_calls>\\n
  <|DSML|invoke name="NAME">\\n
  <|DSML|parameter name="KEY" string="true">raw string</|DSML|parameter>\\n
  <|DSML|parameter name="KEY" string="false">JSON value</|DSML|parameter>\\n
  </|DSML|invoke>\\n ... </|DSML|function_calls>

(invokes and parameters separated by one ``\\n``). The model generates
everything after the opener up to and including ``<|end▁of▁sentence|>``
(mask 1); tool results are prompt.

Choices made here (not fixed by the description):

- Special tokens: bos, eos, ``<|User|>``, ``<|Assistant|>``, ``<think>``,
  ``</think>`` (DeepSeek's vocabulary has ids 0, 1, 128803, 128804, 128798,
  128799 for them) and ``|DSML|`` (treated as one token here; we could not
  check whether it is one id in DeepSeek's vocabulary). ``<function_results>``
  and ``<result>`` are plain text, as in V3.2 (V3.1's tool-output tokens are
  gone).
- The tools block after the system prompt is a short instruction of our
  own wording, then the JSON schemas one per line inside
  ``<functions>...</functions>``; DeepSeek's exact wording is not
  reproduced. Tools need a System message.
- The thinking mode is the default; ``thinking=False`` gives the chat mode
  (every opener ``</think>``, no reasoning rendered or parsed).
- Tool results carry no tool name (V3.2 matches them to calls by order).
- Text holding a special token, a parameter name holding ``"`` or a line
  break, and a tool name holding ``"`` are refused (ChatError): they would
  not parse back.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from dsax.chat.messages import (Assistant, ChatError, Message, System, to_json,
                                ToolCall, ToolResult, User, last_user_index,
                                model_view, validate)
from dsax.chat.tokens import Segment, check_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, DSML)

CALLS_OPEN = f"\n\n<{DSML}function_calls>\n"
CALLS_CLOSE = f"\n</{DSML}function_calls>"
RESULTS_OPEN = "\n\n<function_results>"
RESULTS_CLOSE = "\n</function_results>\n\n"

TOOLS_BLOCK = (
    "## Tools\n"
    "You can call the functions below. To call, write a "
    f"<{DSML}function_calls> block after your answer: one "
    f"<{DSML}invoke name=\"NAME\"> per call, one "
    f"<{DSML}parameter name=\"KEY\" string=\"true|false\">VALUE"
    f"</{DSML}parameter> per argument (string=\"true\": the raw string; "
    "\"false\": a JSON value). Results come back in <function_results>.\n"
    "<functions>\n{schemas}\n</functions>\n")

_INVOKE = re.compile(
    f"<{DSML}invoke name=\"([^\"\n]*)\">\n(.*?)\n</{DSML}invoke>", re.DOTALL)
_PARAM = re.compile(
    f"<{DSML}parameter name=\"([^\"\n]*)\" string=\"(true|false)\">(.*?)"
    f"</{DSML}parameter>", re.DOTALL)


class DeepSeekV32:
  """The V3.2 format (``thinking``: the thinking mode)."""

  name = "deepseek_v32"
  special_tokens = SPECIAL_TOKENS
  end_token = EOS

  def __init__(self, thinking: bool = True):
    self.thinking = thinking

  def _opener(self, think: bool) -> str:
    return THINK if self.thinking and think else END_THINK

  def _calls(self, calls: Sequence[ToolCall], where: str) -> str:
    invokes = []
    for c in calls:
      if '"' in c.name or "\n" in c.name:
        raise ChatError(f"{where}: tool name {c.name!r} holds a quote or a "
                        "line break")
      params = []
      for key, value in c.arguments.items():
        if not isinstance(key, str) or '"' in key or "\n" in key:
          raise ChatError(f"{where}: argument name {key!r} of {c.name!r} "
                          "must be a str without quotes or line breaks")
        text = value if isinstance(value, str) else to_json(value)
        check_text(text, SPECIAL_TOKENS, f"{where}: argument {key!r}")
        params.append(f"<{DSML}parameter name=\"{key}\" string=\""
                      f"{'true' if isinstance(value, str) else 'false'}\">"
                      f"{text}</{DSML}parameter>")
      invokes.append(f"<{DSML}invoke name=\"{c.name}\">\n"
                     + "\n".join(params) + f"\n</{DSML}invoke>")
    return CALLS_OPEN + "\n".join(invokes) + CALLS_CLOSE

  def render(self, messages: Sequence[Message]) -> list[Segment]:
    validate(messages)
    view = model_view(messages)
    last = last_user_index(view)
    out = [Segment(BOS)]
    for i, m in enumerate(view):
      where = f"message {i} ({type(m).__name__})"
      check_text(m.content, SPECIAL_TOKENS, where)
      if isinstance(m, System):
        text = m.content
        if m.tools:
          schemas = "\n".join(to_json(t.schema()) for t in m.tools)
          check_text(schemas, SPECIAL_TOKENS, f"{where} tools")
          text += "\n\n" + TOOLS_BLOCK.replace("{schemas}", schemas)
        out.append(Segment(text))
      elif isinstance(m, User):
        out.append(Segment(USER + m.content + ASSISTANT
                           + self._opener(i == last)))
      elif isinstance(m, Assistant):
        check_text(m.reasoning, SPECIAL_TOKENS, where)
        text = ""
        if self.thinking and i > last:
          text = m.reasoning + END_THINK
        text += m.content
        if m.tool_calls:
          text += self._calls(m.tool_calls, where)
        out.append(Segment(text + EOS, generated=True, message=i))
      else:  # ToolResult
        j = i - 1
        while isinstance(view[j], ToolResult):
          j -= 1
        first, n_calls = i == j + 1, len(view[j].tool_calls)
        text = ((RESULTS_OPEN if first else "")
                + f"\n<result>{m.content}</result>")
        if i - j == n_calls:
          text += RESULTS_CLOSE + self._opener(i > last)
        out.append(Segment(text))
    return out

  def parse(self, text: str) -> Assistant:
    """The assistant message in generated text (what follows the opener),
    with or without the final end token. ChatError on malformed text."""
    if text.endswith(EOS):
      text = text[:-len(EOS)]
    for s in (BOS, EOS, USER, ASSISTANT, THINK):
      if s in text:
        raise ChatError(f"generated text holds {s!r} before its end: "
                        f"{text[:60]!r}...")
    reasoning = ""
    if self.thinking:
      if END_THINK not in text:
        raise ChatError(f"generated text has no {END_THINK!r} closing the "
                        f"reasoning: {text[:60]!r}...")
      reasoning, text = text.split(END_THINK, 1)
    if END_THINK in text:
      raise ChatError(f"generated text has an unexpected {END_THINK!r} "
                      "(a second one, or one in the chat mode)")
    content, calls = text, ()
    k = text.find(CALLS_OPEN)
    if k >= 0:
      content, calls = text[:k], self._parse_calls(text[k:])
    if DSML in content:
      raise ChatError(f"malformed tool calls in generated text: "
                      f"{text[:80]!r}...")
    return Assistant(content=content, reasoning=reasoning, tool_calls=calls)

  def _parse_calls(self, block: str) -> tuple[ToolCall, ...]:
    if not block.endswith(CALLS_CLOSE):
      raise ChatError(f"tool calls not closed by {CALLS_CLOSE.strip()!r}: "
                      f"{block[-60:]!r}")
    body = block[len(CALLS_OPEN):-len(CALLS_CLOSE)]
    calls, pos = [], 0
    while True:
      m = _INVOKE.match(body, pos)
      if not m:
        raise ChatError(f"malformed invoke at {body[pos:pos + 60]!r}")
      calls.append(ToolCall(m.group(1), self._parse_args(m.group(2))))
      pos = m.end()
      if pos == len(body):
        return tuple(calls)
      if body[pos] != "\n":
        raise ChatError(f"text between invokes: {body[pos:pos + 60]!r}")
      pos += 1

  @staticmethod
  def _parse_args(body: str) -> dict:
    args, pos = {}, 0
    while pos < len(body):
      m = _PARAM.match(body, pos)
      if not m:
        raise ChatError(f"malformed parameter at {body[pos:pos + 60]!r}")
      key, is_str, raw = m.groups()
      if is_str == "true":
        args[key] = raw
      else:
        try:
          args[key] = json.loads(raw)
        except json.JSONDecodeError:
          raise ChatError(f"parameter {key!r} has string=\"false\" but is "
                          f"not JSON: {raw[:60]!r}") from None
      pos = m.end()
      if pos < len(body):
        if body[pos] != "\n":
          raise ChatError(f"text between parameters: {body[pos:pos + 60]!r}")
        pos += 1
        if pos == len(body):
          raise ChatError("a trailing line break after the last parameter")
    return args
