"""List tasks for ``dsax.tasks``: RULER cwe and fwe, Zoology mqar.

The list is the haystack (the ``haystack`` and ``depth`` arguments do not apply);
its size m is what ``dsax.tasks`` tunes to hit the length. ``build(m)`` is a pure
function of m (its randomness comes from a seed drawn once per example), and longer
lists are longer texts, so the length search may call it in any order.

- cwe, common words extraction (RULER): a numbered list "1. word 2. word ..." of
  ``CWE_COMMON`` common words, each repeated ``freq_cw`` times, and m other words,
  each ``freq_ucw`` times, shuffled; (freq_cw, freq_ucw) = (30, 3) from 4096
  tokens on, (6, 1) below (RULER's short-context setting). RULER's one-shot
  example is left out. Answer: the common words in order of first appearance.
- fwe, frequent words extraction (RULER): a vocabulary of ``FWE_VOCAB`` random
  6-letter coded words, word k (k = 1, 2, ...) repeated floor(m * k^-a / zeta(a))
  times with a = 2, shuffled; word 1 is the noise token "....", which the question
  says to ignore. Answer: words 2, 3, 4 by falling frequency; m is raised to the
  next value where the counts of words 2..5 strictly fall, so the answer is unique.
- mqar, multi-query associative recall (Arora et al. 2023, Zoology): m pairs
  "key: value" (4-letter keys, 6-digit values, all distinct), one a line, then a
  question for ``min(MQAR_QUERIES, m)`` of the keys in random order; answer the
  values in query order.
"""

from __future__ import annotations

import math

import numpy as np

from dsax import tasks_text

CWE_COMMON = 10
FWE_VOCAB = 2000
FWE_ALPHA = 2.0
MQAR_QUERIES = 8

_CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more "
             "often than others. Memorize the ones that appear most often.\n")
_CWE_TAIL = (f"\nQuestion: What are the {CWE_COMMON} most common words in the "
             f"above list? Answer: The top {CWE_COMMON} words that appear most "
             "often in the list are:")
_FWE_HEAD = ("Read the following coded text and track the frequency of each coded "
             "word. Find the three most frequently appeared coded words. ")
_FWE_TAIL = ("\nQuestion: Do not provide any explanation. Please ignore the dots "
             "'....'. What are the three most frequently appeared words in the "
             "above coded text? Answer: According to the coded text above, the "
             "three most frequently appeared words are:")
_MQAR_HEAD = ("Memorize the value of each key below. I will ask for the values of "
              "some of the keys.\n")


def cwe(rng: np.random.Generator, n_tokens: int):
  freq_cw, freq_ucw = (30, 3) if n_tokens >= 4096 else (6, 1)
  # Each listed word costs at least a token, which bounds the rare words needed.
  cap = min(n_tokens // freq_ucw + 1, tasks_text.PSEUDO_COUNT // 2)
  words = tasks_text.vocabulary(rng, CWE_COMMON + cap)
  seed = int(rng.integers(2**63))

  def build(m: int):
    rare = words[CWE_COMMON:CWE_COMMON + m]
    entries = words[:CWE_COMMON] * freq_cw + rare * freq_ucw
    listed = [entries[i] for i in np.random.default_rng([seed, m]).permutation(
        len(entries))]
    body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
    common = set(words[:CWE_COMMON])
    answers = list(dict.fromkeys(w for w in listed if w in common))
    meta = {"answers": answers, "haystack_span": (len(_CWE_HEAD),
                                                   len(_CWE_HEAD) + len(body)),
            "freq_common": freq_cw, "freq_rare": freq_ucw, "n_rare": m}
    return (_CWE_HEAD + body + _CWE_TAIL, " " + ", ".join(answers), meta, "")

  return build, 0, cap, ()


def _fwe_counts(m: int) -> np.ndarray:
  zeta = math.pi ** 2 / 6  # zeta(2); FWE_ALPHA is fixed at 2
  ranks = np.arange(1, FWE_VOCAB + 1, dtype=np.float64)
  return (m * ranks ** -FWE_ALPHA / zeta).astype(np.int64)


def _fwe_valid(m: int) -> int:
  """The smallest m' >= m whose counts of words 2..5 strictly fall."""
  while not np.all(np.diff(_fwe_counts(m)[1:5]) < 0):
    m += 1
  return m


def fwe(rng: np.random.Generator, n_tokens: int):
  vocab: list[str] = []
  while len(vocab) < FWE_VOCAB:  # distinct coded words, as RULER draws them
    letters = rng.integers(0, 26, (FWE_VOCAB, 6))
    fresh = ("".join(chr(97 + int(c)) for c in row) for row in letters)
    vocab = list(dict.fromkeys(vocab + list(fresh)))[:FWE_VOCAB]
  vocab[0] = "...."
  seed = int(rng.integers(2**63))

  def build(m: int):
    m = _fwe_valid(m)
    counts = _fwe_counts(m)
    words = np.repeat(np.arange(FWE_VOCAB), counts)
    words = words[np.random.default_rng([seed, m]).permutation(len(words))]
    body = " ".join(vocab[i] for i in words.tolist())
    answers = vocab[1:4]
    meta = {"answers": answers, "haystack_span": (len(_FWE_HEAD),
                                                   len(_FWE_HEAD) + len(body)),
            "counts": {vocab[i]: int(counts[i]) for i in range(5)}, "n_words": m}
    return (_FWE_HEAD + body + _FWE_TAIL, " " + ", ".join(answers), meta, "")

  # Words are at least a token each, and there are about m of them.
  return build, _fwe_valid(1), 2 * n_tokens + 64, ()


def _letters(index: int) -> str:
  out = []
  for _ in range(4):
    index, digit = divmod(index, 26)
    out.append(chr(97 + digit))
  return "".join(out)


def mqar(rng: np.random.Generator, n_tokens: int):
  seed = int(rng.integers(2**63))

  def build(m: int):
    r = np.random.default_rng([seed, m])
    keys = [_letters(i) for i in r.choice(26**4, size=m, replace=False).tolist()]
    values = [str(100_000 + v) for v in r.choice(900_000, size=m, replace=False)]
    asked = r.choice(m, size=min(MQAR_QUERIES, m), replace=False).tolist()
    body = "\n".join(f"{k}: {v}" for k, v in zip(keys, values))
    names = [keys[i] for i in asked]
    query = (f"the key {names[0]}" if len(names) == 1 else
             "the keys " + ", ".join(names[:-1]) + " and " + names[-1])
    tail = f"\nWhat are the values of {query}? The values are"
    answers = [values[i] for i in asked]
    meta = {"answers": answers, "keys": names, "n_pairs": m,
            "haystack_span": (len(_MQAR_HEAD), len(_MQAR_HEAD) + len(body))}
    return _MQAR_HEAD + body + tail, " " + ", ".join(answers), meta, ""

  return build, 1, min(n_tokens, 26**4, 900_000), ()


LISTS = {"cwe": cwe, "fwe": fwe, "mqar": mqar}


def draft(task: str, rng: np.random.Generator, n_tokens: int):
  """(build, m_min, m_max, protected) for ``dsax.tasks.generate``; see the
  module doc. ``build(m)`` -> (prompt, answer, meta, filler) with filler ""."""
  return LISTS[task](rng, n_tokens)
