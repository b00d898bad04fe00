"""Tokenizers: raw UTF-8 bytes, a byte-level BPE trained on the train split, or
a saved ``tokenizers`` file (a pretrained model's tokenizer.json).

Both are lossless: ``decode(encode(s)) == s`` for every string ``s``.

- ``bytes``: token id = one UTF-8 byte, vocab 256.
- ``bpe``: byte-level BPE (GPT-2 pre-tokenisation regex, no normaliser, no special
  tokens) trained with the ``tokenizers`` library on at most ``BPE_TRAIN_CHARS``
  characters of TRAIN documents, taken in a seeded order. Training 8M characters to
  4096 tokens takes about 4 s on 2 cores. The trained tokenizer is cached as
  ``<cache_dir>/tokenizers/bpe-<key>.json``, where ``key`` hashes the data config
  that decides the documents, the seed, the vocab size and the training text itself,
  so a second run with the same data loads it instead of training.
- ``file:PATH``: the ``tokenizers.Tokenizer`` saved at PATH (e.g. the one
  ``launch.py prepare smollm2`` writes), used as is: its ids are the model's.
  Special tokens are not added on encode; decode keeps them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
import time
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsax.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

# Enough text for stable merges at a few thousand tokens; trains in seconds.
BPE_TRAIN_CHARS = 8_000_000
# Bump when the trainer settings change, so old caches are not reused.
_BPE_FORMAT = 1


class Tokenizer:
  """Text <-> token ids, for the ``bytes`` or a trained ``bpe`` tokenizer."""

  def __init__(self, kind: str = "bytes",
               bpe: tokenizers.Tokenizer | None = None):
    if kind not in ("bytes", "bpe", "file"):
      raise ConfigError(f"data.tokenizer must be 'bytes', 'bpe' or "
                        f"'file:PATH', got {kind!r}")
    if (kind != "bytes") != (bpe is not None):
      raise ValueError(f"a {kind!r} Tokenizer needs a tokenizers.Tokenizer "
                       "and a 'bytes' one must not get one")
    self.kind = kind
    self._bpe = bpe

  @property
  def vocab_size(self) -> int:
    """Ids are in [0, vocab_size). For BPE this is the trained size, which is
    below ``bpe_vocab_size`` only when the training text ran out of merges."""
    return 256 if self._bpe is None else self._bpe.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    """Like ``encode`` but an int32 array; the packer's fast path."""
    if self._bpe is None:
      return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    return np.asarray(self._bpe.encode(text, add_special_tokens=False).ids,
                      np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Invalid UTF-8 (a cut through a multi-byte character) becomes U+FFFD."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token ids outside [0, {self.vocab_size}): {bad[:5]}")
    if self._bpe is None:
      return bytes(ids).decode("utf-8", errors="replace")
    return self._bpe.decode(ids, skip_special_tokens=False)

  def to_json(self) -> str:
    """The ``tokenizers`` JSON of a ``bpe``/``file`` tokenizer ("" for
    ``bytes``); ``from_json`` rebuilds it."""
    return "" if self._bpe is None else self._bpe.to_str()

  @classmethod
  def from_json(cls, kind: str, text: str) -> "Tokenizer":
    if not text:
      return cls(kind)
    return cls(kind, tokenizers.Tokenizer.from_str(text))

  def __repr__(self) -> str:
    return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def bpe_training_text(train_docs: Sequence[str], seed: int,
                      max_chars: int = BPE_TRAIN_CHARS) -> list[str]:
  """At most ``max_chars`` characters of whole train documents, in a seeded order
  (the last one cut), so a large corpus contributes a spread of files."""
  rng = np.random.default_rng([seed % 2**63, 0xB9E])
  order = rng.permutation(len(train_docs))
  sample, total = [], 0
  for i in order:
    if total >= max_chars:
      break
    text = train_docs[i][:max_chars - total]
    sample.append(text)
    total += len(text)
  return sample


def _cache_key(cfg: DataConfig, sample: Sequence[str]) -> str:
  """Hash of what decides the tokenizer: the data config, seed, vocab size, and
  the training text itself (files on disk may change under the same config)."""
  text_hash = hashlib.sha256()
  for text in sample:
    text_hash.update(text.encode("utf-8", errors="replace"))
    text_hash.update(b"\0")
  fields = {
      "format": _BPE_FORMAT, "train_chars": BPE_TRAIN_CHARS,
      "source": cfg.source, "paths": list(cfg.paths),
      "text_field": cfg.text_field, "hf_name": cfg.hf_name,
      "hf_split": cfg.hf_split, "max_docs": cfg.max_docs,
      "val_fraction": cfg.val_fraction, "seed": cfg.seed,
      "vocab_size": cfg.bpe_vocab_size, "text": text_hash.hexdigest(),
  }
  if cfg.source == "stdlib":
    fields["stdlib"] = [sysconfig.get_paths()["stdlib"], sys.version]
  blob = json.dumps(fields, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _train_bpe(sample: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  # add_prefix_space=False keeps the round trip exact (no inserted space).
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[],
      # All 256 byte symbols, so any text encodes even if unseen in training.
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=sys.stderr.isatty())
  tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
  return tok


def load_file(spec: str) -> Tokenizer:
  """The tokenizer ``file:PATH`` names (ConfigError if PATH is unreadable)."""
  path = os.path.expanduser(spec[len("file:"):])
  try:
    return Tokenizer("file", tokenizers.Tokenizer.from_file(path))
  except Exception as e:  # tokenizers raises bare Exceptions
    raise ConfigError(f"data.tokenizer={spec!r}: cannot load {path} "
                      f"({e})") from None


def build_tokenizer(cfg: DataConfig, train_docs: Sequence[str],
                    cache_dir: str | os.PathLike | None) -> Tokenizer:
  """The tokenizer ``cfg.tokenizer`` names; BPE is trained on ``train_docs`` only
  and cached under ``cache_dir`` (None: not cached)."""
  if cfg.tokenizer == "bytes":
    return Tokenizer("bytes")
  if cfg.tokenizer.startswith("file:"):
    return load_file(cfg.tokenizer)
  if cfg.tokenizer != "bpe":
    raise ConfigError(
        f"data.tokenizer must be 'bytes' or 'bpe', got {cfg.tokenizer!r}")
  if cfg.bpe_vocab_size <= 256:
    raise ConfigError(f"data.bpe_vocab_size must be > 256 (the byte alphabet), "
                      f"got {cfg.bpe_vocab_size}")
  sample = bpe_training_text(train_docs, cfg.seed)
  if not any(sample):
    raise ValueError("cannot train a BPE tokenizer: the train documents are empty")
  path = None
  if cache_dir:
    path = os.path.join(os.fspath(cache_dir), "tokenizers",
                        f"bpe-{_cache_key(cfg, sample)}.json")
    if os.path.exists(path):
      log.info("BPE tokenizer: loaded %s", path)
      return Tokenizer("bpe", tokenizers.Tokenizer.from_file(path))
  start = time.perf_counter()
  bpe = _train_bpe(sample, cfg.bpe_vocab_size)
  log.info("BPE tokenizer: trained vocab %d on %d characters in %.1f s",
           bpe.get_vocab_size(), sum(map(len, sample)),
           time.perf_counter() - start)
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Write then rename, so a concurrent run never reads a half-written file.
    tmp = f"{path}.{os.getpid()}.tmp"
    bpe.save(tmp)
    os.replace(tmp, path)
    log.info("BPE tokenizer: saved %s", path)
  return Tokenizer("bpe", bpe)
