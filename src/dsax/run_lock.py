"""An exclusive lock on a run directory for the life of a run.

``<workdir>/run.lock`` is held with ``flock`` (released by the kernel when the
process ends, however it ends) and holds a JSON record of the holder: pid,
host, start time and command. A heartbeat thread touches the file every
``HEARTBEAT_S`` seconds while the lock is held.

A second launch on the same directory cannot take the ``flock`` and stops
with ``LockHeld`` naming the holder's pid and host. A record left behind by a
process that died without releasing (SIGKILL, a lost node) is stale: on this
host when its pid is gone or its heartbeat is older than ``STALE_S``, on
another host when its heartbeat is older than ``STALE_S`` (a file system
whose ``flock`` does not reach across hosts still sees the heartbeat). A stale
lock is taken over with a message naming the dead holder.

Release removes the file, then drops the ``flock``; an acquirer that opened
the removed file sees that the path no longer names it and tries again, so
two runs can never both hold the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0   # the holder touches the lock file this often
STALE_S = 120.0      # a record whose heartbeat is older than this is stale


class LockHeld(RuntimeError):
  """Another live process holds the run directory's lock; launch.py exits 5."""

  def __init__(self, message: str, remedy: str = ""):
    super().__init__(message)
    self.remedy = remedy


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def describe(record: dict[str, Any]) -> str:
  """``pid 123 on host h (since 2025-01-01 12:00:01, launch.py ...)``."""
  since = record.get("started")
  when = "?"
  if isinstance(since, (int, float)):
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
  text = (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} "
          f"(since {when}")
  if record.get("command"):
    text += f", {record['command'][:80]}"
  return text + ")"


class RunLock:
  """``with RunLock(workdir):`` holds ``<workdir>/run.lock`` (see the module
  docstring); ``acquire`` raises ``LockHeld`` and returns a message when it
  took over a stale lock (None otherwise)."""

  def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S,
               stale_s: float = STALE_S):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.heartbeat_s = heartbeat_s
    self.stale_s = stale_s
    self.fd: int | None = None
    self.message: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # ----------------------------------------------------------- acquiring

  def _open_locked(self) -> int:
    """An fd of ``self.path`` holding its flock (LockHeld if another has it)."""
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          os.close(fd)
          raise
        record = _read(fd)
        os.close(fd)
        raise LockHeld(
            f"{os.path.abspath(self.workdir)} is in use by "
            f"{describe(record)}",
            "wait for that run to end, stop it (kill "
            f"{record.get('pid', 'PID')} on {record.get('host', 'its host')}"
            "; it saves and exits), or choose another --workdir") from None
      try:  # the holder before us may have removed the file meanwhile
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        return fd
      os.close(fd)

  def _live(self, record: dict[str, Any], fd: int) -> bool:
    """Whether the record's holder still runs (we hold the flock, so only a
    file system whose flock does not reach the holder lets us get here)."""
    if record.get("pid") == os.getpid() and record.get(
        "host") == socket.gethostname():
      return False  # our own leftover (a lock not released in this process)
    fresh = time.time() - os.fstat(fd).st_mtime < self.stale_s
    if record.get("host") == socket.gethostname():
      pid = record.get("pid")
      return isinstance(pid, int) and _pid_alive(pid) and fresh
    return fresh

  def acquire(self) -> str | None:
    os.makedirs(self.workdir, exist_ok=True)
    fd = self._open_locked()
    record = _read(fd)
    message = None
    if record:
      if self._live(record, fd):
        os.close(fd)
        raise LockHeld(
            f"{os.path.abspath(self.workdir)} is in use by "
            f"{describe(record)} (its heartbeat is recent)",
            "wait for that run to end or stop it; if it is gone, delete "
            f"{self.path}")
      message = (f"took over the stale lock of {describe(record)}: that "
                 "process is gone")
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.time(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
    os.fsync(fd)
    self.fd, self.message = fd, message
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name="dsax-run-lock")
    self._thread.start()
    return message

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        os.utime(self.fd)
      except (OSError, TypeError):
        return

  # ----------------------------------------------------------- releasing

  def release(self) -> None:
    if self.fd is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
        os.remove(self.path)
    except OSError:
      pass  # the directory went away or is read-only: the flock still ends
    os.close(self.fd)
    self.fd = None

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _read(fd: int) -> dict[str, Any]:
  """The holder record in the lock file ({} if empty or unreadable)."""
  try:
    size = os.fstat(fd).st_size
    text = os.pread(fd, min(size, 65536), 0).decode("utf-8", "replace")
    record = json.loads(text) if text.strip() else {}
  except (OSError, ValueError):
    return {"pid": "?", "host": "?"}
  return record if isinstance(record, dict) else {}
