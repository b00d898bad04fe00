"""Context-budget policies: what to drop when an encoded conversation is
longer than a token budget.

Each policy takes a ``Chat`` (anything with ``count(messages)``), the
conversation and the budget in tokens (the prompt's length; leave room for
the reply yourself), and returns the shortened conversation and a
``BudgetReport`` of what it dropped. A conversation within the budget comes
back unchanged. The policies only remove or shorten tool history (assistant
messages that make tool calls, and tool results): system, user messages and
final answers stay, and the result is a valid conversation rendered under
the same context rules. Dropping rewrites earlier tokens, so a rollout
prefills again after a policy acted.

- ``discard_all_tool_history``: drop every tool exchange (V3.2's
  "discard-all", which it found to work better than summarising).
- ``discard_oldest_tool_results``: replace the oldest tool results' content
  with ``ELIDED``, one at a time (skipping results no longer than it), until
  the conversation fits; if it still does not, drop whole tool exchanges,
  oldest first.
- ``summarize_tool_history(summarize)``: drop every tool exchange and append
  ``summarize(dropped)``, a User message (or the str of one) standing for
  them. It comes last, a new last user message: the model goes on from it,
  as V3.2's summary re-initiates a rollout (no format has a role for a
  summary in the middle of an assistant's turn).

When even the minimal context (everything but the tool history, plus the
summary for the last policy) exceeds the budget, BudgetError says so in one
line.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from dsax.chat.messages import (Assistant, ChatError, Message, ToolResult,
                                User, is_tool_history)

ELIDED = "[dropped]"


class BudgetError(ChatError):
  """The conversation cannot be brought within the budget."""


@dataclasses.dataclass(frozen=True)
class BudgetReport:
  """What a policy did. Indices refer to the conversation it was given."""
  policy: str
  budget: int
  tokens_before: int
  tokens_after: int
  dropped: tuple[int, ...] = ()      # messages removed
  elided: tuple[int, ...] = ()       # tool results whose content was elided
  summary: Message | None = None     # the message appended for the dropped

  @property
  def acted(self) -> bool:
    return bool(self.dropped or self.elided or self.summary)


def _exchanges(messages: Sequence[Message]) -> list[list[int]]:
  """Tool exchanges, oldest first: an assistant message with tool calls and
  the results that answer it (message indices)."""
  out = []
  for i, m in enumerate(messages):
    if isinstance(m, Assistant) and m.tool_calls:
      out.append([i])
    elif isinstance(m, ToolResult):
      out[-1].append(i)
  return out


def _check_budget(budget: int) -> None:
  if not isinstance(budget, int) or budget < 1:
    raise BudgetError(f"budget must be a positive number of tokens, got "
                      f"{budget!r}")


def _minimal(chat, messages, budget, policy, extra=()) -> list[Message]:
  kept = [m for m in messages if not is_tool_history(m)] + list(extra)
  n = chat.count(kept)
  if n > budget:
    raise BudgetError(
        f"{policy}: even the minimal context (system, user messages, final "
        f"answers{', summary' if extra else ''}; no tool history) is {n} "
        f"tokens, over the budget of {budget}: raise the budget or shorten "
        "the conversation")
  return kept


def discard_all_tool_history(chat, messages: Sequence[Message], budget: int
                             ) -> tuple[list[Message], BudgetReport]:
  """Over the budget: drop every tool exchange."""
  _check_budget(budget)
  before = chat.count(messages)
  if before <= budget:
    return list(messages), BudgetReport("discard_all", budget, before, before)
  kept = _minimal(chat, messages, budget, "discard_all")
  dropped = tuple(i for i, m in enumerate(messages) if is_tool_history(m))
  return kept, BudgetReport("discard_all", budget, before, chat.count(kept),
                            dropped=dropped)


def discard_oldest_tool_results(chat, messages: Sequence[Message],
                                budget: int
                                ) -> tuple[list[Message], BudgetReport]:
  """Over the budget: elide tool results oldest first, then drop whole
  exchanges oldest first, until it fits."""
  _check_budget(budget)
  before = chat.count(messages)
  if before <= budget:
    return list(messages), BudgetReport("oldest_results", budget, before,
                                        before)
  _minimal(chat, messages, budget, "oldest_results")
  current, elided = list(messages), []
  n = before
  for i, m in enumerate(messages):
    if n <= budget:
      break
    if isinstance(m, ToolResult) and m.content != ELIDED:
      current[i] = ToolResult(ELIDED)
      shorter = chat.count(current)
      if shorter < n:
        elided.append(i)
        n = shorter
      else:  # a result shorter than the placeholder stays
        current[i] = m
  dropped: list[int] = []
  for exchange in _exchanges(messages):
    if n <= budget:
      break
    dropped.extend(exchange)
    gone = set(dropped)
    n = chat.count([m for i, m in enumerate(current) if i not in gone])
  gone = set(dropped)
  kept = [m for i, m in enumerate(current) if i not in gone]
  return kept, BudgetReport("oldest_results", budget, before, n,
                            dropped=tuple(dropped),
                            elided=tuple(i for i in elided if i not in gone))


def summarize_tool_history(summarize: Callable[[list[Message]], object]):
  """A policy: over the budget, drop every tool exchange and append
  ``summarize(dropped_messages)`` (a User message, or a str made one)."""

  def policy(chat, messages: Sequence[Message], budget: int
             ) -> tuple[list[Message], BudgetReport]:
    _check_budget(budget)
    before = chat.count(messages)
    if before <= budget:
      return list(messages), BudgetReport("summary", budget, before, before)
    dropped = tuple(i for i, m in enumerate(messages) if is_tool_history(m))
    summary = summarize([messages[i] for i in dropped])
    if isinstance(summary, str):
      summary = User(summary)
    if not isinstance(summary, User):
      raise BudgetError(f"the summary hook must return a str or a User "
                        f"message, got {type(summary).__name__}")
    kept = _minimal(chat, messages, budget, "summary", extra=[summary])
    return kept, BudgetReport("summary", budget, before, chat.count(kept),
                              dropped=dropped, summary=summary)

  return policy


POLICIES = {"discard_all": discard_all_tool_history,
            "oldest_results": discard_oldest_tool_results}
