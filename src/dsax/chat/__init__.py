"""Conversations for thinking agents: messages -> token ids with the mask
of what the model generated, in two formats (DeepSeek-V3.2's thinking
format, SmolLM2-Instruct's template), parsers back to assistant messages,
V3.2's context rules, and context-budget policies.

A multi-turn tool-use rollout on it::

  chat = Chat(DeepSeekV32(), base=tokenizer)       # or SmolLM2()
  conv = [System("...", tools=[ToolSpec(...)]), User("...")]
  ids = chat.prompt(conv).ids_T                     # prefill these
  # sample with RolloutConfig(eos_id=chat.end_id) -> completion ids
  reply = chat.parse_ids(completion)                # Assistant; ChatError
  conv.append(reply)                                # if malformed
  results = [ToolResult(env(c)) for c in reply.tool_calls]
  more = chat.extend(conv, results)                 # append more.ids_T to
  conv += results                                   # prompt + completion
  conv, report = discard_all_tool_history(chat, conv, budget)  # if too long

Modules: messages (dataclasses, validate, the rules: model_view), tokens
(ChatTokenizer, Chat, Encoded), deepseek_v32, smollm2, budget.
"""

from dsax.chat.budget import (ELIDED, POLICIES, BudgetError, BudgetReport,
                              discard_all_tool_history,
                              discard_oldest_tool_results,
                              summarize_tool_history)
from dsax.chat.deepseek_v32 import DeepSeekV32
from dsax.chat.messages import (Assistant, ChatError, Message, System,
                                ToolCall, ToolResult, ToolSpec, User,
                                awaits_assistant, is_tool_history,
                                last_user_index, model_view, user_turns,
                                validate)
from dsax.chat.smollm2 import SmolLM2
from dsax.chat.tokens import Chat, ChatTokenizer, Encoded, Segment

__all__ = [
    "Assistant", "BudgetError", "BudgetReport", "Chat", "ChatError",
    "ChatTokenizer", "DeepSeekV32", "ELIDED", "Encoded", "Message",
    "POLICIES", "Segment", "SmolLM2", "System", "ToolCall", "ToolResult",
    "ToolSpec", "User", "awaits_assistant", "discard_all_tool_history",
    "discard_oldest_tool_results", "is_tool_history", "last_user_index",
    "model_view", "summarize_tool_history", "user_turns", "validate",
]
