"""Rows of a comparison page: each row is one parameter set (a run's phase)
read with one attention mode, and every row is measured on the same held-out
text and the same task examples, so the columns compare like with like.

Columns (``evaluate_row``): held-out loss per text set, the NLL by position
bucket, the next-token argmax (for the top-1 agreement with a reference row,
``agreement``), teacher-forced accuracy per task cell (counts, so
``wilson`` gives binomial intervals) and, for rows that ask, the indexer's
attention-mass recall by layer. ``evaluate_rows`` keeps each finished row in
a JSON (and its argmaxes in an .npz) under a cache directory, so a killed
evaluation resumes at the next row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

from dsax.evals import position, retrieval


@dataclasses.dataclass(frozen=True)
class Row:
  """``phase``'s parameters read with ``kind`` attention ("dense" or
  "sparse" at ``topk``, keys by ``selection``: indexer, local, oracle);
  ``recall``: also the recall by layer of this phase's indexer."""
  label: str
  phase: str
  kind: str = "dense"
  topk: int | None = None
  selection: str = "indexer"
  recall: bool = False

  @property
  def slug(self) -> str:
    return re.sub(r"[^a-z0-9]+", "_", self.label.lower()).strip("_")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The Wilson score interval of a binomial proportion (95% at z = 1.96)."""
  if n <= 0:
    return (0.0, 1.0)
  p = hits / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return (max(0.0, centre - half), min(1.0, centre + half))


_TOKEN_FNS: dict[tuple, Callable] = {}


def token_fn(model_cfg, row: Row) -> Callable:
  """A jitted ``(params, batch) -> (nll_BT, top1_BT)`` for the row's mode,
  shared by rows with the same mode."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dsax import model  # pylint: disable=import-outside-toplevel
  from dsax.attention import AttentionMode  # pylint: disable=import-outside-toplevel
  mode = AttentionMode.of(model_cfg, row.kind,
                          topk=row.topk if row.kind == "sparse" else 0,
                          selection=row.selection)
  key = (model_cfg, mode)
  if key not in _TOKEN_FNS:
    def f(p, batch):
      logits_BTV, _ = model.forward(p, batch["inputs"], model_cfg,
                                    batch["segment_ids"], mode=mode,
                                    positions_BT=batch["positions"])
      return (model.token_nll(logits_BTV, batch["targets"]),
              jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32))
    _TOKEN_FNS[key] = jax.jit(f)
  return _TOKEN_FNS[key]


def heldout_columns(fn: Callable, params, batches: Sequence[dict],
                    tick: Callable[[], None] = lambda: None
                    ) -> tuple[dict[str, Any], np.ndarray]:
  """({"loss", "tokens", "by_position": {"edges", "loss", "tokens"}},
  top1 of every position, flattened in batch order)."""
  seq_len = batches[0]["inputs"].shape[1]
  edges = position.default_edges(seq_len)
  nb = len(edges) - 1
  tot, cnt, top1 = np.zeros(nb), np.zeros(nb), []
  for b in batches:
    nll, arg = fn(params, b)
    nll, w = np.asarray(nll, np.float64), np.asarray(b["weights"], np.float64)
    bucket = np.searchsorted(edges, np.asarray(b["positions"]), "right") - 1
    ok = (bucket >= 0) & (bucket < nb) & (w > 0)
    np.add.at(tot, bucket[ok], (nll * w)[ok])
    np.add.at(cnt, bucket[ok], w[ok])
    top1.append(np.asarray(arg).reshape(-1))
    tick()
  return ({"loss": float(tot.sum() / max(cnt.sum(), 1.0)),
           "tokens": int(cnt.sum()),
           "by_position": {"edges": edges,
                           "loss": [float(t / c) if c else None
                                    for t, c in zip(tot, cnt)],
                           "tokens": cnt.astype(int).tolist()}},
          np.concatenate(top1))


def task_counts(scored: Sequence[dict]) -> dict[str, dict[str, list[int]]]:
  """{"<task>@<length>": {"<depth>": [hits, n]}} ("all" when the cell has no
  depth)."""
  out: dict[str, dict[str, list[int]]] = {}
  for r in scored:
    c = r["cell"]
    name = f"{retrieval.table_name(c)}@{c['length']}"
    depth = "all" if c["depth"] is None else f"{c['depth']:g}"
    hits_n = out.setdefault(name, {}).setdefault(depth, [0, 0])
    hits_n[0] += int(r["correct"])
    hits_n[1] += 1
  return out


def totals(cells: dict[str, list[int]]) -> tuple[int, int]:
  """(hits, n) over a task's cells."""
  return (sum(h for h, _ in cells.values()), sum(n for _, n in cells.values()))


def agreement(top1: np.ndarray, ref_top1: np.ndarray,
              weights: np.ndarray) -> float:
  """The fraction of weighted positions where two rows' argmaxes agree."""
  w = np.asarray(weights, np.float64).reshape(-1)
  same = (np.asarray(top1).reshape(-1) == np.asarray(ref_top1).reshape(-1))
  return float((same * w).sum() / max(w.sum(), 1.0))


def evaluate_row(row: Row, params, model_cfg, texts: dict[str, list[dict]],
                 examples: Sequence, tokenizer, recall_batches: Sequence[dict],
                 tick: Callable[[], None] = lambda: None,
                 pad_to: int = 128) -> tuple[dict[str, Any], dict]:
  """(the row's JSON-ready result, {text set: top1 array})."""
  fn = token_fn(model_cfg, row)
  result: dict[str, Any] = {"row": dataclasses.asdict(row), "heldout": {}}
  top1 = {}
  for name, batches in texts.items():
    result["heldout"][name], top1[name] = heldout_columns(fn, params, batches,
                                                          tick)
  logits_fn = retrieval.model_logits_fn(params, model_cfg, row.kind, row.topk,
                                        row.selection)
  scored = []
  for ex in examples:  # one at a time, so the progress bar moves
    scored += retrieval.score_examples(logits_fn, [ex], tokenizer, 1, pad_to)
    tick()
  result["tasks"] = task_counts(scored)
  if row.recall:
    result["recall"] = position.recall_by_layer(params, model_cfg,
                                                recall_batches, row.topk)
    tick()
  return result, top1


def n_ticks(rows: Sequence[Row], texts: dict[str, list[dict]],
            examples: Sequence) -> int:
  """Progress-bar units of ``evaluate_rows``: one per forward pass."""
  per_row = sum(len(b) for b in texts.values()) + len(examples)
  return sum(per_row + int(r.recall) for r in rows)


def evaluate_rows(rows: Sequence[Row], load: Callable[[str], Any], model_cfg,
                  texts: dict[str, list[dict]], examples: Sequence, tokenizer,
                  recall_batches: Sequence[dict], cache_dir: str,
                  progress=None) -> dict[str, dict[str, Any]]:
  """Every row's result (``evaluate_row``) with its ``top1`` arrays under
  ``"top1"``; finished rows are read back from ``cache_dir`` (delete a
  row's files there to recompute it). ``progress`` (a tqdm-like bar with
  ``update``) advances once per forward pass."""
  os.makedirs(cache_dir, exist_ok=True)
  tick = (lambda: progress.update(1)) if progress is not None else (
      lambda: None)
  per_row = sum(len(b) for b in texts.values()) + len(examples)
  out = {}
  for row in rows:
    js = os.path.join(cache_dir, row.slug + ".json")
    npz = os.path.join(cache_dir, row.slug + ".npz")
    if os.path.isfile(js) and os.path.isfile(npz):
      with open(js, encoding="utf-8") as f:
        res = json.load(f)
      if res["row"] == dataclasses.asdict(row):
        with np.load(npz) as z:
          res["top1"] = {k: z[k] for k in z.files}
        out[row.label] = res
        if progress is not None:
          progress.update(per_row + int(row.recall))
        continue
    res, top1 = evaluate_row(row, load(row.phase), model_cfg, texts, examples,
                             tokenizer, recall_batches, tick)
    np.savez(npz + ".tmp.npz", **top1)
    os.replace(npz + ".tmp.npz", npz)
    with open(js + ".tmp", "w", encoding="utf-8") as f:
      json.dump(res, f, indent=1)
    os.replace(js + ".tmp", js)
    res["top1"] = top1
    out[row.label] = res
  return out
