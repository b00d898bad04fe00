"""Chat messages and the context rules of a thinking agent, independent of
any format.

A conversation is a list of messages: an optional ``System`` first, then
user turns. A user turn is a ``User`` message and what answers it: zero or
more tool exchanges (an ``Assistant`` with ``tool_calls`` followed by one
``ToolResult`` per call, in call order) and usually a final ``Assistant``
without tool calls. The turn ends at the next ``User`` message.

The context rules (DeepSeek-V3.2's thinking-with-tools context management):

1. The reasoning of every assistant message before the last user message is
   dropped: the model never sees reasoning from an earlier user turn.
2. Reasoning after the last user message, every tool call and every tool
   result are kept.

``model_view`` applies them; every format renders ``model_view(messages)``.
Consequence (checked by the tests at the token level): within one user turn
the prompt for the next assistant message is the previous prompt plus the
previous completion plus the new tool results, so a decode cache can be
reused; a new user message may rewrite earlier tokens (reasoning disappears)
and ends that.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence, Union


class ChatError(ValueError):
  """A conversation, message or generated text that cannot be encoded or
  parsed; the message is one line naming the bad value."""


def to_json(value) -> str:
  """``value`` as JSON text (non-ASCII kept); ChatError if it is not JSON."""
  try:
    return json.dumps(value, ensure_ascii=False)
  except (TypeError, ValueError) as e:
    raise ChatError(f"not a JSON value: {value!r:.60} ({e})") from None


@dataclasses.dataclass(frozen=True)
class ToolSpec:
  """A tool the model may call: its name, what it does, and a JSON schema
  of its arguments (``{"type": "object", "properties": ...}``)."""
  name: str
  description: str = ""
  parameters: dict = dataclasses.field(default_factory=dict)

  def schema(self) -> dict:
    return {"name": self.name, "description": self.description,
            "parameters": self.parameters}


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One call: a tool name and its arguments (JSON values by name)."""
  name: str
  arguments: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class System:
  content: str
  tools: tuple[ToolSpec, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "tools", tuple(self.tools))


@dataclasses.dataclass(frozen=True)
class User:
  content: str


@dataclasses.dataclass(frozen=True)
class Assistant:
  """What the model generates: reasoning (empty: none), content, and the
  tool calls it makes (a message with tool calls continues the turn)."""
  content: str = ""
  reasoning: str = ""
  tool_calls: tuple[ToolCall, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "tool_calls", tuple(self.tool_calls))


@dataclasses.dataclass(frozen=True)
class ToolResult:
  """A tool's output, answering the calls of the preceding assistant message
  in order."""
  content: str


Message = Union[System, User, Assistant, ToolResult]
MESSAGE_TYPES = (System, User, Assistant, ToolResult)


def _kind(m: Any) -> str:
  return type(m).__name__


def validate(messages: Sequence[Message]) -> None:
  """Raises ChatError (one line, naming the index) unless ``messages`` is a
  well-formed conversation: a System only first; a User first after it; a
  User followed by a User or an Assistant; an Assistant with k tool calls
  followed by exactly k ToolResults (or nothing: the calls are the last
  message); a complete group of results followed by an Assistant; an
  Assistant without tool calls followed by a User. The conversation may
  stop after any message but inside a group of results."""
  if not messages:
    raise ChatError("empty conversation: give at least one User message")
  for i, m in enumerate(messages):
    if not isinstance(m, MESSAGE_TYPES):
      raise ChatError(f"message {i} is a {_kind(m)}, not one of System, "
                      "User, Assistant, ToolResult")
    for field in ("content", "reasoning"):
      if not isinstance(getattr(m, field, ""), str):
        raise ChatError(f"message {i} ({_kind(m)}): {field} must be a str, "
                        f"got {type(getattr(m, field)).__name__}")
    if isinstance(m, System) and not all(isinstance(t, ToolSpec)
                                         for t in m.tools):
      raise ChatError(f"message {i}: System.tools must hold ToolSpecs, got "
                      f"{[type(t).__name__ for t in m.tools]}")
    if isinstance(m, Assistant):
      for c in m.tool_calls:
        if not (isinstance(c, ToolCall) and isinstance(c.name, str) and c.name
                and isinstance(c.arguments, dict)):
          raise ChatError(f"message {i}: tool call {c!r} needs a non-empty "
                          "name and a dict of arguments")
  start = 1 if isinstance(messages[0], System) else 0
  if start == len(messages) or not isinstance(messages[start], User):
    raise ChatError(f"message {start} must be a User message (the "
                    "conversation starts with [System,] User)")
  pending = 0   # tool results still owed by the last assistant message
  for i in range(start + 1, len(messages)):
    prev, m = messages[i - 1], messages[i]
    if isinstance(m, System):
      raise ChatError(f"message {i} is a System message: only message 0 may "
                      "be one")
    if pending:
      if not isinstance(m, ToolResult):
        raise ChatError(f"message {i} is a {_kind(m)} but {pending} tool "
                        "result(s) are still owed to the tool calls before it")
      pending -= 1
      continue
    if isinstance(m, ToolResult):
      raise ChatError(f"message {i} is a ToolResult that answers no tool "
                      "call (more results than calls, or no calls)")
    if isinstance(prev, User) and isinstance(m, User):
      continue
    if isinstance(prev, (User, ToolResult)) and not isinstance(m, Assistant):
      raise ChatError(f"message {i} is a {_kind(m)} after a {_kind(prev)}: "
                      "the assistant answers first")
    if (isinstance(prev, Assistant) and not prev.tool_calls
        and not isinstance(m, User)):
      raise ChatError(f"message {i} is a {_kind(m)} after an assistant "
                      "answer without tool calls: only a User may follow")
    if isinstance(m, Assistant):
      pending = len(m.tool_calls)
  if pending and not (isinstance(messages[-1], Assistant)
                      and len(messages[-1].tool_calls) == pending):
    raise ChatError(f"the conversation stops inside a group of tool results "
                    f"({pending} still owed): send the group whole")


def last_user_index(messages: Sequence[Message]) -> int:
  """Index of the last User message (-1 if none)."""
  for i in range(len(messages) - 1, -1, -1):
    if isinstance(messages[i], User):
      return i
  return -1


def model_view(messages: Sequence[Message]) -> list[Message]:
  """The conversation as the model sees it: rule 1 (reasoning before the
  last user message is dropped); everything else kept as it is."""
  last = last_user_index(messages)
  return [dataclasses.replace(m, reasoning="")
          if isinstance(m, Assistant) and i < last and m.reasoning else m
          for i, m in enumerate(messages)]


def awaits_assistant(messages: Sequence[Message]) -> bool:
  """True when the next message is the model's: the conversation ends with
  a User message or with a complete group of tool results."""
  return bool(messages) and isinstance(messages[-1], (User, ToolResult))


def user_turns(messages: Sequence[Message]) -> list[tuple[int, int]]:
  """[start, end) message ranges of the user turns (start: the User
  message; end: the next User message or the end)."""
  starts = [i for i, m in enumerate(messages) if isinstance(m, User)]
  return list(zip(starts, starts[1:] + [len(messages)]))


def is_tool_history(m: Message) -> bool:
  """Tool history: an assistant message that makes tool calls (with its
  reasoning and content) and every tool result."""
  return isinstance(m, ToolResult) or (isinstance(m, Assistant)
                                       and bool(m.tool_calls))
