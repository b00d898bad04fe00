"""The end-of-run comparison: the base, the warmed-up indexer, the sparse model
and the dense control on the same held-out batches (``heldout.Evaluator``).

Per model: ``loss`` (token-weighted NLL), ``indexer_kl`` (mean over layers; the
dense target in dense mode, restricted to S_t in sparse mode), ``recall``,
``recall_oracle``, ``recall_local`` (see ``dsax.heldout``). The summary keys
(summary.json of a run):

  heldout_loss_base, warmup_kl_start, recall_before_warmup   the base, dense
  warmup_kl_end, recall_after_warmup, recall_oracle,
  recall_local_window, warmup_kl_drop = 1 - end / start     after the warm-up
  heldout_loss_dense                                         the dense control
  heldout_loss_sparse, recall_sparse_model,
  sparse_vs_dense_loss = sparse / dense - 1                  the sparse model
"""

from __future__ import annotations

from typing import Any, Callable


def phase_of_kind(cfg, kind: str) -> str | None:
  """The first phase of ``kind`` that is not the control."""
  for p in cfg.phases:
    if p.kind == kind and p.name != cfg.control:
      return p.name
  return None


def compare(cfg, evaluator, load: Callable[[str], Any],
            have: Callable[[str], bool] = lambda name: True
            ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
  """(rows, summary): one row per model found, and the summary keys."""
  base, warm, sparse = (phase_of_kind(cfg, k)
                        for k in ("pretrain", "warmup", "sparse"))
  rows: dict[str, dict[str, float]] = {}
  out: dict[str, float] = {}
  if base and have(base):
    rows[f"base ({base}), dense"] = r = evaluator.evaluate(load(base))
    out.update(heldout_loss_base=r["loss"], warmup_kl_start=r["indexer_kl"],
               recall_before_warmup=r["recall"])
  if warm and have(warm):
    rows[f"warm-up ({warm}), dense"] = r = evaluator.evaluate(load(warm))
    out.update(warmup_kl_end=r["indexer_kl"], recall_after_warmup=r["recall"],
               recall_oracle=r["recall_oracle"],
               recall_local_window=r["recall_local"])
    if "warmup_kl_start" in out:
      out["warmup_kl_drop"] = 1 - out["warmup_kl_end"] / out["warmup_kl_start"]
  if cfg.control and have(cfg.control):
    rows[f"dense control ({cfg.control})"] = r = evaluator.evaluate(
        load(cfg.control))
    out["heldout_loss_dense"] = r["loss"]
  if sparse and have(sparse):
    rows[f"sparse ({sparse}), top-k"] = r = evaluator.evaluate(
        load(sparse), "sparse")
    out.update(heldout_loss_sparse=r["loss"], recall_sparse_model=r["recall"])
    if "heldout_loss_dense" in out:
      out["sparse_vs_dense_loss"] = (out["heldout_loss_sparse"]
                                     / out["heldout_loss_dense"] - 1)
  return rows, out


COLUMNS = ("loss", "indexer_kl", "recall", "recall_oracle", "recall_local")


def format_table(rows: dict[str, dict[str, float]]) -> str:
  """A fixed-width text table (comparison.txt, the console)."""
  width = max([len(k) for k in rows] + [10])
  lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>13}" for c in COLUMNS)]
  for name, r in rows.items():
    lines.append(f"{name:<{width}}  " + "  ".join(f"{r[c]:>13.4f}"
                                                  for c in COLUMNS))
  return "\n".join(lines)


def markdown_table(rows: dict[str, dict[str, float]]) -> list[str]:
  """The same table as markdown lines (report.md)."""
  lines = ["| model | " + " | ".join(COLUMNS) + " |",
           "|---" * (len(COLUMNS) + 1) + "|"]
  lines += [f"| {name} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS) + " |"
            for name, r in rows.items()]
  return lines
