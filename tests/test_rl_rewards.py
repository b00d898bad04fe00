"""Rewards and verifiable tasks (dsax.rl.rewards): arithmetic and retrieval
(passkey, MQAR) with exact-match rewards, prompt batching, scoring of
rollout completions."""

import numpy as np
import pytest

from dsax.rl import rewards
from dsax.tokenizer import Tokenizer

BYTES = Tokenizer("bytes")


def count_bytes(text):
  return len(text.encode("utf-8"))


def test_arithmetic():
  rng = np.random.default_rng(0)
  probs = [rewards.arithmetic(rng, digits=3, ops="+-*") for _ in range(50)]
  assert len({len(p.prompt) for p in probs}) == 1  # one P per setting
  for p in probs:
    a, op, b = p.prompt[3:6], p.prompt[6], p.prompt[7:10]
    want = {"+": int(a) + int(b), "-": int(a) - int(b),
            "*": int(a) * int(b)}[op]
    assert p.prompt.endswith("=") and p.data["answer"] == f" {want}"
    assert p.score(f" {want}") == 1.0
    assert p.score(f" {want}\nQ: more text") == 1.0  # the first line counts
    assert p.score(f" {want + 1}") == 0.0
    assert p.score(f" {want}0") == 0.0
    assert p.score("") == 0.0
  assert {p.prompt[6] for p in probs} == set("+-*")
  with pytest.raises(ValueError, match="ops"):
    rewards.arithmetic(rng, ops="/")


def test_arithmetic_reversed():
  """``reverse``: the same prompts (same draws), the answer's digits least
  significant first after the sign; exact match on that spelling."""
  a_rng, b_rng = np.random.default_rng(3), np.random.default_rng(3)
  for _ in range(60):
    plain = rewards.arithmetic(a_rng, digits=2, ops="+-")
    rev = rewards.arithmetic(b_rng, digits=2, ops="+-", reverse=True)
    assert rev.prompt == plain.prompt
    want = int(plain.data["answer"])
    digits = str(abs(want))[::-1]
    assert rev.data["answer"] == " " + ("-" if want < 0 else "") + digits
    assert rev.score(rev.data["answer"]) == 1.0
    if digits != digits[::-1]:
      assert rev.score(plain.data["answer"]) == 0.0
  assert rewards.spell(132, True) == "231" and rewards.spell(-40, True) == "-04"
  assert rewards.spell(7, True) == "7" and rewards.spell(120) == "120"


def test_digit_max():
  rng = np.random.default_rng(5)
  probs = [rewards.digit_max(rng, digits=6) for _ in range(200)]
  assert {len(p.prompt) for p in probs} == {len("M: 123456=")}
  for p in probs:
    s = p.prompt[3:-1]
    assert p.prompt == f"M: {s}=" and len(s) == 6 and s.isdigit()
    assert p.data["answer"] == " " + max(s)
    assert p.score(" " + max(s) + "\nM: 1") == 1.0
    if min(s) != max(s):
      assert p.score(" " + min(s)) == 0.0
    assert p.score(" " + max(s) + "0") == 0.0
  assert {p.data["answer"] for p in probs} >= {" 9", " 8", " 7"}
  with pytest.raises(ValueError, match="digits"):
    rewards.digit_max(rng, digits=0)


def test_passkey_exact_match():
  p = rewards.retrieval(np.random.default_rng(1), "passkey", 400,
                        count_bytes)
  key = p.data["answer"]
  assert key.strip().isdigit() and key.strip() in p.prompt
  assert abs(count_bytes(p.prompt + key) - 400) <= 16
  assert p.score(key) == 1.0 and p.score(key + ".\nmore") == 1.0
  assert p.score(" 00000") == 0.0 and p.score(key + "1") == 0.0


@pytest.mark.parametrize("partial", [False, True])
def test_mqar(partial):
  p = rewards.retrieval(np.random.default_rng(2), "mqar", 300, count_bytes,
                        partial=partial)
  answers = p.data["example"].meta["answers"]
  assert len(answers) > 1
  assert p.score(p.data["answer"]) == 1.0
  half = " " + ", ".join(answers[:1] + ["999999"] * (len(answers) - 1))
  assert p.score(half) == (1 / len(answers) if partial else 0.0)


def test_batch_prompts_and_score():
  rng = np.random.default_rng(3)
  probs = [rewards.arithmetic(rng, digits=1), rewards.arithmetic(rng,
                                                                 digits=2)]
  ids = [BYTES.encode(p.prompt) for p in probs]
  batch = rewards.batch_prompts(ids, pad_id=32)
  assert batch.shape == (2, 9) and batch.dtype == np.int32  # "Q: 12+34="
  assert BYTES.decode(batch[0]) == "  " + probs[0].prompt  # left-padded
  assert BYTES.decode(batch[1]) == probs[1].prompt
  eos = 10  # "\n"
  right = [BYTES.encode(p.data["answer"]) for p in probs]
  comp = np.zeros((4, 6), np.int32)  # G = 2: rows 0, 1 -> problem 0
  for row, (ids_, cut) in enumerate([(right[0], True), (b"x", False),
                                     (right[1], True), (right[0], True)]):
    ids_ = list(ids_) + ([eos, 65, 66] if cut else [])
    comp[row, :len(ids_)] = ids_[:6]
  got = rewards.score(probs, comp, 2, BYTES.decode, eos_id=eos)
  np.testing.assert_array_equal(got, [1.0, 0.0, 1.0, 0.0])
  assert rewards.completion_text([65, eos, 66], BYTES.decode, eos) == "A"
  with pytest.raises(ValueError, match="group_size"):
    rewards.score(probs, comp, 3, BYTES.decode)
