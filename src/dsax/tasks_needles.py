"""Needle tasks for ``dsax.tasks``: passkey, RULER NIAH, variable tracking.

Every task here is ``head + filler-with-needles + tail``, and the answer follows
the tail. The filler is m units of the haystack (``tasks_text``: sentences of the
noise text, words of the natural text); ``dsax.tasks`` picks m so the example has
the requested length. A needle at depth d goes to the unit boundary whose offset in
the needle-free filler is nearest to ``d * len(filler)``, so the achieved depth
(``meta["depths"]``) is within half a unit of d.

Depths. ``depth=None``: each needle at an independent uniform depth (sorted where
order matters: variable-tracking chains and the values of niah_multivalue).
``depth=d``: needle i of n at ``d + (1 - d) * i / n`` -- the first needle (the
target, the first value, the first queried key, the chain's head) exactly at d, the
rest spread evenly over the text after it.

Templates (answers start with a space; several answers are joined by ", "):

- passkey (Mohtashami & Jaggi 2023): the Landmark-Attention instruction, filler,
  "The pass key is NNNNN. Remember it. NNNNN is the pass key." on its own line,
  filler, "What is the pass key? The pass key is" -> " NNNNN" (10000..99999).
- niah_* (RULER, Hsieh et al. 2024; "numbers" values): instruction "Some special
  magic numbers are hidden within the following text. ...", needles "One of the
  special magic numbers for {key} is: {value}." with keys "adjective-noun" and
  7-digit values, question "What are all the special magic numbers for {query}
  mentioned in the provided text? The special magic numbers for {query} mentioned
  in the provided text are". single: one needle. multikey: the target among
  ``N_NEEDLES - 1`` distractors with other keys. multivalue: ``N_NEEDLES`` values
  of one key, answered in text order. multiquery: ``N_NEEDLES`` keys queried as
  "k1, k2, k3, and k4", answered in query order.
- variable_tracking (RULER): one chain "VAR A = 12345", "VAR B = VAR A", ... of
  ``VT_HOPS`` hops over 5-letter upper-case names, one statement a line; the
  answer lists the ``VT_HOPS + 1`` names in chain order.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from dsax import tasks_text

N_NEEDLES = 4  # RULER's num_needle_k / num_needle_v / num_needle_q
VT_HOPS = 4    # RULER's variable-tracking default: 1 chain, 4 hops

_PASSKEY_HEAD = ("There is an important info hidden inside a lot of irrelevant "
                 "text. Find it and memorize them. I will quiz you about the "
                 "important information there.\n")
_NIAH_HEAD = ("Some special magic numbers are hidden within the following text. "
              "Make sure to memorize it. I will quiz you about the numbers "
              "afterwards.\n")
_NIAH_TAIL = ("\nWhat are all the special magic numbers for {q} mentioned in the "
              "provided text? The special magic numbers for {q} mentioned in the "
              "provided text are")
_VT_HEAD = ("Memorize and track the chain(s) of variable assignment hidden in the "
            "following text.\n\n")
_VT_TAIL = ("\nQuestion: Find all variables that are assigned the value {v} in the "
            "text above. Answer: According to the chain(s) of variable assignment "
            "in the text above, {n} variables are assigned the value {v}, they "
            "are:")


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a needle task puts around and into the filler.

  ``protected``: strings that must not occur in the filler itself (values, keys,
  names), so that each occurs in the prompt only where the task put it.
  """
  head: str
  needles: tuple[str, ...]
  depths: tuple[float, ...]
  tail: str
  answers: tuple[str, ...]
  sep: str
  protected: tuple[str, ...]


def _depths(rng: np.random.Generator, depth: float | None, n: int,
            ordered: bool) -> tuple[float, ...]:
  if depth is None:
    drawn = rng.uniform(0.0, 1.0, n)
    return tuple(sorted(drawn) if ordered else drawn.tolist())
  return tuple(depth + (1.0 - depth) * i / n for i in range(n))


def _numbers(rng: np.random.Generator, n: int, digits: int) -> list[str]:
  low = 10 ** (digits - 1)
  return [str(low + int(v)) for v in rng.choice(9 * low, size=n, replace=False)]


def _magic(key: str, value: str) -> str:
  return f"One of the special magic numbers for {key} is: {value}."


def passkey(rng, depth) -> Layout:
  key = _numbers(rng, 1, 5)[0]
  needle = f"The pass key is {key}. Remember it. {key} is the pass key."
  return Layout(_PASSKEY_HEAD, (needle,), _depths(rng, depth, 1, True),
                "\nWhat is the pass key? The pass key is", (key,), "\n", (key,))


def niah_single(rng, depth) -> Layout:
  key, value = tasks_text.keys(rng, 1)[0], _numbers(rng, 1, 7)[0]
  return Layout(_NIAH_HEAD, (_magic(key, value),), _depths(rng, depth, 1, True),
                _NIAH_TAIL.format(q=key), (value,), " ", (key, value))


def niah_multikey(rng, depth) -> Layout:
  keys, values = tasks_text.keys(rng, N_NEEDLES), _numbers(rng, N_NEEDLES, 7)
  needles = tuple(map(_magic, keys, values))  # needle 0 is the target
  return Layout(_NIAH_HEAD, needles, _depths(rng, depth, N_NEEDLES, False),
                _NIAH_TAIL.format(q=keys[0]), (values[0],), " ",
                tuple(keys + values))


def niah_multivalue(rng, depth) -> Layout:
  key, values = tasks_text.keys(rng, 1)[0], _numbers(rng, N_NEEDLES, 7)
  needles = tuple(_magic(key, v) for v in values)
  return Layout(_NIAH_HEAD, needles, _depths(rng, depth, N_NEEDLES, True),
                _NIAH_TAIL.format(q=key), tuple(values), " ", (key, *values))


def niah_multiquery(rng, depth) -> Layout:
  keys, values = tasks_text.keys(rng, N_NEEDLES), _numbers(rng, N_NEEDLES, 7)
  query = ", ".join(keys[:-1]) + ", and " + keys[-1]
  return Layout(_NIAH_HEAD, tuple(map(_magic, keys, values)),
                _depths(rng, depth, N_NEEDLES, False), _NIAH_TAIL.format(q=query),
                tuple(values), " ", tuple(keys + values))


def variable_tracking(rng, depth) -> Layout:
  names: list[str] = []
  while len(names) < VT_HOPS + 1:  # distinct names; redraw the rare repeat
    name = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, 5))
    if name not in names:
      names.append(name)
  value = _numbers(rng, 1, 5)[0]
  chain = (f"VAR {names[0]} = {value}",) + tuple(
      f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:]))
  return Layout(_VT_HEAD, chain, _depths(rng, depth, len(chain), True),
                _VT_TAIL.format(v=value, n=len(names)), tuple(names), "\n",
                (value, *names))


LAYOUTS: dict[str, Callable[..., Layout]] = {
    "passkey": passkey, "niah_single": niah_single,
    "niah_multikey": niah_multikey, "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery, "variable_tracking": variable_tracking}


def weave(units: Sequence[str], needles: Sequence[str], depths: Sequence[float],
          sep: str) -> tuple[str, list[tuple[int, int]], list[float]]:
  """Joins the units and puts each needle at the boundary nearest its depth.

  Returns the text, each needle's (start, end) in it, and each achieved depth:
  characters of needle-free filler before the needle over all of them. A needle
  is preceded by ``sep``; a "\\n" separator also ends the needle's line.
  """
  lengths = np.fromiter(map(len, units), dtype=np.int64, count=len(units))
  # Boundary i in the needle-free filler, whose first separator is dropped.
  offsets = np.maximum(np.concatenate([[0], np.cumsum(lengths)]) - 1, 0)
  total = max(int(offsets[-1]), 1)
  slots = [int(np.abs(offsets - d * total).argmin()) for d in depths]
  order = sorted(range(len(needles)), key=lambda j: (slots[j], j))
  parts, spans = [], [(0, 0)] * len(needles)
  pos = prev = 0
  after_needle = False
  for j in order + [None]:
    slot = len(units) if j is None else slots[j]
    if slot > prev:
      chunk = "".join(units[prev:slot])
      if pos == 0:
        chunk = chunk[1:]
      elif after_needle and sep == "\n":
        chunk = "\n" + chunk[1:]
      parts.append(chunk)
      pos, prev, after_needle = pos + len(chunk), slot, False
    if j is None:
      break
    lead = sep if pos else ""
    parts.append(lead + needles[j])
    spans[j] = (pos + len(lead), pos + len(lead) + len(needles[j]))
    pos, after_needle = spans[j][1], True
  return "".join(parts), spans, [float(offsets[s]) / total for s in slots]


def draft(task: str, rng: np.random.Generator, haystack: str,
          depth: float | None):
  """(build, m_min, m_max, protected) for ``dsax.tasks.generate``.

  ``build(m)`` -> (prompt, answer, meta, filler) with m filler units; ``filler``
  is the needle-free haystack text, which must not contain ``protected``.
  """
  start = tasks_text.natural_start(rng) if haystack == "natural" else 0
  layout = LAYOUTS[task](rng, depth)

  def build(m: int):
    if haystack == "natural":
      units = tasks_text.natural_units(start, m)
    else:
      units = tasks_text.noise_units(m)
    text, spans, depths = weave(units, layout.needles, layout.depths, layout.sep)
    prompt = layout.head + text + layout.tail
    shift = len(layout.head)
    meta = {"answers": list(layout.answers), "needles": list(layout.needles),
            "needle_spans": [(a + shift, b + shift) for a, b in spans],
            "depths": depths, "haystack_span": (shift, shift + len(text)),
            "filler_units": m}
    answer = " " + ", ".join(layout.answers)
    return prompt, answer, meta, "".join(units)[1:]

  return build, 0, None, layout.protected
