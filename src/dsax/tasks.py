"""Synthetic long-context tasks: offline generators and their metrics.

``generate(task, rng, n_tokens, count_tokens, haystack, depth)`` returns an
``Example``: ``prompt`` ends where the answer starts, ``answer`` is the expected
continuation (it starts with a space; several answers are joined by ", " in the
order asked), and ``count_tokens(prompt + answer)`` is within ``tolerance(n_tokens)
= max(16, ceil(0.02 * n_tokens))`` of ``n_tokens``. Everything is drawn from
``rng``: the same generator state gives a byte-identical example.

Tasks (templates and sources: ``tasks_needles``, ``tasks_lists``, ``tasks_text``):

  passkey            Landmark Attention (Mohtashami & Jaggi 2023), 5-digit key
  niah_single        RULER (Hsieh et al. 2024): one "special magic number" needle
  niah_multikey      the target needle among 3 distractors with other keys
  niah_multivalue    4 values for one key; all are answered, in text order
  niah_multiquery    4 keys asked together; values in query order
  variable_tracking  a chain VAR A = 12345, VAR B = VAR A, ... (4 hops)
  cwe                the 10 most common words of a numbered word list
  fwe                the 3 most frequent words of Zipf-distributed coded text
  mqar               Zoology (Arora et al. 2023) multi-query associative recall

``haystack`` ("noise": the Landmark filler; "natural": standard-library prose) and
``depth`` (the needle's relative position; None draws it) apply to the needle
tasks; cwe, fwe and mqar are their own haystack. Each needle sentence occurs once
in the prompt and the filler never contains a task's keys or values, so a value
occurs only in its needle (the passkey twice, both in its one needle).

Length. The filler (or list) size m is searched, not the text: the shortest example
is measured, then a probe, then secant and bisection steps on a bracket until the
count is within ``tolerance // 8`` or the bracket is one unit wide -- 3-9
``count_tokens`` calls per example at any length (128K BPE tokens: 0.4-2 s, mostly
tokenizing). Below a task's fixed text ``generate`` raises ValueError rather than
return an example of the wrong length; ``min_tokens`` measures it. In UTF-8 bytes:
mqar 156, passkey 251, niah_single 376, variable_tracking 435, fwe 525,
niah_multikey 568, niah_multivalue 595, niah_multiquery 693, cwe 979; with a
4096-entry byte-level BPE: 58, 82, 110, 196, 247, 191, 207, 265, 462 tokens.

Metrics. ``score``: exact match (whitespace-normalised, one trailing "." ignored)
for the single-answer tasks (passkey, niah_single, niah_multikey); for the others
the RULER recall, the share of reference answers that occur in the prediction as
whole words, case-insensitively.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

from dsax import tasks_lists
from dsax import tasks_needles

TASKS: tuple[str, ...] = ("passkey", "niah_single", "niah_multikey",
                          "niah_multivalue", "niah_multiquery",
                          "variable_tracking", "cwe", "fwe", "mqar")
HAYSTACKS = ("noise", "natural")
SINGLE_ANSWER = frozenset({"passkey", "niah_single", "niah_multikey"})

# A task redraws its keys/values when the natural filler happens to contain one.
_ATTEMPTS = 16
_MAX_STEPS = 64


@dataclasses.dataclass(frozen=True)
class Example:
  """One task instance.

  meta: ``answers`` (list of reference strings), ``n_tokens`` (the measured
  length), ``target_tokens``, ``haystack`` (None for list tasks), ``depth`` (as
  asked), ``haystack_span`` (start, end) of the filler or list in the prompt; the
  needle tasks add ``needles``, ``needle_spans`` (prompt offsets) and ``depths``
  (achieved); the list tasks add their sizes and counts.
  """
  prompt: str
  answer: str
  task: str
  meta: dict


def tolerance(n_tokens: int) -> int:
  """Allowed |count_tokens(prompt + answer) - n_tokens|."""
  return max(16, math.ceil(0.02 * n_tokens))


def _draft(task: str, rng: np.random.Generator, n_tokens: int, haystack: str,
           depth: float | None):
  if task in tasks_needles.LAYOUTS:
    return tasks_needles.draft(task, rng, haystack, depth)
  return tasks_lists.draft(task, rng, n_tokens)


def _fit(task: str, build, n_tokens: int, count_tokens: Callable[[str], int],
         m_min: int, m_max: int | None) -> tuple[int, int]:
  """The size m whose example length is nearest n_tokens, and that length.

  Assumes the length grows with m (roughly: a tokenizer may merge across a seam).
  """
  counts: dict[int, int] = {}

  def count(m: int) -> int:
    if m not in counts:
      prompt, answer, _, _ = build(m)
      counts[m] = int(count_tokens(prompt + answer))
    return counts[m]

  def best() -> int:
    return min(counts, key=lambda k: (abs(counts[k] - n_tokens), k))

  tol = tolerance(n_tokens)
  lo = m_min
  if count(lo) > n_tokens + tol:
    raise ValueError(f"{task}: n_tokens={n_tokens} is below its shortest example "
                     f"({count(lo)} tokens with no filler)")
  if count(lo) >= n_tokens:
    return lo, count(lo)
  # Grow: extrapolate from the slope so far until the count reaches n_tokens.
  hi = lo + 16 if m_max is None else min(lo + 16, m_max)
  for _ in range(_MAX_STEPS):
    if count(hi) >= n_tokens:
      break
    if m_max is not None and hi >= m_max:
      raise ValueError(f"{task}: n_tokens={n_tokens} needs more than its "
                       f"largest list ({count(hi)} tokens at size {hi})")
    slope = max((count(hi) - count(lo)) / (hi - lo), 1e-6)
    lo, hi = hi, hi + max(1, math.ceil(1.05 * (n_tokens - count(hi)) / slope))
    if m_max is not None:
      hi = min(hi, m_max)
  # Shrink [lo, hi] (count(lo) < n_tokens <= count(hi)): secant steps, with a
  # bisection every other step so a bent length curve still converges.
  goal = max(1, tol // 8)
  for step in range(_MAX_STEPS):
    if hi - lo <= 1 or abs(counts[best()] - n_tokens) <= goal:
      break
    if step % 2 == 0:
      frac = (n_tokens - count(lo)) / max(count(hi) - count(lo), 1)
      m = lo + round(frac * (hi - lo))
    else:
      m = (lo + hi) // 2
    m = min(max(m, lo + 1), hi - 1)
    if count(m) < n_tokens:
      lo = m
    else:
      hi = m
  m = best()
  return m, counts[m]


def _collides(filler: str, protected: tuple[str, ...]) -> bool:
  return any(re.search(rf"(?<!\w){re.escape(s)}(?!\w)", filler)
             for s in protected)


def generate(task: str, rng: np.random.Generator, n_tokens: int,
             count_tokens: Callable[[str], int], haystack: str = "noise",
             depth: float | None = None) -> Example:
  """An example of ``task`` whose prompt + answer has about n_tokens tokens."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  if haystack not in HAYSTACKS:
    raise ValueError(f"unknown haystack {haystack!r}; expected one of {HAYSTACKS}")
  if depth is not None and not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth={depth} is outside [0, 1]")
  if n_tokens < 1:
    raise ValueError(f"n_tokens={n_tokens} must be positive")
  for _ in range(_ATTEMPTS):
    build, m_min, m_max, protected = _draft(task, rng, n_tokens, haystack, depth)
    m, n = _fit(task, build, n_tokens, count_tokens, m_min, m_max)
    prompt, answer, meta, filler = build(m)
    if not _collides(filler, protected):
      break
  else:
    raise RuntimeError(f"{task}: the filler contained a key or value in "
                       f"{_ATTEMPTS} draws")
  needle_task = task in tasks_needles.LAYOUTS
  meta.update(n_tokens=n, target_tokens=n_tokens, depth=depth,
              haystack=haystack if needle_task else None)
  return Example(prompt=prompt, answer=answer, task=task, meta=meta)


def min_tokens(task: str, count_tokens: Callable[[str], int],
               draws: int = 8) -> int:
  """The longest of ``draws`` shortest examples (no filler, smallest list): the
  length below which ``generate`` may raise. cwe is measured with its short-
  context repetition counts (used below 4096 tokens)."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  longest = 0
  for seed in range(draws):
    build, m_min, _, _ = _draft(task, np.random.default_rng(seed), 1, "noise",
                                None)
    prompt, answer, _, _ = build(m_min)
    longest = max(longest, int(count_tokens(prompt + answer)))
  return longest


def _normal(text: str) -> str:
  text = " ".join(text.split())
  return text[:-1] if text.endswith(".") else text


def _contains(prediction: str, reference: str) -> bool:
  return re.search(rf"(?<!\w){re.escape(reference)}(?!\w)", prediction,
                   re.IGNORECASE) is not None


def score(example: Example, prediction: str) -> float:
  """1.0/0.0 exact match for single-answer tasks; else the share of
  ``meta["answers"]`` found in the prediction (RULER's string_match_all).

  Exact match wants the prediction cut to the answer (e.g. as many tokens as the
  answer, or up to the first newline); recall tolerates extra text.
  """
  if example.task in SINGLE_ANSWER:
    return float(_normal(prediction) == _normal(example.answer))
  answers = example.meta["answers"]
  return sum(_contains(prediction, a) for a in answers) / len(answers)
