"""Held-out evaluation over fixed batches (the comparison that fills a run's
summary.json is ``dsax.evals.comparison``).

For a parameter set and an attention mode, over fixed held-out batches:
  loss        token-weighted mean next-token NLL
  indexer_kl  mean over layers of the indexer KL (dense target in dense mode,
              restricted to S_t in sparse mode)
  recall, recall_oracle, recall_local
              share of the head-summed dense attention mass inside the
              indexer's top-k / the oracle top-k / the k most recent keys,
              mean over layers and over query positions t >= k (earlier ones
              see at most k keys, so every set keeps all their mass)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsax import model
from dsax.attention import AttentionMode, LayerAux
from dsax.config import ExperimentConfig

log = logging.getLogger("dsax")


class Evaluator:
  """Jitted held-out metrics over fixed batches (built once per run)."""

  def __init__(self, cfg: ExperimentConfig, tokenizer, val_docs):
    from dsax import data  # pylint: disable=import-outside-toplevel
    self.cfg = cfg
    seq_len = cfg.eval.seq_len or cfg.data.seq_len
    n = max(cfg.eval.batches, cfg.eval.final_batches)
    self.batches = [{k: jnp.asarray(v) for k, v in b.items()}
                    for b in data.heldout_batches(cfg.data, tokenizer,
                                                  val_docs, n, seq_len)]
    if not self.batches:
      raise ValueError("no held-out batches: raise data.val_fraction")
    self._fns: dict[AttentionMode, Any] = {}

  def _fn(self, mode: AttentionMode):
    if mode not in self._fns:
      cfg = self.cfg

      def f(params, batch):
        logits_BTV, aux = model.forward(
            params, batch["inputs"], cfg.model, batch["segment_ids"],
            mode=mode, positions_BT=batch["positions"])
        nll_BT = model.token_nll(logits_BTV, batch["targets"])
        w_BT = batch["weights"]
        return {"nll_sum": jnp.sum(nll_BT * w_BT), "weight": jnp.sum(w_BT),
                **{k: jnp.mean(v) for k, v in aux.scalars().items()}}

      self._fns[mode] = jax.jit(f)
    return self._fns[mode]

  def evaluate(self, params, kind: str = "dense", topk: int = 0,
               n_batches: int | None = None,
               selection: str = "indexer") -> dict[str, float]:
    """Loss, indexer KL and recall with ``kind`` attention ("dense" or
    "sparse") at ``topk`` (0: the model's); sparse keys by ``selection``
    ("indexer", or the baselines "local" and "oracle": AttentionMode)."""
    mode = AttentionMode.of(self.cfg.model, kind, topk=topk,
                            selection=selection)
    return self.evaluate_mode(params, mode, n_batches)

  def evaluate_mode(self, params, mode: AttentionMode,
                    n_batches: int | None = None) -> dict[str, float]:
    """The same for a given mode (a phase's: its k, selection, sinks); the
    indexer KL and recall are always reported, the gate is irrelevant."""
    mode = dataclasses.replace(mode, indexer_loss=True, recall=True,
                               indices=False, indexer_keys=False,
                               cache=False, indexer_gate=False)
    fn = self._fn(mode)
    batches = self.batches[:n_batches or len(self.batches)]
    outs = [jax.device_get(fn(params, b)) for b in batches]
    res = {"loss": sum(o["nll_sum"] for o in outs)
                   / max(sum(o["weight"] for o in outs), 1.0)}
    for k in LayerAux.SCALARS:
      res[k] = float(np.mean([o[k] for o in outs]))
    return {k: float(v) for k, v in res.items()}

  def quick(self, params, mode: AttentionMode) -> dict[str, float]:
    """``evaluate_mode`` on the first ``eval.batches`` batches (during
    training, with the phase's mode)."""
    return self.evaluate_mode(params, mode, self.cfg.eval.batches)


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
    f.write("\n")
