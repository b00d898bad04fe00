"""Evaluation of a finished run: retrieval tasks, loss by position and length,
indexer recall by layer; the report (``launch.py eval RUN_DIR``).

Models (phases found under RUN_DIR/phases): the base (the first pretrain phase
that is not the control) and the dense control with dense attention; the
sparse phase with sparse attention at each k; recall by layer for the base
(untrained indexer), warm-up and sparse phases' indexers at each k. Modules: ``retrieval`` (teacher-forced
and greedy task scoring, eval sets), ``position`` (held-out loss by position and
length, recall), ``comparison`` (the held-out table that fills a run's
summary.json), ``report`` (results.json, report.md, plots, compare).
``finish_run`` is what a training run calls at its end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

from dsax.evals import comparison, position, report, retrieval


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def load_run(run_dir: str):
  """(cfg, tokenizer, val_docs) of a run directory."""
  from dsax import data  # pylint: disable=import-outside-toplevel
  from dsax.config import ExperimentConfig, from_dict  # pylint: disable=import-outside-toplevel
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {run_dir}: not a run directory")
  with open(path, encoding="utf-8") as f:
    cfg = from_dict(ExperimentConfig, json.load(f))
  tok, _, val = data.prepare(cfg.data,
                             data.tokenizer_cache_dir(cfg.data, run_dir))
  return cfg, tok, val


def plan(cfg, run_dir: str, ks: Sequence[int],
         baselines: Sequence[str] = ()) -> dict[str, list]:
  """{"modes": [(label, phase, attention, topk, selection)], "recall":
  [(label, phase, topk)]} for the phases whose parameters exist;
  ``baselines`` ("local", "oracle") add sparse rows of the base model with
  that selection at each k (the local window with sinks; the oracle top-k,
  an upper bound for any indexer on these weights)."""
  have = lambda n: os.path.isdir(os.path.join(run_dir, "phases", n))
  kind = lambda k: [p.name for p in cfg.phases
                    if p.kind == k and p.name != cfg.control and have(p.name)]
  modes, recall = [], []
  base = kind("pretrain")
  if base:
    modes.append((f"base ({base[0]}) dense", base[0], "dense", None,
                  "indexer"))
    # The base's indexer is untrained: recall before the warm-up.
    recall += [(f"base ({base[0]}) k={k}", base[0], k) for k in ks]
    for sel in baselines:
      modes += [(f"{sel} ({base[0]}) k={k}", base[0], "sparse", k, sel)
                for k in ks]
  if cfg.control and have(cfg.control):
    modes.append((f"control ({cfg.control}) dense", cfg.control, "dense",
                  None, "indexer"))
  for w in kind("warmup")[:1]:
    recall += [(f"warm-up ({w}) k={k}", w, k) for k in ks]
  for s in kind("sparse")[:1]:
    modes += [(f"sparse ({s}) k={k}", s, "sparse", k, "indexer") for k in ks]
    recall += [(f"sparse ({s}) k={k}", s, k) for k in ks]
  return {"modes": modes, "recall": recall}


def run_eval(run_dir: str, ks: Sequence[int] | None = None,
             lengths: Sequence[int] | None = None, quick: bool = False,
             seed: int = 0, out_dir: str | None = None,
             tasks: Sequence[str] | None = None,
             per_cell: int | None = None, greedy_n: int | None = None,
             heldout_batches: int | None = None, prepared=None,
             evaluator=None,
             baselines: Sequence[str] = ()) -> dict[str, Any]:
  """Evaluates a run's phases and writes the report to RUN_DIR/eval.

  ``prepared`` = (cfg, tokenizer, val_docs) and ``evaluator`` (a
  ``heldout.Evaluator``) let a finished training run pass what it has built;
  otherwise both come from RUN_DIR. ``baselines``: selection baselines
  ("local", "oracle") evaluated as sparse rows of the base model (``plan``).
  """
  from dsax import checkpoint, data, heldout  # pylint: disable=import-outside-toplevel
  from dsax import params as P  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  cfg, tok, val = prepared or load_run(run_dir)
  seq_len = cfg.eval.seq_len or cfg.data.seq_len
  ks = list(ks or [cfg.model.indexer.topk])
  lengths = sorted(set(lengths or ([seq_len, 2 * seq_len] if quick else
                                   [seq_len, 2 * seq_len, 4 * seq_len])))
  tasks = list(tasks or (("passkey", "niah_single", "mqar") if quick else
                         ("passkey",) + retrieval.RULER_TASKS + ("mqar",)))
  per_cell = per_cell or (2 if quick else 4)
  greedy_n = 2 if greedy_n is None and quick else (
      8 if greedy_n is None else greedy_n)
  n_batches = heldout_batches or (2 if quick else cfg.eval.final_batches)
  depths = (0.0, 0.5, 1.0) if quick else retrieval.PASSKEY_DEPTHS
  out_dir = out_dir or os.path.join(run_dir, "eval")
  todo = plan(cfg, run_dir, ks, baselines)
  if not todo["modes"] and not todo["recall"]:
    raise FileNotFoundError(f"no phase parameters under {run_dir}/phases")

  _log(f"eval {cfg.name}: lengths {lengths}, k {ks}, tasks {tasks}")
  examples = retrieval.build_eval_set(tok, seed, lengths, depths, tasks,
                                      per_cell)
  _log(f"eval set: {len(examples)} examples (seed {seed})")
  long_len = max(lengths)
  batches = {l: data.heldout_batches(cfg.data, tok, val, n_batches, l)
             for l in lengths}
  batches = {l: b for l, b in batches.items() if b}
  abstract = P.abstract_params(cfg.model)
  cache: dict[str, Any] = {}

  def load(name):
    if name not in cache:
      cache[name] = checkpoint.load_params(
          os.path.join(run_dir, "phases", name), abstract)
    return cache[name]

  results: dict[str, Any] = {
      "run": cfg.name,
      "settings": {"ks": ks, "lengths": lengths, "tasks": tasks,
                   "depths": list(depths), "per_cell": per_cell,
                   "seed": seed, "quick": quick, "heldout_batches": n_batches,
                   "tokenizer": tok.kind, "train_seq_len": cfg.data.seq_len,
                   "n_examples": len(examples),
                   "greedy_method": "decode.generate"},
      "modes": {}, "recall": {}}
  greedy_set = retrieval.greedy_subset(examples, greedy_n)
  # The scorer brings [B, T, V] f32 logits to the host: keep them under 2 GB.
  batch_size = int(max(1, min(8, 2**31 // (4 * cfg.model.vocab_size
                                           * (max(lengths) + 64)))))
  results["settings"]["batch_size"] = batch_size
  for label, phase, attention, k, selection in todo["modes"]:
    _log(f"  {label}")
    params = load(phase)
    logits_fn = retrieval.model_logits_fn(params, cfg.model, attention, k,
                                          selection)
    scored = retrieval.score_examples(logits_fn, examples, tok, batch_size)
    entry: dict[str, Any] = {
        "phase": phase, "attention": attention, "topk": k,
        "selection": selection,
        "retrieval": retrieval.accuracy_tables(scored)}
    if greedy_set:
      g = retrieval.greedy_scores(greedy_set, tok, params=params,
                                  model_cfg=cfg.model, attention=attention,
                                  topk=k, selection=selection)
      entry["greedy"] = {"method": g[0]["method"], "n": len(g),
                         "score": sum(x["score"] for x in g) / len(g),
                         "examples": g}
    nll = position.model_nll_fn(params, cfg.model, attention, k, selection)
    if long_len in batches:
      entry["loss_by_position"] = position.loss_by_position(
          nll, batches[long_len])
    entry["loss_vs_length"] = {str(l): position.mean_loss(nll, b)
                               for l, b in batches.items()}
    results["modes"][label] = entry
  _log("  held-out comparison")
  rows, summary = comparison.compare(
      cfg, evaluator or heldout.Evaluator(cfg, tok, val), load,
      lambda n: os.path.isdir(os.path.join(run_dir, "phases", n)))
  results["heldout"] = {"rows": rows, "summary": summary}
  for label, phase, k in todo["recall"]:
    if long_len in batches:
      _log(f"  recall: {label}")
      results["recall"][label] = position.recall_by_layer(
          load(phase), cfg.model, batches[long_len], k)
  results["settings"]["wall_seconds"] = time.perf_counter() - t0
  paths = report.write_report(out_dir, results)
  _log("wrote " + ", ".join(paths))
  return results


def finish_run(cfg, run_dir: str, tokenizer, val_docs,
               evaluator) -> dict[str, Any]:
  """The end of a training run: the held-out comparison (printed, written to
  comparison.txt; ``cfg.compare``) and, with ``cfg.report``, the eval report
  (quick settings; ``launch.py eval RUN_DIR`` gives the full one). Returns
  the summary keys of ``comparison``."""
  from dsax import checkpoint  # pylint: disable=import-outside-toplevel
  from dsax import params as P  # pylint: disable=import-outside-toplevel
  summary: dict[str, Any] = {}
  if cfg.report:
    results = run_eval(run_dir, quick=True, lengths=[cfg.data.seq_len],
                       tasks=("passkey", "niah_single", "mqar"),
                       prepared=(cfg, tokenizer, val_docs),
                       evaluator=evaluator)
    rows, summary = results["heldout"]["rows"], results["heldout"]["summary"]
  elif cfg.compare:
    abstract = P.abstract_params(cfg.model)
    rows, summary = comparison.compare(
        cfg, evaluator, lambda n: checkpoint.load_params(
            os.path.join(run_dir, "phases", n), abstract))
  else:
    return summary
  table = comparison.format_table(rows)
  print(table, flush=True)
  with open(os.path.join(run_dir, "comparison.txt"), "w") as f:
    f.write(table + "\n")
  return summary


__all__ = ["comparison", "position", "report", "retrieval", "run_eval",
           "finish_run", "plan", "load_run"]
