"""Held-out long-document metrics: loss by position, loss against evaluation
length, indexer recall by layer.

Batches are ``dsax.data.heldout_batches`` rows (inputs, targets, segment_ids,
positions, weights). A ``NllFn`` maps a batch to the per-token next-token NLL
[B, T]; ``model_nll_fn`` builds one from ``dsax.model.forward``.

Loss by position: the weighted mean NLL of the tokens whose ``positions`` (the
offset in their document piece, i.e. how much context they have) fall in each
bucket [edges[i], edges[i+1]); edges double from 16 by default.

Recall by layer (dense attention, an ``AttentionMode`` with ``recall``): per layer, the
share of the head-summed dense attention mass in the indexer's top-k (selected),
the k largest (oracle) and the k most recent keys (local), as ``dsax.dsa``
computes them, averaged over batches. Random: the mass of k keys drawn uniformly
without replacement among the n_t keys query t sees; its expectation is exactly
k / n_t whatever the attention (every key is drawn with probability k / n_t),
so the eval computes that expectation from the positions, over the same queries
(n_t > k) as the other recalls. It is the same for every layer.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

NllFn = Callable[[dict], Any]


def default_edges(seq_len: int, first: int = 16) -> list[int]:
  edges = [0]
  e = first
  while e < seq_len:
    edges.append(e)
    e *= 2
  return edges + [seq_len]


def model_nll_fn(params, model_cfg, attention: str = "dense",
                 topk: int | None = None,
                 selection: str = "indexer") -> NllFn:
  """Per-token NLL of ``dsax.model.forward`` with ``attention`` ("dense" or
  "sparse", at ``topk``; None: the config's; keys by ``selection``:
  "indexer", "local" or "oracle"), jitted once per mode."""
  from dsax import model  # pylint: disable=import-outside-toplevel
  from dsax.attention import AttentionMode  # pylint: disable=import-outside-toplevel
  mode = AttentionMode.of(model_cfg, attention,
                          topk=topk if attention == "sparse" else 0,
                          selection=selection)
  key = ("nll", model_cfg, mode)
  if key not in _JITTED:
    import jax  # pylint: disable=import-outside-toplevel

    def f(p, batch):
      logits_BTV, _ = model.forward(p, batch["inputs"], model_cfg,
                                    batch["segment_ids"], mode=mode,
                                    positions_BT=batch["positions"])
      return model.token_nll(logits_BTV, batch["targets"])

    _JITTED[key] = jax.jit(f)
  f = _JITTED[key]
  return lambda batch: f(params, batch)


# One compiled function per (kind, config, attention, k), shared by parameter
# sets.
_JITTED: dict[tuple, Any] = {}


def loss_by_position(nll_fn: NllFn, batches: Sequence[dict],
                     edges: Sequence[int] | None = None) -> dict[str, Any]:
  """{"edges", "loss" (per bucket; None when empty), "tokens", "mean"}."""
  if not batches:
    raise ValueError("loss_by_position: no batches")
  seq_len = batches[0]["inputs"].shape[1]
  edges = list(edges or default_edges(seq_len))
  nb = len(edges) - 1
  tot, cnt = np.zeros(nb), np.zeros(nb)
  for b in batches:
    nll = np.asarray(nll_fn(b), np.float64)
    w = np.asarray(b["weights"], np.float64)
    bucket = np.searchsorted(edges, np.asarray(b["positions"]), "right") - 1
    ok = (bucket >= 0) & (bucket < nb) & (w > 0)
    np.add.at(tot, bucket[ok], (nll * w)[ok])
    np.add.at(cnt, bucket[ok], w[ok])
  loss = [float(t / c) if c > 0 else None for t, c in zip(tot, cnt)]
  return {"edges": edges, "loss": loss, "tokens": cnt.astype(int).tolist(),
          "mean": float(tot.sum() / max(cnt.sum(), 1.0))}


def mean_loss(nll_fn: NllFn, batches: Sequence[dict]) -> float:
  tot = cnt = 0.0
  for b in batches:
    w = np.asarray(b["weights"], np.float64)
    tot += float((np.asarray(nll_fn(b), np.float64) * w).sum())
    cnt += float(w.sum())
  return tot / max(cnt, 1.0)


def random_recall(positions_BT: np.ndarray, topk: int) -> float:
  """Expected mass of k uniformly random visible keys, mean over queries that
  see more than k keys (1.0 when none do)."""
  n = np.asarray(positions_BT, np.float64) + 1.0
  sel = n > topk
  return float(np.mean(topk / n[sel])) if sel.any() else 1.0


def recall_by_layer(params, model_cfg, batches: Sequence[dict],
                    topk: int) -> dict[str, list[float]]:
  """Per layer: recall (selected), recall_oracle, recall_local, recall_random."""
  import jax  # pylint: disable=import-outside-toplevel
  from dsax import model  # pylint: disable=import-outside-toplevel
  from dsax.attention import AttentionMode  # pylint: disable=import-outside-toplevel
  mode = AttentionMode.of(model_cfg, "dense", topk=topk, recall=True)
  names = ("recall", "recall_oracle", "recall_local")

  def f(p, batch):
    _, aux = model.forward(p, batch["inputs"], model_cfg, batch["segment_ids"],
                           mode=mode, positions_BT=batch["positions"])
    return {k: getattr(aux, k) for k in names}

  key = ("recall", model_cfg, mode)
  f = _JITTED.setdefault(key, jax.jit(f))
  outs = [jax.device_get(f(params, b)) for b in batches]
  res = {k: np.mean([o[k] for o in outs], axis=0).astype(float).tolist()
         for k in names}
  rand = float(np.mean([random_recall(b["positions"], topk) for b in batches]))
  res["recall_random"] = [rand] * len(res["recall"])
  return res
