"""Rewards and verifiable tasks the project generates itself (no downloads).

A reward is a function ``(prompt, completion, data) -> float`` of the
prompt text, the completion text (cut at EOS by ``completion_text``) and
the task data the generator drew. A ``Problem`` is a prompt, its data and
its reward. Generators:

  arithmetic  "Q: 0347+0512=" -> " 859" : a +, - or * of two zero-padded
              d-digit numbers (every prompt of one setting has the same
              length in any tokenizer that spells digits alike); reward
              ``exact_match`` of the completion's first line. ``reverse``:
              the answer's digits least significant first (" 958").
  digit_max   "M: 382719=" -> " 9" : the largest of d uniform random
              digits; reward ``exact_match``.
  retrieval   a ``dsax.tasks`` example (passkey, MQAR, ...) at a target
              length: long-context RL on the DSA model. passkey is scored
              by ``dsax.tasks.score`` (exact match); MQAR by the exact
              match of the whole answer list (``partial=True``: the share
              of values found, RULER's recall).

Both answers start with a space, as in dsax.tasks. The first line of the
completion is what is scored: a policy ends its answer with a newline or
EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dsax import tasks

Reward = Callable[[str, str, Mapping[str, Any]], float]
# The tasks generated here rather than by dsax.tasks; every prompt of one
# setting has one length.
GENERATED = ("arithmetic", "digit_max")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One verifiable prompt: ``reward(prompt, completion, data)``."""
  prompt: str
  data: Mapping[str, Any]
  reward: Reward

  def score(self, completion: str) -> float:
    return float(self.reward(self.prompt, completion, self.data))


def first_line(text: str) -> str:
  return text.split("\n", 1)[0]


def exact_match(prompt: str, completion: str,
                data: Mapping[str, Any]) -> float:
  """1.0 when the completion's first line equals ``data["answer"]`` up to
  surrounding whitespace, else 0.0."""
  del prompt
  return float(first_line(completion).strip() == str(data["answer"]).strip())


OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
       "*": lambda a, b: a * b}


def spell(n: int, reverse: bool = False) -> str:
  """``n`` in decimal; ``reverse``: its digits least significant first,
  after the sign (132 -> "231", -40 -> "-04")."""
  digits = str(abs(n))
  return ("-" if n < 0 else "") + (digits[::-1] if reverse else digits)


def arithmetic(rng: np.random.Generator, digits: int = 2,
               ops: str = "+", reverse: bool = False) -> Problem:
  """``Q: a<op>b=`` with a, b uniform d-digit numbers, zero-padded; the
  answer is the result in decimal, its digits least significant first when
  ``reverse`` (the order in which addition produces them: a small
  transformer learns the carries far sooner that way)."""
  bad = set(ops) - set(OPS)
  if bad or not ops:
    raise ValueError(f"arithmetic ops must be drawn from {''.join(OPS)!r}, "
                     f"got {ops!r}")
  if digits < 1:
    raise ValueError(f"arithmetic digits must be >= 1, got {digits}")
  a, b = (int(x) for x in rng.integers(0, 10 ** digits, size=2))
  op = ops[int(rng.integers(len(ops)))]
  prompt = f"Q: {a:0{digits}d}{op}{b:0{digits}d}="
  answer = " " + spell(OPS[op](a, b), reverse)
  return Problem(prompt, {"task": "arithmetic", "answer": answer},
                 exact_match)


def digit_max(rng: np.random.Generator, digits: int = 6) -> Problem:
  """``M: <s>=`` with ``s`` a string of ``digits`` uniform decimal digits;
  the answer is the largest of them (every prompt of one setting has the
  same length)."""
  if digits < 1:
    raise ValueError(f"digit_max digits must be >= 1, got {digits}")
  d = rng.integers(0, 10, digits)
  return Problem(f"M: {''.join(str(int(x)) for x in d)}=",
                 {"task": "digit_max", "answer": f" {int(d.max())}"},
                 exact_match)


def _retrieval_reward(partial: bool) -> Reward:
  def reward(prompt: str, completion: str, data: Mapping[str, Any]) -> float:
    del prompt
    ex = data["example"]
    line = first_line(completion)
    if ex.task in tasks.SINGLE_ANSWER or partial:
      return tasks.score(ex, line)
    return float(" ".join(line.split()).rstrip(".") ==
                 " ".join(ex.answer.split()))
  return reward


def retrieval(rng: np.random.Generator, task: str, n_tokens: int,
              count_tokens: Callable[[str], int], haystack: str = "noise",
              partial: bool = False) -> Problem:
  """A ``dsax.tasks`` example of about ``n_tokens`` tokens (prompt and
  answer) as a Problem; exact-match reward unless ``partial``."""
  ex = tasks.generate(task, rng, n_tokens, count_tokens, haystack)
  return Problem(ex.prompt, {"task": task, "answer": ex.answer,
                             "example": ex}, _retrieval_reward(partial))


def completion_text(tokens: Sequence[int], decode: Callable[[list], str],
                    eos_id: int = -1) -> str:
  """The completion's text, cut before the first ``eos_id``."""
  ids = [int(t) for t in tokens]
  if eos_id >= 0 and eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  return decode(ids)


def batch_prompts(token_lists: Sequence[Sequence[int]],
                  pad_id: int) -> np.ndarray:
  """Left-pads prompts to one length (the rollout needs one P): int32
  [O, P]. The pad tokens are part of the prompt for sampling and training
  alike, so the policies stay consistent."""
  p = max(len(t) for t in token_lists)
  out = np.full((len(token_lists), p), pad_id, np.int32)
  for i, t in enumerate(token_lists):
    if len(t):
      out[i, p - len(t):] = np.asarray(t, np.int32)
  return out


def score(problems: Sequence[Problem], completions_BT: np.ndarray,
          group_size: int, decode: Callable[[list], str],
          eos_id: int = -1) -> np.ndarray:
  """Rewards f32 [B] of rollout completions: row o * G + y is sample y of
  problem o."""
  completions_BT = np.asarray(completions_BT)
  if completions_BT.shape[0] != len(problems) * group_size:
    raise ValueError(f"{completions_BT.shape[0]} completions for "
                     f"{len(problems)} problems x group_size {group_size}")
  return np.asarray([
      problems[i // group_size].score(
          completion_text(row, decode, eos_id))
      for i, row in enumerate(completions_BT)], np.float32)
