"""Run metrics: JSONL (one object per logged step), TensorBoard, log file.

metrics.jsonl is strict JSON: a non-finite value (a NaN loss, an inf
gradient norm) is written as null, and ``read_metrics`` gives it back as
NaN.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

log = logging.getLogger("dsax")


class MetricWriter:
  """Appends ``{"phase", "step", ...}`` rows to metrics.jsonl and mirrors them
  to TensorBoard (tensorboardX) under <workdir>/tb."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled and os.path.exists(self.path) and os.path.getsize(self.path):
      with open(self.path, "rb+") as f:  # a row cut short by a kill
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          f.write(b"\n")
    if enabled:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # TensorBoard is optional
        self.tb = None

  def write(self, phase: str, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"phase": phase, "step": int(step)}
    for k, v in values.items():
      row[k] = float(v) if math.isfinite(float(v)) else None
    with open(self.path, "a") as f:
      f.write(json.dumps(row, allow_nan=False) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k not in ("phase", "step") and v is not None:
          self.tb.add_scalar(f"{phase}/{k}", v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Rows of metrics.jsonl; a step logged twice (before a crash and after the
  resume) keeps its last row; null (and a legacy NaN) reads as NaN; a line
  that is not a row (cut short by a kill) is skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows: dict[tuple[str, int], dict] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          r = json.loads(line)
          key = (r["phase"], r["step"])
        except (ValueError, KeyError, TypeError):
          continue
        rows[key] = {k: math.nan if v is None else v for k, v in r.items()}
  return list(rows.values())


def setup_logging(workdir: str) -> None:
  """INFO of the ``dsax`` loggers to stderr and to <workdir>/log.txt (not
  propagated, so a handler that a library put on the root logger does not
  print every line twice)."""
  logger = logging.getLogger("dsax")
  logger.setLevel(logging.INFO)
  logger.propagate = False
  fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
  path = os.path.abspath(os.path.join(workdir, "log.txt"))
  for h in list(logger.handlers):
    logger.removeHandler(h)
    h.close()
  for h in (logging.StreamHandler(), logging.FileHandler(path)):
    h.setFormatter(fmt)
    logger.addHandler(h)
  for noisy in ("absl", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_secondary_logging(process: int) -> None:
  """Processes other than 0 log to stderr only, tagged with their index."""
  logger = logging.getLogger("dsax")
  logger.setLevel(logging.INFO)
  logger.propagate = False
  for h in list(logger.handlers):
    logger.removeHandler(h)
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter(
      f"[process {process}] %(asctime)s %(message)s", "%H:%M:%S"))
  logger.addHandler(handler)
