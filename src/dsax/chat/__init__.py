"""Conversations for thinking agents: messages -> token ids with the mask
of what the model generated, in two formats (DeepSeek-V3.2's thinking
format, SmolLM2-Instruct's template), parsers back to assistant messages,
V3.2's context rules, and context-budget policies.

  chat = Chat(DeepSeekV32(), base=tokenizer)      # or SmolLM2()
  enc = chat.prompt([System("..."), User("...")])  # enc.ids_T, enc.mask_T
  reply = chat.parse_ids(completion_ids)           # an Assistant
  more = chat.extend(history, [ToolResult("...")]) # ids to append
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
