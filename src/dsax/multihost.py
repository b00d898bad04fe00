"""Several processes (``jax.distributed``): one stop decision, per-process data.

Stopping. A SIGTERM or Ctrl-C reaches one process, or all of them at
different moments. Each process's signal handler only sets a local flag
(``Signals``); ``StopVote`` turns the flags into one decision: after
every train step each process dispatches a tiny jitted max over one value per
device (its flag on each of its devices), and reads the result one step later,
so the host never waits for the step. Every process reads the same value of
the same vote, so all stop after the same step and save it, whatever the
signal's timing. With one process the vote is the local flag itself, read at
once (the single-process behaviour).

Data. The processes whose devices hold different rows of the global batch
form G groups (``process_share``; the processes of one group hold the same
rows, e.g. different positions over ``sequence`` or the same rows
replicated over ``tensor``). ``prepare`` lists the documents on every
process without reading them (``data.Documents``: the split needs only
their number); a BPE tokenizer is trained by process 0 alone, on the sample
it reads, and sent to the others. Group g reads and tokenises only documents
g, g + G, ... of the train split and packs them into its own stream of
B / G rows per batch (``data.make_train_iterator(share=(g, G))``);
``TrainStream`` hands each process's block of those rows to
``jax.make_array_from_process_local_data`` (``sharding.global_batch``). Its
state is every group's iterator state (gathered from all processes when
saved), so a resume continues every stream exactly; it needs the same G. One
group (one process, or every process holding every row) is the single stream
of ``dsax.data``, with its plain state. Only process 0 builds the held-out
batches (``train._run``): the others never read the validation documents.
JSONL files and Hugging Face datasets are the exception: every process reads
them in full when listing (``data.load_documents``), and says so.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsax import context, data, sharding as S
from dsax.config import ConfigError, DataConfig, DataError
from dsax.tokenizer import Tokenizer, build_tokenizer

log = logging.getLogger("dsax")

STATE_KEYS = ("row", "doc", "offset", "seq_len")  # data._PackedIterator's


# ------------------------------------------------------------------ stopping


class StopVote:
  """The stop decision of every process from each one's local flag
  (``caught()``); see the module docstring."""

  def __init__(self, mesh: Mesh, caught: Callable[[], bool]):
    self._caught = caught
    self._pending = None
    self.multi = jax.process_count() > 1
    if self.multi:
      devices = list(mesh.devices.flat)
      flat = Mesh(np.array(devices), ("p",))
      self._n = len(devices)
      self._sharding = NamedSharding(flat, PartitionSpec("p"))
      self._local = [d for d in devices
                     if d.process_index == jax.process_index()]
      self._max = jax.jit(jnp.max,
                          out_shardings=NamedSharding(flat, PartitionSpec()))

  def _dispatch(self) -> jax.Array:
    """The max over processes of the flags, dispatched (not waited for)."""
    flag = np.array([int(bool(self._caught()))], np.int32)
    shards = [jax.device_put(flag, d) for d in self._local]
    return self._max(jax.make_array_from_single_device_arrays(
        (self._n,), self._sharding, shards))

  def after_step(self) -> bool:
    """Call once after dispatching each step, on every process; whether to
    stop after this step. Several processes: the vote dispatched after the
    previous step, read now (the same answer on every process)."""
    if not self.multi:
      return self._caught()
    vote, self._pending = self._pending, self._dispatch()
    return vote is not None and bool(vote)

  def now(self) -> bool:
    """A vote read at once; every process must call it at the same point."""
    if not self.multi:
      return self._caught()
    return bool(self._dispatch())


# ---------------------------------------------------------------------- data


def process_share(sharding: NamedSharding, shape: tuple[int, int]
                  ) -> tuple[int, int, list[int], tuple[slice, slice]]:
  """(this process's group g, the number of groups G, the group of each
  process, this process's block (rows, positions) of a [B, T] batch).

  Groups are the distinct row ranges that the processes' devices hold, in
  row order; ConfigError when a process's block is not one rectangle or the
  ranges overlap or differ in size."""
  blocks: dict[int, list[tuple[int, int, int, int]]] = {}
  for device, idx in sharding.devices_indices_map(shape).items():
    (r0, r1, _), (c0, c1, _) = (i.indices(n) for i, n in zip(idx, shape))
    blocks.setdefault(device.process_index, []).append((r0, r1, c0, c1))
  rect = {}
  for p, pieces in blocks.items():
    r0, r1 = min(b[0] for b in pieces), max(b[1] for b in pieces)
    c0, c1 = min(b[2] for b in pieces), max(b[3] for b in pieces)
    area = sum((b[1] - b[0]) * (b[3] - b[2]) for b in set(pieces))
    if area != (r1 - r0) * (c1 - c0):
      raise ConfigError(f"process {p}'s devices hold a batch block that is "
                        f"not one rectangle of the [B, T] = {list(shape)} "
                        f"batch (sharding {sharding.spec}); order the mesh "
                        "so that each process's devices are neighbours")
    rect[p] = (r0, r1, c0, c1)
  ranges = sorted({(r[0], r[1]) for r in rect.values()})
  sizes = {b - a for a, b in ranges}
  starts = [a for a, _ in ranges]
  if len(sizes) != 1 or starts != [i * next(iter(sizes))
                                   for i in range(len(ranges))]:
    raise ConfigError(f"the processes' batch rows {ranges} overlap or differ "
                      f"in size (data.batch_size={shape[0]}, sharding "
                      f"{sharding.spec}); use a mesh whose batch axes split "
                      "the processes evenly")
  group_of = [ranges.index(rect[p][:2]) for p in sorted(rect)]
  me = rect[jax.process_index()]
  return (group_of[jax.process_index()], len(ranges), group_of,
          (slice(0, me[1] - me[0]), slice(me[2], me[3])))


def prepare(cfg: DataConfig, cache_dir
            ) -> tuple[Tokenizer, data.Documents, data.Documents]:
  """``data.prepare`` on every process, reading no text but what process 0
  reads for a BPE tokenizer's sample (``shared_tokenizer``); one process:
  ``data.prepare`` itself."""
  if jax.process_count() == 1:
    return data.prepare(cfg, cache_dir)
  tok, train, val = data.prepare(cfg, cache_dir, build=shared_tokenizer)
  held = train.in_memory() + val.in_memory()
  if held:
    log.info("data: process %d holds %d documents read in full (JSONL lines "
             "or dataset rows: every process scans them; only files are "
             "read by share)", jax.process_index(), held)
  return tok, train, val


def shared_tokenizer(cfg: DataConfig, train_docs, cache_dir) -> Tokenizer:
  """``tokenizer.build_tokenizer``, but a BPE tokenizer is built (its sample
  read, trained or loaded from ``cache_dir``) by process 0 alone and sent to
  every process (two broadcasts: its JSON's length, then the JSON). A
  failure on process 0 is raised there and a DataError on the others."""
  if cfg.tokenizer != "bpe" or jax.process_count() == 1:
    return build_tokenizer(cfg, train_docs, cache_dir)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  blob, error = b"", None
  if jax.process_index() == 0:
    try:
      blob = build_tokenizer(cfg, train_docs, cache_dir).to_json().encode()
    except Exception as e:  # pylint: disable=broad-except  # raised below
      error = e
  n = int(multihost_utils.broadcast_one_to_all(
      np.int32(-1 if error is not None else len(blob))))
  if error is not None:
    raise error
  if n < 0:
    raise DataError("process 0 could not build the BPE tokenizer "
                    "(data.tokenizer='bpe'); its log says why")
  mine = (np.frombuffer(blob, np.uint8) if jax.process_index() == 0
          else np.zeros(n, np.uint8))
  got = np.asarray(multihost_utils.broadcast_one_to_all(mine), np.uint8)
  if jax.process_index() != 0:
    log.info("BPE tokenizer: received from process 0 (%d bytes)", n)
  return Tokenizer.from_json("bpe", got.tobytes().decode())


class TrainStream:
  """This process's group's train stream, as global batches on ``sharding``
  (see the module docstring); ``get_state`` is a collective when there are
  several groups (every process calls it at the same point, as saves do)."""

  def __init__(self, cfg: DataConfig, tokenizer, train_docs: Sequence[str],
               sharding: NamedSharding):
    self.shape = (cfg.batch_size, cfg.seq_len)
    self.sharding = sharding
    self._n_seq = sharding.mesh.shape.get(context.AXIS, 1)
    self.group, self.groups, self._group_of, self._block = process_share(
        sharding, self.shape)
    # Documents: only this group's files are ever read.
    self._it = data.make_train_iterator(cfg, tokenizer, train_docs,
                                        (self.group, self.groups))
    if self.groups > 1:
      log.info("data: process %d reads train documents i %% %d == %d (%d of "
               "%d), %d rows of each batch", jax.process_index(),
               self.groups, self.group,
               len(range(self.group, len(train_docs), self.groups)),
               len(train_docs), cfg.batch_size // self.groups)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    # Whole rows in the zig-zag layout of context parallelism (the identity
    # without a sequence axis), then this process's block of them.
    local = context.layout_batch(next(self._it), self._n_seq)
    return S.global_batch({k: v[self._block] for k, v in local.items()},
                          self.sharding, self.shape)

  def get_state(self) -> dict[str, Any]:
    state = self._it.get_state()
    if self.groups == 1:
      return state
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    mine = np.array([state[k] for k in STATE_KEYS], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine))
    streams: list[Any] = [None] * self.groups
    for p, g in enumerate(self._group_of):
      streams[g] = {k: int(v) for k, v in zip(STATE_KEYS, every[p])}
    return {"groups": self.groups, "streams": streams}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = int(state.get("groups", 1))
    if saved != self.groups:
      raise ConfigError(
          f"the checkpoint's data streams are split over {saved} process "
          f"group(s) and this run's over {self.groups}: resume with the "
          "processes and mesh batch axes that saved it")
    self._it.set_state(state["streams"][self.group] if "streams" in state
                       else state)


class Signals:
  """Turns SIGTERM and SIGINT into a flag the loop checks between steps (with
  several processes, through a multihost.StopVote); a second signal acts as
  if none were caught (stops at once)."""

  def __init__(self):
    self.caught: int | None = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.caught is not None:
      self.__exit__()
      os.kill(os.getpid(), signum)
      return
    self.caught = signum
    log.warning("%s: saving at the end of this step (again to stop at once)",
                self.name)

  @property
  def name(self) -> str:
    """The signal caught here, or what stopped another process."""
    if self.caught is None:
      return "a signal to another process"
    return signal.Signals(self.caught).name

  def vote(self, mesh) -> StopVote:
    return StopVote(mesh, lambda: self.caught is not None)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}
