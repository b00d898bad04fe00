"""SmolLM2-Instruct's chat template, with a textual convention for
reasoning and tool calls.

The template (the ``tokenizer.chat_template`` of SmolLM2-135M-Instruct's
GGUF, which ``launch.py prepare smollm2`` imports) renders every message as
``<|im_start|>{role}\\n{content}<|im_end|>\\n``, puts a default system
prompt first when the conversation has none, and opens a reply with
``<|im_start|>assistant\\n``. The model generates the content and
``<|im_end|>`` (mask 1); the line break after it is prompt.

SmolLM2 has no reasoning or tool markers, so the assistant's content is,
by our convention (plain text, no new tokens)::

  [<think>\\n{reasoning}\\n</think>\\n\\n]{content}
  [\\n<tool_call>\\n{json}\\n</tool_call>]...   (no line break but the written \\n)

with one ``<tool_call>`` block per call, ``{json}`` being
``{"name": ..., "arguments": {...}}`` on one line (``json.dumps``,
``ensure_ascii=False``); the think block only when there is reasoning.
Tool results are messages of role ``tool``. Tools are listed after the
system prompt (our wording, schemas one JSON per line inside
``<tools>...</tools>``). Assistant content and reasoning may not hold
``<think>``, ``</think>``, ``<tool_call>`` or ``</tool_call>``, and no text
may hold ``<|im_start|>`` or ``<|im_end|>`` (ChatError): they would not
parse back.
"""

from __future__ import annotations

import json
from typing import Sequence

from dsax.chat.messages import (Assistant, ChatError, Message, System, to_json,
                                ToolCall, ToolResult, User, model_view,
                                validate)
from dsax.chat.tokens import Segment, check_text

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (IM_START, IM_END)
DEFAULT_SYSTEM = ("You are a helpful AI assistant named SmolLM, trained by "
                  "Hugging Face")
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
CALL_OPEN, CALL_CLOSE = "\n<tool_call>\n", "\n</tool_call>"
MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
TOOLS_BLOCK = (
    "You can call the tools below. To call one, end your reply with a line "
    "<tool_call>, then {\"name\": NAME, \"arguments\": {...}} as JSON on one "
    "line, then </tool_call>; one block per call. Each result comes back as "
    "a message from the tool.\n<tools>\n{schemas}\n</tools>")


class SmolLM2:
  """SmolLM2-Instruct's template plus the think / tool_call convention."""

  name = "smollm2"
  special_tokens = SPECIAL_TOKENS
  end_token = IM_END

  def __init__(self, keep_reasoning: bool = False):
    """``keep_reasoning``: render every assistant's reasoning, also before
    the last user message (no context rule 1: the keep-everything baseline
    of a context experiment; within a conversation no prompt then rewrites
    an earlier one)."""
    self.keep_reasoning = keep_reasoning

  def body(self, m: Assistant, where: str = "assistant") -> str:
    """The assistant text between the opener and ``<|im_end|>``."""
    for field in ("content", "reasoning"):
      for s in MARKERS:
        if s in getattr(m, field):
          raise ChatError(f"{where}: {field} holds {s!r}, which the "
                          "SmolLM2 convention reserves")
    text = THINK_OPEN + m.reasoning + THINK_CLOSE if m.reasoning else ""
    text += m.content
    for c in m.tool_calls:
      text += CALL_OPEN + to_json({"name": c.name,
                                 "arguments": c.arguments}) + CALL_CLOSE
    return text

  def render(self, messages: Sequence[Message]) -> list[Segment]:
    validate(messages)
    view = list(messages) if self.keep_reasoning else model_view(messages)
    out = []
    if not isinstance(view[0], System):
      out.append(Segment(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n"))
    for i, m in enumerate(view):
      where = f"message {i} ({type(m).__name__})"
      if isinstance(m, Assistant):
        text = self.body(m, where)
        check_text(text, SPECIAL_TOKENS, where)
        out.append(Segment(f"{IM_START}assistant\n"))
        out.append(Segment(text + IM_END, generated=True, message=i))
        out.append(Segment("\n"))
        continue
      text = m.content
      if isinstance(m, System) and m.tools:
        text += "\n\n" + TOOLS_BLOCK.replace(
            "{schemas}", "\n".join(to_json(t.schema()) for t in m.tools))
      check_text(text, SPECIAL_TOKENS, where)
      role = {System: "system", User: "user", ToolResult: "tool"}[type(m)]
      out.append(Segment(f"{IM_START}{role}\n{text}{IM_END}\n"))
    if isinstance(view[-1], (User, ToolResult)):
      out.append(Segment(f"{IM_START}assistant\n"))
    return out

  def parse(self, text: str) -> Assistant:
    """The assistant message in generated text, with or without the final
    ``<|im_end|>``. ChatError on malformed text."""
    if text.endswith(IM_END):
      text = text[:-len(IM_END)]
    for s in SPECIAL_TOKENS:
      if s in text:
        raise ChatError(f"generated text holds {s!r} before its end: "
                        f"{text[:60]!r}...")
    reasoning = ""
    if text.startswith(THINK_OPEN):
      k = text.find(THINK_CLOSE)
      if k < 0:
        raise ChatError(f"a <think> block without {THINK_CLOSE!r}: "
                        f"{text[:60]!r}...")
      reasoning, text = text[len(THINK_OPEN):k], text[k + len(THINK_CLOSE):]
    calls = []
    k = text.find(CALL_OPEN)
    content, rest = (text, "") if k < 0 else (text[:k], text[k:])
    while rest:
      if not rest.startswith(CALL_OPEN):
        raise ChatError(f"text after the tool calls: {rest[:60]!r}")
      end = rest.find(CALL_CLOSE)
      if end < 0:
        raise ChatError(f"a <tool_call> block without </tool_call>: "
                        f"{rest[:60]!r}")
      raw = rest[len(CALL_OPEN):end]
      try:
        call = json.loads(raw)
      except json.JSONDecodeError:
        raise ChatError(f"a tool call that is not JSON: {raw[:60]!r}") from None
      if (not isinstance(call, dict) or set(call) != {"name", "arguments"}
          or not isinstance(call["name"], str)
          or not isinstance(call["arguments"], dict)):
        raise ChatError(f"a tool call must be {{\"name\": str, \"arguments\": "
                        f"{{...}}}}, got {raw[:60]!r}")
      calls.append(ToolCall(call["name"], call["arguments"]))
      rest = rest[end + len(CALL_CLOSE):]
    for s in MARKERS:
      if s in content or s in reasoning:
        raise ChatError(f"misplaced {s!r} in generated text: {text[:60]!r}")
    return Assistant(content=content, reasoning=reasoning,
                     tool_calls=tuple(calls))
