"""Documents whose text is read on first use (dsax.data lists them).

A document is a file (``File``: its path and size on disk, read each time
it is indexed) or a text already in memory (a JSONL line, a Hugging Face
row). ``Documents`` holds both kinds; slicing, ``take`` and sizes read
nothing, so a train/val split and a process's share cost no reads. Every
read of a file's text goes through ``read_text``.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, NamedTuple, Sequence

from dsax.config import DataError


def read_text(path: str) -> str:
  """A file's text (every read of a document's text goes through here)."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


class File(NamedTuple):
  """A document that is a whole file, read when its text is needed."""
  path: str
  size: int  # bytes on disk when listed; 0 reads as the empty document


def file_doc(path: str) -> File:
  """The handle of a file: its size, and whether it can be read (no text
  is read)."""
  try:
    size = os.stat(path).st_size
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
  if not os.access(path, os.R_OK):
    raise DataError(f"{path}: cannot be read (permission denied)")
  return File(path, size)


class Documents(Sequence[str]):
  """Documents whose text is read on first use.

  Each item is a file (``File``: path and size; its text is read, as UTF-8
  with ``errors="replace"``, each time it is indexed) or a text already in
  memory (a JSONL line, a Hugging Face row). Slicing and ``take`` give
  Documents without reading anything, so the split, a process's share and
  the sizes cost no reads; indexing or iterating reads. A file of n > 0
  bytes is never the empty text (each byte decodes to at least one
  character), so empty files are dropped by size alone. Compares equal to
  any sequence of the same texts.
  """

  def __init__(self, items: Iterable[File | str] = ()):
    self._items = list(items)

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return Documents(self._items[index])
    item = self._items[index]
    return item if isinstance(item, str) else read_text(item.path)

  def __iter__(self) -> Iterator[str]:
    return (self[i] for i in range(len(self)))

  def take(self, indices: Iterable[int]) -> "Documents":
    """The documents at ``indices``, in that order (nothing is read)."""
    return Documents(self._items[int(i)] for i in indices)

  def paths(self) -> list[str | None]:
    """Each document's file, None for a text held in memory."""
    return [None if isinstance(d, str) else d.path for d in self._items]

  def in_memory(self) -> int:
    """How many documents are texts held in memory (read in full)."""
    return sum(isinstance(d, str) for d in self._items)

  def size(self) -> int:
    """Bytes on disk of the files plus characters of the texts in memory
    (nothing is read)."""
    return sum(len(d) if isinstance(d, str) else d.size for d in self._items)

  def has_text(self) -> bool:
    """Whether any document is non-empty (nothing is read)."""
    return any(d if isinstance(d, str) else d.size > 0 for d in self._items)

  def __eq__(self, other) -> bool:
    if not isinstance(other, Sequence) or isinstance(other, str):
      return NotImplemented
    return len(self) == len(other) and all(a == b for a, b in zip(self, other))

  __hash__ = None  # type: ignore[assignment]

  def __repr__(self) -> str:
    return (f"Documents({len(self)} documents, "
            f"{len(self) - self.in_memory()} files)")
