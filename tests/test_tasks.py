"""Synthetic tasks: length, needle placement, determinism, metrics, and an oracle
that answers from the prompt alone (it never reads ``answer`` or ``meta``)."""

import collections
import re

import numpy as np
import pytest

from dsax import tasks
from dsax import tasks_needles
from dsax import tasks_text


def n_bytes(text: str) -> int:
  return len(text.encode("utf-8"))


LENGTHS = (256, 1024, 4096)
NEEDLE_TASKS = tuple(tasks_needles.LAYOUTS)
# With a byte "tokenizer", 256 tokens hold only these tasks' fixed text; the
# others need 376 (niah_single) to 979 (cwe) bytes and must refuse 256.
FITS_256 = {"passkey", "mqar"}


def make(task, seed, n, haystack="noise", depth=None):
  return tasks.generate(task, np.random.default_rng(seed), n, n_bytes,
                        haystack, depth)


def count_word(text: str, word: str) -> int:
  return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text))


# ------------------------------------------------------------------ the oracle


def _oracle_niah(prompt):
  query = re.search(r"What are all the special magic numbers for (.+?) mentioned "
                    r"in the provided text\?", prompt).group(1)
  keys = re.split(r", and |, ", query)
  values = []
  for key in keys:
    found = re.findall(rf"One of the special magic numbers for {re.escape(key)} "
                       r"is: (\d{7})\.", prompt)
    values += found if len(keys) == 1 else found[:1]
  return values


def _oracle_vt(prompt):
  value = re.search(r"assigned the value (\d+) in the text above", prompt).group(1)
  holders = []
  for name, source, number in re.findall(
      r"^VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))$", prompt, re.M):
    if number == value or source in holders:  # statements come in chain order
      holders.append(name)
  return holders


def _body(prompt, start, end_marker):
  return prompt[prompt.index(start) + len(start):prompt.rindex(end_marker)]


def oracle(example):
  """The answer, read from the prompt by regexes, counting and chain following."""
  prompt, task = example.prompt, example.task
  if task == "passkey":
    answers = re.findall(r"The pass key is (\d{5})\. Remember it\.", prompt)
  elif task.startswith("niah"):
    answers = _oracle_niah(prompt)
    if task != "niah_multivalue" and task != "niah_multiquery":
      answers = answers[:1]
  elif task == "variable_tracking":
    answers = _oracle_vt(prompt)
  elif task == "cwe":
    words = re.findall(r"\d+\. ([a-z]+)",
                       _body(prompt, "most often.\n", "\nQuestion:"))
    answers = [w for w, _ in collections.Counter(words).most_common(10)]
  elif task == "fwe":
    words = _body(prompt, "coded words. ", "\nQuestion:").split()
    counts = collections.Counter(w for w in words if w != "....")
    answers = [w for w, _ in counts.most_common(3)]
  else:  # mqar
    pairs = dict(re.findall(r"^([a-z]{4}): (\d{6})$", prompt, re.M))
    asked = re.search(r"What are the values of the keys? (.+)\?", prompt).group(1)
    answers = [pairs[k] for k in re.split(r", | and ", asked)]
  return " " + ", ".join(answers)


def guess(example, rng):
  """A uniform random guess of the right shape, and its expected recall. For the
  list tasks it picks among the prompt's own candidates (the fair chance level)."""
  prompt, task = example.prompt, example.task
  k = len(example.meta["answers"])
  if task == "passkey":
    return f" {rng.integers(10_000, 100_000)}", 0.0
  if task.startswith("niah"):
    picks = [str(rng.integers(1_000_000, 10_000_000)) for _ in range(k)]
    return " " + ", ".join(picks), 0.0
  if task == "variable_tracking":
    picks = ["".join(chr(65 + c) for c in rng.integers(0, 26, 5))
             for _ in range(k)]
    return " " + ", ".join(picks), 0.0
  if task == "cwe":
    pool = re.findall(r"\d+\. ([a-z]+)",
                      _body(prompt, "most often.\n", "\nQuestion:"))
  elif task == "fwe":
    pool = [w for w in _body(prompt, "coded words. ", "\nQuestion:").split()
            if w != "...."]
  else:
    pool = re.findall(r"^[a-z]{4}: (\d{6})$", prompt, re.M)
  pool = sorted(set(pool))
  picks = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
  return " " + ", ".join(picks), k / len(pool)


# ------------------------------------------------------------------ the tests


def check_placement(example):
  """Each needle once, where meta says; each value once (passkey: twice, in its
  needle); keys and names never in the filler."""
  prompt, meta = example.prompt, example.meta
  start, end = meta["haystack_span"]
  for needle, (a, b) in zip(meta["needles"], meta["needle_spans"]):
    assert prompt.count(needle) == 1, needle
    assert prompt[a:b] == needle and start <= a and b <= end
  if example.task == "passkey":
    key = meta["answers"][0]
    assert count_word(prompt, key) == 2
    assert count_word(meta["needles"][0], key) == 2
  elif example.task == "variable_tracking":
    for name in meta["answers"]:
      assert count_word(prompt, f"VAR {name} =") == 1
  else:
    for value in meta["answers"]:
      assert count_word(prompt, value) == 1, value


@pytest.mark.parametrize("haystack", tasks.HAYSTACKS)
@pytest.mark.parametrize("task", tasks.TASKS)
def test_length_placement_and_answer(task, haystack):
  for seed, n in enumerate(LENGTHS):
    if n == 256 and task not in FITS_256:
      with pytest.raises(ValueError, match="shortest example"):
        make(task, seed, n, haystack)
      continue
    example = make(task, seed, n, haystack)
    total = n_bytes(example.prompt + example.answer)
    assert example.meta["n_tokens"] == total
    assert abs(total - n) <= tasks.tolerance(n), (n, total)
    assert example.task == task and example.meta["target_tokens"] == n
    assert not example.prompt[-1].isspace() and example.answer.startswith(" ")
    assert example.answer == " " + ", ".join(example.meta["answers"])
    if task in NEEDLE_TASKS:
      check_placement(example)
    elif task == "mqar":
      for value in example.meta["answers"]:
        assert count_word(example.prompt, value) == 1


def test_min_tokens_is_the_refusal_point():
  for task in tasks.TASKS:
    shortest = tasks.min_tokens(task, n_bytes)
    assert shortest > 256 + 16 or task in FITS_256
    example = make(task, 0, shortest)
    assert abs(example.meta["n_tokens"] - shortest) <= tasks.tolerance(shortest)


@pytest.mark.parametrize("haystack", tasks.HAYSTACKS)
@pytest.mark.parametrize("task", ["passkey", "niah_single"])
def test_depth_placement(task, haystack):
  for n in (1024, 4096):  # at 256 bytes the passkey has no room for filler
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
      example = make(task, int(depth * 100) + n, n, haystack, depth)
      start, end = example.meta["haystack_span"]
      hay = example.prompt[start:end]
      (needle,) = example.meta["needles"]
      relative = hay.index(needle) / (len(hay) - len(needle) - 1)
      assert abs(relative - depth) <= 0.05, (n, depth, relative)
      assert abs(example.meta["depths"][0] - depth) <= 0.05


@pytest.mark.parametrize("task", [t for t in NEEDLE_TASKS if t != "passkey"])
def test_multi_needles_spread_from_depth(task):
  example = make(task, 3, 4096, "natural", 0.2)
  depths = example.meta["depths"]
  assert abs(depths[0] - 0.2) <= 0.02
  if len(depths) > 1:
    assert all(0.2 - 0.02 <= d <= 1.0 for d in depths)
    assert np.all(np.diff(depths) > 0.05)  # spread, not bunched
  starts = [a for a, _ in example.meta["needle_spans"]]
  assert starts == sorted(starts)


@pytest.mark.parametrize("haystack", tasks.HAYSTACKS)
def test_same_seed_same_bytes(haystack):
  for task in tasks.TASKS:
    a, b = make(task, 11, 2048, haystack), make(task, 11, 2048, haystack)
    assert a == b
    assert make(task, 12, 2048, haystack).prompt != a.prompt


def test_haystacks_differ_and_noise_is_landmark():
  noise = make("passkey", 0, 2048, "noise")
  natural = make("passkey", 0, 2048, "natural")
  start, end = noise.meta["haystack_span"]
  assert noise.prompt.startswith("There is an important info hidden inside a "
                                 "lot of irrelevant text.")
  assert noise.prompt.endswith("\nWhat is the pass key? The pass key is")
  assert "The grass is green. The sky is blue." in noise.prompt[start:end]
  assert "The grass is green" not in natural.prompt
  key = noise.meta["answers"][0]
  assert (f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
          in noise.prompt)


def test_score_hand_made():
  single = tasks.Example("... The pass key is", " 12345", "passkey",
                         {"answers": ["12345"]})
  assert tasks.score(single, " 12345") == 1.0
  assert tasks.score(single, "12345.") == 1.0
  assert tasks.score(single, " 12345 is the pass key") == 0.0
  assert tasks.score(single, " 54321") == 0.0
  assert tasks.score(single, "") == 0.0
  multi = tasks.Example("...", " 1111111, 2222222, 3333333, 4444444",
                        "niah_multivalue",
                        {"answers": ["1111111", "2222222", "3333333", "4444444"]})
  assert tasks.score(multi, " 1111111, 2222222, 3333333, 4444444") == 1.0
  assert tasks.score(multi, "4444444 and 2222222 ...") == 0.5
  assert tasks.score(multi, "11111112 2222222") == 0.25  # whole words only
  assert tasks.score(multi, "no idea") == 0.0
  words = tasks.Example("...", " apple, pear", "cwe", {"answers": ["apple", "pear"]})
  assert tasks.score(words, "Apple, PEAR.") == 1.0
  assert tasks.score(words, "pineapple") == 0.0


@pytest.mark.parametrize("task", tasks.TASKS)
def test_oracle_is_perfect_and_guessing_is_chance(task):
  rng = np.random.default_rng(0)
  oracle_scores, guess_scores, chances = [], [], []
  for seed in range(20):
    haystack = tasks.HAYSTACKS[seed % 2]
    n = int(rng.integers(1024, 4097))
    example = make(task, 100 + seed, n, haystack)
    prediction = oracle(example)
    if task in tasks.SINGLE_ANSWER:
      assert prediction == example.answer
    oracle_scores.append(tasks.score(example, prediction))
    guessed, chance = guess(example, rng)
    guess_scores.append(tasks.score(example, guessed))
    chances.append(chance)
  assert np.mean(oracle_scores) == 1.0
  assert np.mean(guess_scores) <= np.mean(chances) + 0.15
  if task not in ("cwe", "fwe", "mqar"):
    assert np.mean(guess_scores) <= 0.05


def test_errors_name_the_value():
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    make("nope", 0, 1024)
  with pytest.raises(ValueError, match="unknown haystack 'essay'"):
    make("passkey", 0, 1024, "essay")
  with pytest.raises(ValueError, match="depth=1.5"):
    make("passkey", 0, 1024, "noise", 1.5)


def test_text_sources():
  paragraphs = tasks_text.natural_paragraphs()
  assert len(paragraphs) >= 1000
  assert not any(re.search(r"\d{4}", p) for p in paragraphs)
  assert len(set(tasks_text.WORDS)) == len(tasks_text.WORDS) >= 500
  words = tasks_text.vocabulary(np.random.default_rng(0), 5000)
  assert len(set(words)) == 5000
  assert set(words[:len(tasks_text.WORDS)]) == set(tasks_text.WORDS)
  units = tasks_text.noise_units(7)
  assert "".join(units)[1:].startswith(" ".join(tasks_text.NOISE))


def test_weave_edges():
  units = [" a.", " b.", " c."]
  text, spans, depths = tasks_needles.weave(units, ["X", "Y"], [0.0, 1.0], " ")
  assert text == "X a. b. c. Y" and depths == [0.0, 1.0]
  assert [text[a:b] for a, b in spans] == ["X", "Y"]
  text, _, _ = tasks_needles.weave(units, ["N"], [0.5], "\n")
  assert text in ("a.\nN\nb. c.", "a. b.\nN\nc.")
  assert tasks_needles.weave([], ["N"], [0.3], " ")[0] == "N"


def test_length_search_is_cheap():
  calls = []

  def counting(text):
    calls.append(len(text))
    return n_bytes(text)

  for task in tasks.TASKS:
    calls.clear()
    tasks.generate(task, np.random.default_rng(0), 65_536, counting, "natural")
    assert len(calls) <= 12, (task, len(calls))
