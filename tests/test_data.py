"""Data pipeline: sources, split, tokenizers, packing invariants, iterator state.

Packing tests use documents made of one repeated letter each (doc k = letter k),
so every token names its document and the boundaries can be checked from the
tokens alone.
"""

import hashlib
import json
import os
import string

import numpy as np
import pytest

from dsax import data, documents
from dsax import tokenizer as tokenizer_lib
from dsax.config import ConfigError, DataConfig
from dsax.tokenizer import Tokenizer

LETTERS = string.ascii_uppercase
BYTES = Tokenizer("bytes")


def letter_docs(lengths):
  return [LETTERS[k] * n for k, n in enumerate(lengths)]


def take_rows(it, n_rows):
  """The first n_rows rows of an iterator of batches, as a list of dicts."""
  rows = []
  while len(rows) < n_rows:
    batch = next(it)
    rows.extend({k: v[b] for k, v in batch.items()}
                for b in range(len(batch["inputs"])))
  return rows[:n_rows]


def stream_of(rows):
  """The token stream the rows were cut from: each window is inputs + last target."""
  return np.concatenate([np.r_[r["inputs"], r["targets"][-1:]] for r in rows])


def runs(stream):
  """Run-length encoding: [(token, length), ...]."""
  edges = np.flatnonzero(np.diff(stream)) + 1
  starts = np.r_[0, edges]
  lengths = np.diff(np.r_[starts, len(stream)])
  return [(int(stream[s]), int(n)) for s, n in zip(starts, lengths)]


def check_row_invariants(row, seq_len):
  x, y = row["inputs"], row["targets"]
  assert x.shape == (seq_len,) and x.dtype == np.int32
  for key in ("targets", "segment_ids", "positions"):
    assert row[key].shape == (seq_len,) and row[key].dtype == np.int32, key
  assert row["weights"].dtype == np.float32
  np.testing.assert_array_equal(y[:-1], x[1:])  # next token within the row
  start = np.r_[True, x[1:] != x[:-1]]          # a letter change = a new doc
  np.testing.assert_array_equal(row["segment_ids"], np.cumsum(start))
  expected_pos = np.zeros(seq_len, np.int32)
  for t in range(1, seq_len):
    expected_pos[t] = 0 if start[t] else expected_pos[t - 1] + 1
  np.testing.assert_array_equal(row["positions"], expected_pos)
  np.testing.assert_array_equal(row["weights"], (y == x).astype(np.float32))


# ------------------------------------------------------------------- packing


LENGTHS = [1, 2, 16, 17, 40, 5, 100, 3, 33, 8, 1, 60, 12, 18, 7, 50]


def test_packing_invariants_first_epoch():
  seq_len = 16
  cfg = DataConfig(seq_len=seq_len, batch_size=4, seed=1)
  it = data.make_train_iterator(cfg, BYTES, letter_docs(LENGTHS))
  rows = take_rows(it, sum(LENGTHS) // (seq_len + 1))
  for row in rows:
    check_row_invariants(row, seq_len)
  # The windows tile one permutation of the documents, each whole and once.
  found = runs(stream_of(rows))
  letters = [tok for tok, _ in found]
  assert len(set(letters)) == len(letters)
  for tok, n in found[:-1]:
    assert n == LENGTHS[tok - ord("A")]
  assert found[-1][1] <= LENGTHS[found[-1][0] - ord("A")]
  assert letters != sorted(letters)  # shuffled


def test_packing_epochs_reshuffle_and_cover_all_documents():
  seq_len, total = 16, sum(LENGTHS)
  cfg = DataConfig(seq_len=seq_len, batch_size=4, seed=1)
  it = data.make_train_iterator(cfg, BYTES, letter_docs(LENGTHS))
  stream = stream_of(take_rows(it, 3 * total // (seq_len + 1) + 1))
  orders = []
  for epoch in range(3):
    part = stream[epoch * total:(epoch + 1) * total]
    counts = np.bincount(part - ord("A"), minlength=len(LENGTHS))
    np.testing.assert_array_equal(counts, LENGTHS)
    orders.append([tok for tok, _ in runs(part)])
  assert orders[0] != orders[1] != orders[2]


def test_row_features_same_tokens_different_documents_and_padding():
  # The same document twice in a row (possible at an epoch boundary) is two
  # segments; boundaries come from document ids, not token values.
  tokens = np.array([7, 7, 7, 7, 7, 7, 0, 0, 0], np.int32)
  doc_ids = np.array([3, 3, 4, 4, 4, 5, -1, -1, -1])
  row = data.row_features(tokens, doc_ids)
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 2, 2, 2, 3, 0, 0])
  np.testing.assert_array_equal(row["positions"], [0, 1, 0, 1, 2, 0, 0, 0])
  np.testing.assert_array_equal(row["weights"], [1, 0, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(row["targets"], tokens[1:])


def test_iterator_state_restores_identical_batches():
  cfg = DataConfig(seq_len=16, batch_size=4, seed=5)
  docs = letter_docs(LENGTHS)
  it = data.make_train_iterator(cfg, BYTES, docs)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(8)]  # crosses an epoch boundary
  fresh = data.make_train_iterator(cfg, BYTES, docs)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_iterator_state_for_another_seq_len_is_refused():
  docs = letter_docs(LENGTHS)
  it = data.make_train_iterator(DataConfig(seq_len=16, batch_size=2), BYTES, docs)
  next(it)
  other = data.make_train_iterator(DataConfig(seq_len=8, batch_size=2), BYTES, docs)
  with pytest.raises(ValueError, match="seq_len"):
    other.set_state(it.get_state())


def test_heldout_batches_deterministic_and_padded():
  cfg = DataConfig(seq_len=16, batch_size=4, seed=2)
  docs = letter_docs([30, 25, 9, 70])
  first = data.heldout_batches(cfg, BYTES, docs, n_batches=1)
  again = data.heldout_batches(cfg, BYTES, docs, n_batches=1)
  assert len(first) == 1
  for key in first[0]:
    np.testing.assert_array_equal(first[0][key], again[0][key])
  assert first[0]["inputs"].shape == (4, 16)
  # All 134 tokens at seq_len 32: 4 windows of 33 and one of 2, then padding.
  batches = data.heldout_batches(cfg, BYTES, docs, n_batches=10, seq_len=32)
  assert len(batches) == 2 and batches[0]["inputs"].shape == (4, 32)
  real = np.concatenate([b["segment_ids"] > 0 for b in batches])
  assert real.sum() == 4 * 32 + 2  # a full window's last token is only a target
  same = np.concatenate([b["targets"] == b["inputs"] for b in batches])
  weights = np.concatenate([b["weights"] for b in batches])
  np.testing.assert_array_equal(weights, (same & real).astype(np.float32))
  last = batches[-1]
  assert (last["segment_ids"][-1] == 0).all() and (last["weights"][-1] == 0).all()
  for b in batches:
    real = b["segment_ids"] > 0
    assert set(np.unique(b["inputs"][real])) <= {ord(c) for c in "ABCD"}


# ------------------------------------------------------------ split, sources


def test_split_is_deterministic_disjoint_and_sized():
  docs = [f"document {i}" for i in range(100)]
  train, val = data.split_documents(docs, 0.1, seed=3)
  assert len(val) == 10 and len(train) == 90
  assert not set(train) & set(val) and set(train) | set(val) == set(docs)
  assert (train, val) == data.split_documents(docs, 0.1, seed=3)
  assert val != data.split_documents(docs, 0.1, seed=4)[1]
  assert [d for d in docs if d in set(train)] == train  # source order kept


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_split_keeps_one_document_each_side(fraction):
  train, val = data.split_documents(["a", "b"], fraction, seed=0)
  assert len(train) == 1 and len(val) == 1
  assert data.split_documents(["a"], fraction, seed=0) == (["a"], [])


def test_files_source_txt_and_jsonl(tmp_path):
  (tmp_path / "a.txt").write_text("plain text document\n")
  lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "second"}),
           json.dumps({"text": ""})]
  (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
  cfg = DataConfig(source="files", paths=(str(tmp_path / "*.txt"),
                                          str(tmp_path / "*.jsonl")))
  assert data.load_documents(cfg) == ["plain text document\n", "first", "second"]
  limited = DataConfig(source="files", paths=(str(tmp_path / "*"),), max_docs=2)
  assert data.load_documents(limited) == ["plain text document\n", "first"]


def test_prepare_files_source(tmp_path):
  for i in range(10):
    (tmp_path / f"{i}.txt").write_text(f"document number {i}\n" * (i + 1))
  cfg = DataConfig(source="files", paths=(str(tmp_path / "*.txt"),),
                   val_fraction=0.2, seq_len=8, batch_size=2)
  tok, train, val = data.prepare(cfg, tmp_path / "cache")
  assert tok.vocab_size == 256 and len(train) == 8 and len(val) == 2
  batch = next(data.make_train_iterator(cfg, tok, train))
  assert batch["inputs"].shape == (2, 8)


def test_stdlib_source():
  docs = data.load_documents(DataConfig())
  assert len(docs) > 500
  assert max(map(len, docs)) > 100_000
  assert all(docs)
  assert data.load_documents(DataConfig(max_docs=5)) == docs[:5]


# ------------------------------------------------------------- lazy reading


def corpus(root):
  """13 non-empty text files (doc04.txt is empty) and a JSONL file of 4
  non-empty lines and an empty one: 17 documents, some non-ASCII."""
  words = ["alpha", "beta", "gamma", "délta", "eps☃", "zeta", "eta", "theta"]
  for i in range(14):
    text = "" if i == 4 else f"doc {i}\n" + "\n".join(
        " ".join(words[(i * j + k) % len(words)] for k in range(3 + i % 5))
        for j in range(2 + i))
    (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
  lines = [json.dumps({"text": f"line {j} " + words[j % 8] * (j + 1)})
           for j in range(4)] + [json.dumps({"text": ""})]
  (root / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return (str(root / "*.txt"), str(root / "*.jsonl"))


def digest(batches):
  h = hashlib.sha256()
  for b in batches:
    for k in sorted(b):
      h.update(k.encode())
      h.update(np.ascontiguousarray(b[k]).tobytes())
  return h.hexdigest()[:16]


@pytest.fixture
def reads(monkeypatch):
  """The paths whose text is read (documents.read_text), in order."""
  seen = []
  real = documents.read_text

  def record(path):
    seen.append(path)
    return real(path)

  monkeypatch.setattr(documents, "read_text", record)
  return seen


# main's output before documents were read lazily (eager lists of texts):
# sizes of the splits, the BPE vocabulary, and digests of the first 3 train
# batches and of 2 held-out batches.
EAGER = {("bytes", 0): (13, 4, 256, "13ffce083115142d", "e0142dd1220ee166"),
         ("bytes", 9): (7, 2, 256, "3d802a5a120d6cef", "3c50807e946b64c4"),
         ("bpe", 0): (13, 4, 300, "4ffa24ad56a7b1cf", "7c1742736d153d27"),
         ("bpe", 9): (7, 2, 295, "40ec140d8480ca56", "5cc5c7b3419f9d5e")}


@pytest.mark.parametrize("kind, max_docs", sorted(EAGER))
def test_lazy_documents_give_main_s_batches(kind, max_docs, tmp_path, reads):
  cfg = DataConfig(source="files", paths=corpus(tmp_path), tokenizer=kind,
                   bpe_vocab_size=300, val_fraction=0.25, seq_len=32,
                   batch_size=4, seed=5, max_docs=max_docs)
  tok, train, val = data.prepare(cfg, None)
  n_files = len([p for p in train.paths() + val.paths() if p])
  if kind == "bytes":
    assert reads == []  # listing and splitting read no text
  else:  # the BPE sample: here every train file, each once
    assert sorted(reads) == sorted(p for p in train.paths() if p)
  it = data.make_train_iterator(cfg, tok, train)
  got = (len(train), len(val), tok.vocab_size,
         digest([next(it) for _ in range(3)]),
         digest(data.heldout_batches(cfg, tok, val, 2)))
  assert got == EAGER[kind, max_docs]
  assert n_files == (13 if max_docs == 0 else 9)


def test_documents_read_on_use(tmp_path, reads):
  corpus(tmp_path)
  docs = data.load_documents(DataConfig(source="files",
                                        paths=(str(tmp_path / "*"),)))
  assert len(docs) == 17 and docs.in_memory() == 4  # doc04.txt is empty
  assert docs.paths()[4] == str(tmp_path / "doc05.txt")
  assert docs.size() == sum(os.path.getsize(p) for p in docs.paths() if p) + \
      sum(len(docs[i]) for i in range(13, 17))  # in memory: no read
  part = docs[1::2].take([2, 0])
  assert part.paths() == [docs.paths()[5], docs.paths()[1]] and not reads
  assert part[0] == (tmp_path / "doc06.txt").read_text() and part.has_text()
  assert reads == [docs.paths()[5]]
  assert part == [docs[5], docs[1]] and part != [docs[5]]
  train, val = data.split_documents(docs, 0.25, seed=5)
  assert isinstance(train, data.Documents) and len(val) == 4
  assert (list(train), list(val)) == data.split_documents(list(docs), 0.25, 5)


def test_stdlib_lazy_equals_eager(reads):
  """The standard library read eagerly, as main did (every file, empty
  ones dropped, the first 40), against the lazy listing."""
  eager = [t for t in (open(p, encoding="utf-8", errors="replace").read()
                       for p in data.stdlib_paths()[:60]) if t][:40]
  cfg = DataConfig(max_docs=40, seq_len=64, batch_size=4, val_fraction=0.1)
  tok, train, val = data.prepare(cfg, None)
  assert reads == [] and val.paths()[0].endswith(".py")
  want_train, want_val = data.split_documents(eager, cfg.val_fraction, cfg.seed)
  assert list(train) == want_train and list(val) == want_val
  lazy_it = data.make_train_iterator(cfg, tok, train)
  eager_it = data.make_train_iterator(cfg, BYTES, want_train)
  assert digest([next(lazy_it) for _ in range(4)]) == \
      digest([next(eager_it) for _ in range(4)])


# ----------------------------------------------------------------- tokenizers


TEXTS = ["", "hello world", "héllo ☃ 🚀 naïve 中文", "def f(x):\n\treturn x  # ok\r\n",
         "\x00 control \x7f bytes", "   leading and trailing   "]


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_tokenizer_round_trip(text):
  ids = BYTES.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert BYTES.decode(ids) == text
  assert BYTES.vocab_size == 256


def test_bpe_round_trip_and_cache_hit(tmp_path, monkeypatch):
  docs = data.load_documents(DataConfig(max_docs=20))
  cfg = DataConfig(tokenizer="bpe", bpe_vocab_size=512, max_docs=20)
  tok = tokenizer_lib.build_tokenizer(cfg, docs, tmp_path)
  assert tok.vocab_size == 512
  assert len(list((tmp_path / "tokenizers").glob("bpe-*.json"))) == 1
  for text in TEXTS + list(docs[:3]):  # Documents: texts read on use
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
  assert len(tok.encode(docs[0])) < 0.6 * len(docs[0].encode())

  def no_training(*args, **kwargs):
    raise AssertionError("trained again instead of loading the cache")

  monkeypatch.setattr(tokenizer_lib, "_train_bpe", no_training)
  cached = tokenizer_lib.build_tokenizer(cfg, docs, tmp_path)
  assert cached.encode(docs[1]) == tok.encode(docs[1])
  other = DataConfig(tokenizer="bpe", bpe_vocab_size=600, max_docs=20)
  with pytest.raises(AssertionError, match="trained again"):
    tokenizer_lib.build_tokenizer(other, docs, tmp_path)  # another key


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, key", [
    ({"seq_len": 0}, "data.seq_len"),
    ({"batch_size": -1}, "data.batch_size"),
    ({"source": "web"}, "data.source"),
    ({"tokenizer": "wordpiece"}, "data.tokenizer"),
    ({"tokenizer": "bpe", "bpe_vocab_size": 200}, "data.bpe_vocab_size"),
    ({"val_fraction": 1.0}, "data.val_fraction"),
    ({"max_docs": -1}, "data.max_docs"),
    ({"retrieval_rate": 1.5}, "data.retrieval_rate"),
    ({"retrieval_rate": 0.5, "retrieval_tasks": ()}, "data.retrieval_tasks"),
    ({"source": "files"}, "data.paths"),
    ({"source": "files", "paths": ("/no/such/dir/*.txt",)}, "data.paths"),
    ({"source": "hf"}, "data.hf_name"),
])
def test_bad_config_errors_name_the_key(overrides, key):
  cfg = DataConfig(**overrides)
  with pytest.raises(ConfigError, match=key):
    data.load_documents(cfg)
  if key not in ("data.paths", "data.hf_name"):
    with pytest.raises(ConfigError, match=key):
      data.make_train_iterator(cfg, BYTES, ["some text"])


def test_jsonl_without_text_field_names_the_key(tmp_path):
  (tmp_path / "x.jsonl").write_text(json.dumps({"body": "no text"}) + "\n")
  cfg = DataConfig(source="files", paths=(str(tmp_path / "x.jsonl"),))
  with pytest.raises(ConfigError, match="data.text_field"):
    data.load_documents(cfg)


def test_hf_source_without_datasets_says_so():
  try:
    import datasets  # noqa: F401
  except ImportError:
    with pytest.raises(ConfigError, match="datasets"):
      data.load_documents(DataConfig(source="hf", hf_name="some/dataset"))
  else:
    pytest.skip("datasets is installed; this checks the error when it is not")


# ------------------------------------------------------------ retrieval mixing


def _tasks_or_skip():
  return pytest.importorskip(
      "dsax.tasks", reason="dsax.tasks (synthetic retrieval tasks) not importable")


def test_retrieval_mixing_interleaves_whole_task_rows():
  _tasks_or_skip()
  seq_len, n_rows = 384, 40
  lengths = [300, 500, 700, 200, 650, 900, 400, 1000]
  cfg = DataConfig(seq_len=seq_len, batch_size=4, retrieval_rate=0.5, seed=7)
  rows = take_rows(data.make_train_iterator(cfg, BYTES, letter_docs(lengths)),
                   n_rows)
  letters = {ord(c) for c in LETTERS}
  synthetic = [r for r in rows if not set(r["inputs"].tolist()) <= letters]
  real = [r for r in rows if set(r["inputs"].tolist()) <= letters]
  assert 0.2 * n_rows < len(synthetic) < 0.8 * n_rows
  for row in synthetic:  # one document per row, then padding
    seg = row["segment_ids"]
    assert set(seg.tolist()) <= {0, 1} and seg[0] == 1
    np.testing.assert_array_equal(row["positions"][seg == 1],
                                  np.arange((seg == 1).sum()))
    assert row["weights"].sum() >= 0.5 * seq_len
  for row in real:
    check_row_invariants(row, seq_len)
  # The real stream is not cut by the task rows: whole documents, in order.
  found = runs(stream_of(real))
  for tok, n in found[:-1]:
    assert n == lengths[tok - ord("A")]


def test_retrieval_mixing_state_restores():
  _tasks_or_skip()
  cfg = DataConfig(seq_len=384, batch_size=2, retrieval_rate=0.5, seed=3)
  docs = letter_docs([300, 200, 450])
  it = data.make_train_iterator(cfg, BYTES, docs)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  fresh = data.make_train_iterator(cfg, BYTES, docs)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("overrides, key", [
    ({"retrieval_tasks": ("no_such_task",)}, "data.retrieval_tasks"),
    ({"seq_len": 32}, "data.seq_len"),
])
def test_retrieval_mixing_bad_config_names_the_key(overrides, key):
  _tasks_or_skip()
  cfg = DataConfig(retrieval_rate=0.5, **overrides)
  with pytest.raises(ConfigError, match=key):
    data.make_train_iterator(cfg, BYTES, ["some text"])
