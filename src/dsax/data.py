"""Documents -> train/val split -> packed fixed-length rows, with grain.

Sources (``DataConfig.source``); empty documents are dropped, and ``max_docs`` > 0
keeps the first ``max_docs`` in the source's own order:

- ``stdlib``: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``
  (site-packages and dist-packages excluded), sorted by path, read as UTF-8 with
  ``errors="replace"``. About 1.8K files, 31M characters, 9M BPE tokens. With
  ``paths``, the files they match (as for ``files``) follow as more documents.
- ``files``: the files matched by the globs in ``paths``, sorted; ``*.jsonl`` holds
  one document per line (field ``text_field``), any other file is one document.
- ``hf``: a Hugging Face ``datasets`` dataset (``hf_name``, ``hf_split``,
  ``text_field``) from the local cache (set ``HF_DATASETS_OFFLINE=1`` to forbid
  downloads); ``datasets`` is imported only here.

Reading. Files are listed with their sizes (``Documents``) and read only when
their text is used: a file's text when the stream tokenises it, the validation
files when the held-out batches are built, the BPE sample when the tokenizer is
trained. A ``*.jsonl`` file and a Hugging Face dataset are read in full when
listed (every process scans them; with several processes only file documents
are read by share).

Split: a permutation seeded by ``seed`` sends ``n_val = clip(round(val_fraction *
n), 1, n - 1)`` documents to validation (none when ``val_fraction`` is 0 or n < 2);
it needs only n, so no text is read to decide it.

Packing. Each epoch e permutes the train documents (grain ``shuffle``, the seed
folded with e); they are tokenised and concatenated into one stream x, epoch after
epoch. Row r is the window w = x[r(T+1) : (r+1)(T+1)] (windows do not overlap), and

  inputs[t] = w[t],  targets[t] = w[t+1]                      t = 0 .. T-1
  segment_ids[t] = 1 + #{document starts in w[1..t]}         (1, 2, 3, ...)
  positions[t] = t - (row index where the document piece of w[t] starts)
  weights[t] = 1 if w[t] and w[t+1] belong to the same document else 0

so a long document spans rows and its positions restart at 0 in each row. Padding
(end of held-out data, short synthetic rows) has token 0, segment id 0, position 0
and weight 0. A batch is a dict of numpy arrays: ``inputs``, ``targets``,
``segment_ids``, ``positions`` int32 [B,T] and ``weights`` float32 [B,T].

Retrieval mixing (``retrieval_rate`` = p > 0): row r of the train stream is, with
probability p decided by a generator seeded with (seed, r), one synthetic task text
(``prompt + answer`` from ``dsax.tasks.generate``, sized to T+1 tokens, padded if
shorter) instead of the next window; the real stream resumes on the next row, so no
text is dropped and p is the share of rows, as ``DataConfig`` says. A task text never
straddles two rows, so its answer always sits in the row of its prompt.

The train iterator's state is ``{"row", "doc", "offset", "seq_len"}`` (plain ints):
every row is rebuilt from these, so ``set_state`` on a fresh iterator continues with
identical batches.

Several processes (``share=(g, G)``, dsax.multihost.TrainStream): the G groups of
processes that hold different batch rows each build their own stream, as above,
from their share of the train documents (document i goes to group i % G), with
their own shuffle and mixing seeds and B / G rows per batch; only that share is
ever read (files) and tokenised. ``share=(0, 1)`` is the single stream above.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import sysconfig
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
import tqdm

from dsax import tasks
from dsax.documents import Documents, File, file_doc
from dsax.config import ConfigError, DataConfig, DataError
from dsax.tokenizer import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)

SOURCES = ("stdlib", "files", "hf")
_MEMO_TOKENS = 256_000_000  # tokenised documents kept in memory (<= 1 GB)
Batch = dict[str, np.ndarray]


def check_config(cfg: DataConfig) -> None:
  """Raises ConfigError naming the ``data.*`` key of an impossible value."""
  if cfg.source not in SOURCES:
    raise ConfigError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")
  if cfg.tokenizer not in ("bytes", "bpe") and not (
      cfg.tokenizer.startswith("file:") and len(cfg.tokenizer) > 5):
    raise ConfigError(f"data.tokenizer must be 'bytes', 'bpe' or 'file:PATH' "
                      f"(a tokenizer.json), got {cfg.tokenizer!r}")
  if cfg.tokenizer == "bpe" and cfg.bpe_vocab_size <= 256:
    raise ConfigError(f"data.bpe_vocab_size must be > 256 (the byte alphabet), "
                      f"got {cfg.bpe_vocab_size}")
  for name in ("seq_len", "batch_size"):
    if getattr(cfg, name) <= 0:
      raise ConfigError(f"data.{name} must be > 0, got {getattr(cfg, name)}")
  if cfg.max_docs < 0:
    raise ConfigError(f"data.max_docs must be >= 0, got {cfg.max_docs}")
  if not 0.0 <= cfg.val_fraction < 1.0:
    raise ConfigError(
        f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
  if not 0.0 <= cfg.retrieval_rate <= 1.0:
    raise ConfigError(
        f"data.retrieval_rate must be in [0, 1], got {cfg.retrieval_rate}")
  if cfg.retrieval_rate > 0 and not cfg.retrieval_tasks:
    raise ConfigError("data.retrieval_tasks is empty but data.retrieval_rate > 0")


def _stream_seed(seed: int, purpose: str) -> int:
  """A 32-bit seed per purpose, so split, shuffle and mixing are independent."""
  digest = hashlib.sha256(f"dsax.data/{purpose}/{seed}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


# ------------------------------------------------------------------- sources


def stdlib_paths() -> list[str]:
  """Sorted paths of the standard library's .py files, without site-packages."""
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for folder, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]
    paths.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
  return sorted(paths)


def _has_text(docs: Sequence[str]) -> bool:
  return docs.has_text() if isinstance(docs, Documents) else any(docs)


def _stdlib_docs() -> Iterator[File]:
  for path in stdlib_paths():
    yield file_doc(path)


def _file_paths(cfg: DataConfig) -> list[str]:
  if not cfg.paths:
    raise ConfigError("data.paths is empty; data.source='files' needs globs")
  found = set()
  for pattern in cfg.paths:
    matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
               if os.path.isfile(p)]
    if not matched:
      raise ConfigError(f"data.paths: {pattern!r} matched no files")
    found.update(matched)
  return sorted(found)


def _file_docs(cfg: DataConfig) -> Iterator[File | str]:
  for path in _file_paths(cfg):
    if not path.lower().endswith(".jsonl"):
      yield file_doc(path)
      continue
    with open(path, encoding="utf-8", errors="replace") as f:
      for line_no, line in enumerate(
          tqdm.tqdm(f, desc=os.path.basename(path), disable=None), 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at "
                          f"column {e.colno}); fix or remove that line"
                          ) from None
        text = record.get(cfg.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
          raise ConfigError(f"data.text_field={cfg.text_field!r}: no such string "
                            f"field in {path}:{line_no}")
        yield text


def _hf_texts(cfg: DataConfig) -> Iterator[str]:
  if not cfg.hf_name:
    raise ConfigError("data.hf_name is empty; data.source='hf' needs a dataset")
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("data.source='hf' needs the `datasets` package, which is "
                      "not installed (pip install datasets)") from None
  try:
    ds = datasets.load_dataset(cfg.hf_name, split=cfg.hf_split,
                               download_mode="reuse_cache_if_exists")
  except Exception as e:  # datasets raises many types; the key is what matters
    raise ConfigError(f"data.hf_name={cfg.hf_name!r} (data.hf_split="
                      f"{cfg.hf_split!r}) could not be loaded: {e}") from e
  if cfg.text_field not in ds.column_names:
    raise ConfigError(f"data.text_field={cfg.text_field!r} is not a column of "
                      f"{cfg.hf_name}: {ds.column_names}")
  for row in tqdm.tqdm(ds.select_columns([cfg.text_field]), desc=cfg.hf_name,
                       disable=None):
    yield row[cfg.text_field]


def load_documents(cfg: DataConfig) -> Documents:
  """The non-empty documents of ``cfg.source``, truncated to ``cfg.max_docs``.

  Files (the standard library's, and ``data.paths`` other than ``*.jsonl``)
  are listed with their sizes and read only when a document's text is used
  (``Documents``). JSONL lines and Hugging Face rows are read in full here,
  by every process that calls this.
  """
  check_config(cfg)
  if cfg.source == "stdlib":
    items = _stdlib_docs()
    if cfg.paths:  # e.g. natural text beside the code
      items = itertools.chain(items, _file_docs(cfg))
  elif cfg.source == "files":
    items = _file_docs(cfg)
  else:
    items = _hf_texts(cfg)
  nonempty = (d for d in items if (d if isinstance(d, str) else d.size > 0))
  return Documents(itertools.islice(nonempty, cfg.max_docs or None))


def split_documents(docs: Sequence[str], val_fraction: float,
                    seed: int) -> tuple[Sequence[str], Sequence[str]]:
  """(train, val), disjoint by document, each in the original order; decided
  by the documents' indices alone (``Documents`` in, ``Documents`` out,
  nothing read; a list in, lists out)."""
  n = len(docs)
  n_val = 0
  if val_fraction > 0 and n >= 2:
    n_val = min(max(round(val_fraction * n), 1), n - 1)
  order = np.random.default_rng(_stream_seed(seed, "split")).permutation(n)
  is_val = np.zeros(n, bool)
  is_val[order[:n_val]] = True
  if isinstance(docs, Documents):
    return docs.take(np.flatnonzero(~is_val)), docs.take(np.flatnonzero(is_val))
  train = [d for d, v in zip(docs, is_val) if not v]
  val = [d for d, v in zip(docs, is_val) if v]
  return train, val


def tokenizer_cache_dir(cfg: DataConfig, workdir: str) -> str:
  """``cfg.cache_dir``, or ``<workdir>/cache`` when it is empty."""
  return cfg.cache_dir or os.path.join(workdir, "cache")


def prepare(cfg: DataConfig, cache_dir: str | os.PathLike | None,
            build: Callable[[DataConfig, Sequence[str], Any], Tokenizer]
            = build_tokenizer) -> tuple[Tokenizer, Documents, Documents]:
  """Lists, splits and builds the tokenizer: ``(tokenizer, train, val)``.

  No text is read here but the BPE sample (``build``, by default
  ``build_tokenizer``; ``multihost.prepare`` has process 0 alone read it)
  and what ``load_documents`` reads in full (JSONL, Hugging Face): the
  train and validation documents are read when they are tokenised.
  ``cache_dir`` holds trained BPE tokenizers (see ``tokenizer_cache_dir``).
  """
  docs = load_documents(cfg)
  if not docs:
    raise DataError(f"data.source={cfg.source!r} gave no non-empty documents")
  if len(docs) < 2:
    more = " or raise data.max_docs" if cfg.max_docs == 1 else ""
    raise DataError(f"data.source={cfg.source!r} gave 1 document, but a run "
                    "needs at least 2 (one is held out for validation): add "
                    f"documents{more}")
  train, val = split_documents(docs, cfg.val_fraction, cfg.seed)
  log.info("data %s: %d documents, size %d (file bytes, in-memory "
           "characters); train %d docs / %d, val %d docs / %d", cfg.source,
           len(docs), docs.size(), len(train), train.size(), len(val),
           val.size())
  tokenizer = build(cfg, train, cache_dir)
  log.info("data tokenizer: %s", tokenizer)
  return tokenizer, train, val


# ------------------------------------------------------------------- packing


def row_features(tokens: np.ndarray, doc_ids: np.ndarray) -> Batch:
  """One packed row from T+1 tokens and the document each came from.

  ``doc_ids`` only needs to differ between neighbouring documents; -1 marks
  padding. Returns the [T] arrays of the module docstring.
  """
  ids = doc_ids[:-1]
  real = ids >= 0
  start = real & np.concatenate([[True], ids[1:] != ids[:-1]])
  t = np.arange(len(ids))
  piece_start = np.maximum.accumulate(np.where(start, t, 0))
  return {
      "inputs": tokens[:-1].astype(np.int32),
      "targets": tokens[1:].astype(np.int32),
      "segment_ids": np.where(real, np.cumsum(start), 0).astype(np.int32),
      "positions": np.where(real, t - piece_start, 0).astype(np.int32),
      "weights": (real & (doc_ids[1:] == ids)).astype(np.float32),
  }


def _padded_row(tokens: np.ndarray, seq_len: int) -> Batch:
  """A row holding one document (at most T+1 tokens) followed by padding."""
  n = len(tokens)
  padded = np.zeros(seq_len + 1, np.int32)
  padded[:n] = tokens
  doc_ids = np.where(np.arange(seq_len + 1) < n, 0, -1)
  return row_features(padded, doc_ids)


class PackedDataset(grain.IterDataset):
  """Rows cut from the concatenated token arrays of ``docs`` (random access).

  ``synthetic(row)`` may return the tokens of a task text to emit as row ``row``
  instead of the next window. A finite ``docs`` ends with a padded last row.
  """

  def __init__(self, docs: grain.MapDataset, seq_len: int,
               synthetic: Callable[[int], np.ndarray | None] | None = None):
    super().__init__(docs)
    self._docs = docs
    self._seq_len = seq_len
    self._synthetic = synthetic

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedIterator(self._docs, self._seq_len, self._synthetic)

  def __str__(self) -> str:
    return f"PackedDataset(seq_len={self._seq_len})"


class _PackedIterator(grain.DatasetIterator):
  """State: rows emitted, the current document's stream index and token offset."""

  def __init__(self, docs: grain.MapDataset, seq_len: int,
               synthetic: Callable[[int], np.ndarray | None] | None):
    super().__init__()
    self._docs = docs
    self._seq_len = seq_len
    self._synthetic = synthetic
    self._row, self._doc, self._offset = 0, 0, 0
    self._cached: tuple[int, np.ndarray | None] = (-1, None)

  def _tokens(self, index: int) -> np.ndarray:
    if self._cached[0] != index:  # a long document is read by many rows
      self._cached = (index, self._docs[index])
    return self._cached[1]

  def __next__(self) -> Batch:
    if self._synthetic is not None:
      tokens = self._synthetic(self._row)
      if tokens is not None:
        self._row += 1
        return _padded_row(tokens, self._seq_len)
    n = self._seq_len + 1
    tokens = np.zeros(n, np.int32)
    doc_ids = np.full(n, -1, np.int64)
    filled = 0
    while filled < n and self._doc < len(self._docs):
      doc = self._tokens(self._doc)
      take = min(n - filled, len(doc) - self._offset)
      tokens[filled:filled + take] = doc[self._offset:self._offset + take]
      doc_ids[filled:filled + take] = self._doc
      filled += take
      self._offset += take
      if self._offset >= len(doc):
        self._doc, self._offset = self._doc + 1, 0
    if filled == 0:
      raise StopIteration
    self._row += 1
    return row_features(tokens, doc_ids)

  def get_state(self) -> dict[str, int]:
    return {"row": self._row, "doc": self._doc, "offset": self._offset,
            "seq_len": self._seq_len}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state["seq_len"]) != self._seq_len:
      raise ValueError(f"iterator state is for seq_len {state['seq_len']}, "
                       f"this iterator has data.seq_len={self._seq_len}")
    self._row, self._doc = int(state["row"]), int(state["doc"])
    self._offset = int(state["offset"])

  def __str__(self) -> str:
    return f"PackedIterator(seq_len={self._seq_len})"


class _TaskRows:
  """Decides and builds synthetic rows; row r depends only on (seed, r)."""

  def __init__(self, cfg: DataConfig, tokenizer: Tokenizer,
               purpose: str = "tasks"):
    unknown = [t for t in cfg.retrieval_tasks if t not in tasks.TASKS]
    if unknown:
      raise ConfigError(f"data.retrieval_tasks: unknown {unknown}; "
                        f"expected some of {tasks.TASKS}")
    self._generate = tasks.generate
    self._cfg = cfg
    self._tokenizer = tokenizer
    self._seed = _stream_seed(cfg.seed, purpose)
    self._row_tokens = cfg.seq_len + 1
    # Ask for less than a row: the generator may overshoot by its tolerance.
    self._target = self._row_tokens - tasks.tolerance(self._row_tokens)
    self._shortest = {t: tasks.min_tokens(t, self._count_tokens)
                      for t in cfg.retrieval_tasks}
    for task, shortest in self._shortest.items():
      if shortest > self._target:
        raise ConfigError(
            f"data.seq_len={cfg.seq_len} is too short for data.retrieval_tasks "
            f"{task!r}: its shortest example has {shortest} tokens and a row "
            f"fits {self._target} (after the generator's tolerance)")
    self._warned = False

  def _count_tokens(self, text: str) -> int:
    return len(self._tokenizer.encode_array(text))

  def __call__(self, row: int) -> np.ndarray | None:
    rng = np.random.default_rng([self._seed, row])
    if rng.random() >= self._cfg.retrieval_rate:
      return None
    names = self._cfg.retrieval_tasks  # not `tasks`: the module
    task = names[int(rng.integers(len(names)))]
    n, target = self._row_tokens, self._target
    for _ in range(3):
      example = self._generate(task, rng, target, self._count_tokens)
      tokens = self._tokenizer.encode_array(example.prompt + example.answer)
      if len(tokens) <= n:
        return tokens
      target = max(self._shortest[task], target - (len(tokens) - n))
    if not self._warned:
      log.warning("task %r gave %d tokens for a %d-token row; keeping the end",
                  task, len(tokens), n)
      self._warned = True
    return tokens[-n:]  # the question and answer are at the end


class _TokenizedDocs(Sequence[np.ndarray]):
  """Documents tokenised on first access and kept (up to ``_MEMO_TOKENS`` tokens),
  so later epochs skip the tokenizer (BPE encodes ~1.5M characters/s here)."""

  def __init__(self, docs: Sequence[str], tokenizer: Tokenizer):
    self._docs = docs if isinstance(docs, Documents) else list(docs)
    self._tokenizer = tokenizer
    self._memo: dict[int, np.ndarray] = {}
    self._memo_tokens = 0
    self._dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32

  def __len__(self) -> int:
    return len(self._docs)

  def __getitem__(self, index: int) -> np.ndarray:
    tokens = self._memo.get(index)
    if tokens is None:
      tokens = self._tokenizer.encode_array(self._docs[index]).astype(self._dtype)
      if self._memo_tokens + len(tokens) <= _MEMO_TOKENS:
        self._memo[index] = tokens
        self._memo_tokens += len(tokens)
    return tokens


def _token_docs(docs: Sequence[str], tokenizer: Tokenizer, shuffle_seed: int,
                repeat: bool) -> grain.MapDataset:
  ds = grain.MapDataset.source(_TokenizedDocs(docs, tokenizer))
  ds = ds.shuffle(seed=shuffle_seed)
  if repeat:
    ds = ds.repeat(None)  # a new permutation each epoch: seed folded with it
  return ds


def train_dataset(cfg: DataConfig, tokenizer: Tokenizer,
                  train_docs: Sequence[str],
                  share: tuple[int, int] = (0, 1)) -> grain.IterDataset:
  """The infinite dataset of train batches (see the module docstring); with
  ``share=(g, G)``, group g's stream: documents g, g + G, ... and
  ``batch_size / G`` rows per batch.

  No thread prefetch is built in (grain's ThreadPrefetchIterDataset keeps its
  thread until closed); wrap this dataset in one if the host falls behind.
  """
  check_config(cfg)
  group, groups = share
  if not 0 <= group < groups or cfg.batch_size % groups:
    raise ConfigError(f"data.batch_size={cfg.batch_size} cannot be shared by "
                      f"{groups} process groups (group {group})")
  suffix = "" if groups == 1 else f"/{group}/{groups}"
  if groups > 1:  # Documents: a share of the handles, nothing read
    train_docs = (train_docs if isinstance(train_docs, Documents)
                  else list(train_docs))[group::groups]
  if not _has_text(train_docs):
    where = "" if groups == 1 else (
        f" of process group {group} (document i goes to group i % {groups}); "
        "add documents or use fewer processes")
    raise DataError(f"train_dataset: the train documents{where} hold no text")
  docs = _token_docs(train_docs, tokenizer,
                     _stream_seed(cfg.seed, "shuffle" + suffix), repeat=True)
  synthetic = (_TaskRows(cfg, tokenizer, "tasks" + suffix)
               if cfg.retrieval_rate > 0 else None)
  packed = PackedDataset(docs, cfg.seq_len, synthetic)
  return packed.batch(cfg.batch_size // groups, drop_remainder=True)


def make_train_iterator(cfg: DataConfig, tokenizer: Tokenizer,
                        train_docs: Sequence[str],
                        share: tuple[int, int] = (0, 1)
                        ) -> grain.DatasetIterator:
  """An infinite iterator of train batches (of process group ``share``, see
  ``train_dataset``); ``get_state()`` is a JSON-ready dict that ``set_state``
  on a freshly made iterator continues from exactly."""
  return iter(train_dataset(cfg, tokenizer, train_docs, share))


def heldout_batches(cfg: DataConfig, tokenizer: Tokenizer,
                    val_docs: Sequence[str], n_batches: int,
                    seq_len: int | None = None) -> list[Batch]:
  """Up to ``n_batches`` batches from one pass over ``val_docs``.

  The documents are in a fixed order drawn from ``cfg.seed``; no mixing. Fewer
  batches come back when the documents run out; the last one is padded to
  ``batch_size`` rows (weight 0). ``seq_len`` overrides ``cfg.seq_len``.
  The text is tokenised on every call: build the list once and reuse it.
  """
  check_config(cfg)
  seq_len = cfg.seq_len if seq_len is None else seq_len
  if seq_len <= 0:
    raise ConfigError(f"heldout_batches: seq_len must be > 0, got {seq_len}")
  if n_batches <= 0 or not _has_text(val_docs):
    return []
  docs = _token_docs(val_docs, tokenizer, _stream_seed(cfg.seed, "heldout"),
                     repeat=False)
  rows = iter(PackedDataset(docs, seq_len))
  batches = []
  for _ in range(n_batches):
    batch_rows = list(itertools.islice(rows, cfg.batch_size))
    if not batch_rows:
      break
    while len(batch_rows) < cfg.batch_size:
      batch_rows.append(_padded_row(np.zeros(0, np.int32), seq_len))
    batches.append({k: np.stack([r[k] for r in batch_rows])
                    for k in batch_rows[0]})
  if len(batches) < n_batches:
    log.info("heldout_batches: validation text ran out after %d of %d batches",
             len(batches), n_batches)
  return batches
