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

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsax import dsa, model
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
    self._fns: dict[tuple[str, int], Any] = {}

  def _fn(self, attention: str, topk: int):
    key = (attention, topk)
    if key not in self._fns:
      cfg = self.cfg
      opts = dsa.DSAOptions(indexer_loss=True, metrics=True, topk=topk)

      def f(params, batch):
        logits, aux = model.forward(
            params, batch["inputs"], cfg.model, batch["segment_ids"],
            positions_BT=batch["positions"], attention=attention,
            dsa_options=opts)
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        w = batch["weights"]
        return {"nll_sum": jnp.sum(nll * w), "weight": jnp.sum(w),
                **{k: jnp.mean(v) for k, v in aux.items()}}

      self._fns[key] = jax.jit(f)
    return self._fns[key]

  def evaluate(self, params, attention: str = "dense", topk: int = 0,
               n_batches: int | None = None) -> dict[str, float]:
    topk = topk or self.cfg.model.indexer.topk
    fn = self._fn(attention, topk)
    batches = self.batches[:n_batches or len(self.batches)]
    outs = [jax.device_get(fn(params, b)) for b in batches]
    res = {"loss": sum(o["nll_sum"] for o in outs)
                   / max(sum(o["weight"] for o in outs), 1.0)}
    for k in ("indexer_kl", "recall", "recall_oracle", "recall_local"):
      res[k] = float(np.mean([o[k] for o in outs]))
    return {k: float(v) for k, v in res.items()}

  def quick(self, params, attention: str) -> dict[str, float]:
    return self.evaluate(params, attention, n_batches=self.cfg.eval.batches)


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
    f.write("\n")
