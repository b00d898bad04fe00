"""Rendered conversations -> token ids with the generated-token mask.

A format renders a conversation as ``Segment``s: text, whether the model
generated it, and (when it did) the index of the assistant message. The
ids are the concatenation of the encodings of *pieces*: a piece ends at
every special token and wherever ``generated`` (or the generating message)
changes. Splitting at special tokens is what a ``tokenizers`` tokenizer does
itself; splitting at the prompt/completion boundary is what sampling does
(the sampler appends its own tokens after the prompt's). So a prompt's ids
followed by its completion's ids are exactly the ids of the longer
conversation, with no BPE merge across the boundary, and within a user turn
each prompt's ids are a prefix of the next one's. Elsewhere the ids equal
those of encoding the whole string in one call.

``ChatTokenizer`` adds a format's special tokens to a dsax ``Tokenizer``:
one the base tokenizer already encodes as a single id (SmolLM2's
``<|im_start|>``) keeps it; the others get new ids from the base
vocabulary's size up (a bytes or BPE model trained in the V3.2 format has
``vocab_size = base + len(new)``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol, Sequence

import numpy as np

from dsax.chat.messages import (Assistant, ChatError, Message,
                                awaits_assistant, user_turns)


@dataclasses.dataclass(frozen=True)
class Segment:
  text: str
  generated: bool = False
  message: int = -1      # the assistant message that generated it, else -1


class ChatFormat(Protocol):
  """What ``Chat`` needs from a format."""
  name: str
  special_tokens: tuple[str, ...]
  end_token: str       # the token that ends a generated message

  def render(self, messages: Sequence[Message]) -> list[Segment]:
    ...

  def parse(self, text: str) -> Assistant:
    ...


class ChatTokenizer:
  """A dsax ``Tokenizer`` (anything with encode, decode, vocab_size) plus
  special tokens that always encode as one id each."""

  def __init__(self, base, special_tokens: Sequence[str]):
    self.base = base
    self.special_ids: dict[str, int] = {}
    next_id = base.vocab_size
    for s in dict.fromkeys(special_tokens):
      ids = list(base.encode(s))
      if len(ids) == 1 and base.decode(ids) == s:
        self.special_ids[s] = int(ids[0])
      else:
        self.special_ids[s] = next_id
        next_id += 1
    self.vocab_size = next_id
    self.special_of = {i: s for s, i in self.special_ids.items()}
    by_length = sorted(self.special_ids, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, by_length)) + ")"
                             if by_length else "(?!)")

  def encode(self, text: str) -> list[int]:
    ids = []
    for k, piece in enumerate(self._split.split(text)):
      if k % 2:
        ids.append(self.special_ids[piece])
      elif piece:
        ids.extend(int(i) for i in self.base.encode(piece))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    out, run = [], []
    for i in (int(i) for i in ids):
      if i in self.special_of:
        if run:
          out.append(self.base.decode(run))
          run = []
        out.append(self.special_of[i])
      else:
        run.append(i)
    if run:
      out.append(self.base.decode(run))
    return "".join(out)

  def id_of(self, special: str) -> int:
    return self.special_ids[special]


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One encoded conversation. ``mask_T`` is 1 on what the model generated
  (assistant reasoning, content, tool calls, end token), 0 elsewhere;
  ``owner_T`` is the index of the generating assistant message on those
  tokens and -1 elsewhere."""
  ids_T: np.ndarray      # int32 [T]
  mask_T: np.ndarray     # int32 [T]
  owner_T: np.ndarray    # int32 [T]
  text: str

  def __len__(self) -> int:
    return int(self.ids_T.shape[0])


class Chat:
  """A format bound to a tokenizer: encode, count, parse, extend."""

  def __init__(self, fmt: ChatFormat, tokenizer: ChatTokenizer | None = None,
               base=None):
    """Give ``tokenizer`` or a ``base`` dsax Tokenizer (the format's special
    tokens are added to it)."""
    if (tokenizer is None) == (base is None):
      raise ChatError("Chat needs exactly one of tokenizer= or base=")
    self.fmt = fmt
    self.tok = tokenizer or ChatTokenizer(base, fmt.special_tokens)
    missing = [s for s in fmt.special_tokens if s not in self.tok.special_ids]
    if missing:
      raise ChatError(f"the tokenizer lacks the {fmt.name} special tokens "
                      f"{missing}: build it with ChatTokenizer(base, "
                      "fmt.special_tokens)")

  @property
  def end_id(self) -> int:
    """The id that ends a generated message (the sampler's eos_id)."""
    return self.tok.id_of(self.fmt.end_token)

  def encode(self, messages: Sequence[Message]) -> Encoded:
    """The conversation's ids and masks. It ends with the generation opener
    when the model is to answer next (``awaits_assistant``)."""
    segments = self.fmt.render(messages)
    ids, mask, owner, text = [], [], [], []
    k = 0
    while k < len(segments):
      seg = segments[k]
      piece = [seg.text]
      k += 1
      while (k < len(segments) and segments[k].generated == seg.generated
             and segments[k].message == seg.message):
        piece.append(segments[k].text)
        k += 1
      piece_ids = self.tok.encode("".join(piece))
      ids.extend(piece_ids)
      mask.extend([int(seg.generated)] * len(piece_ids))
      owner.extend([seg.message if seg.generated else -1] * len(piece_ids))
      text.extend(piece)
    return Encoded(np.asarray(ids, np.int32), np.asarray(mask, np.int32),
                   np.asarray(owner, np.int32), "".join(text))

  def count(self, messages: Sequence[Message]) -> int:
    return len(self.encode(messages))

  def prompt(self, messages: Sequence[Message]) -> Encoded:
    """``encode`` for a conversation the model answers next."""
    if not awaits_assistant(messages):
      last = type(messages[-1]).__name__ if messages else "nothing"
      raise ChatError(f"not a prompt: the conversation ends with a {last}; "
                      "the model answers a User message or tool results")
    return self.encode(messages)

  def parse(self, text: str) -> Assistant:
    """An assistant message from generated text (the end token optional)."""
    return self.fmt.parse(text)

  def parse_ids(self, ids: Sequence[int]) -> Assistant:
    """Like ``parse``, from generated ids; ids after the first end token
    (the sampler's padding) are ignored."""
    ids = [int(i) for i in ids]
    if self.end_id in ids:
      ids = ids[:ids.index(self.end_id) + 1]
    return self.fmt.parse(self.tok.decode(ids))

  def extend(self, history: Sequence[Message],
             new: Sequence[Message]) -> Encoded:
    """What ``new`` appends to ``history``'s encoding (ids, mask, owner,
    text): ``encode(history)`` followed by it is ``encode(history + new)``.
    Within a user turn a rollout appends its ids to the prompt and the
    completion it sampled (tool results and the next opener: mask 0), so
    the decode cache stays valid. ChatError when the longer conversation
    rewrites earlier tokens (a new user message)."""
    short = self.encode(history)
    full = self.encode(list(history) + list(new))
    n = len(short)
    if len(full) < n or not np.array_equal(full.ids_T[:n], short.ids_T):
      first = (int(np.argmax(full.ids_T[:n] != short.ids_T))
               if len(full) >= n else n)
      raise ChatError(f"the new messages rewrite earlier tokens (from "
                      f"position {first}): a new user message drops "
                      "reasoning and re-opens the context; re-encode and "
                      "prefill again")
    return Encoded(full.ids_T[n:], full.mask_T[n:], full.owner_T[n:],
                   full.text[len(short.text):])

  def turn_samples(self, messages: Sequence[Message]) -> list[Encoded]:
    """One training sample per user turn: the conversation up to the end of
    that turn, as the model saw it while answering (that user message the
    last one), with ``mask_T`` on that turn's assistant messages only. Every
    prompt the turn was sampled from is a prefix of its sample, so each
    generated token is scored in exactly the context it was sampled in.
    The assistants' ids here are their text's encoding; a sampler may have
    drawn another token sequence for the same text, so a rollout builds its
    samples from the ids it sampled (prompt, completion, ``extend``)."""
    out = []
    for start, end in user_turns(messages):
      enc = self.encode(messages[:end])
      keep_T = (enc.owner_T >= start) & (enc.owner_T < end)
      out.append(dataclasses.replace(
          enc, mask_T=(enc.mask_T * keep_T).astype(np.int32),
          owner_T=np.where(keep_T, enc.owner_T, -1).astype(np.int32)))
    return out


def check_text(text: str, specials: Sequence[str], where: str) -> None:
  """ChatError if ``text`` holds one of the format's special tokens (they
  would be encoded as markers, not text)."""
  for s in specials:
    if s in text:
      raise ChatError(f"{where} contains the special token {s!r}; remove it "
                      "(it would be read as a marker)")
