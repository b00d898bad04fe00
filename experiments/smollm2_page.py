"""The results page of the SmolLM2 DSA experiment (``smollm2_dsa.py``):
evaluates the rows (``dsax.evals.rows``) of a finished run and writes the
markdown page with its PNGs.

Rows: the dense original; sparse with the fresh indexer; sparse after the
warm-up only; sparse after sparse training (indexer on its KL, and with the
router-style gate when the run has ``sparse_lm``); the dense control; the
local window with sinks and the oracle top-k on the original weights.
Columns: held-out loss on standard-library code and on natural prose, the
NLL ratio to the dense original by position bucket, top-1 next-token
agreement with the dense original, passkey at T/2 and T (5 depths x 4 seeds
each), a needle in natural text at T, and the indexer's recall by layer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

from dsax.evals import retrieval
from dsax.evals import rows as R

PASSKEY_SEEDS = 4      # examples per (length, depth) cell
NEEDLE_SEEDS = 1       # natural-text needles per depth at T


def page_rows(cfg) -> list[R.Row]:
  k = cfg.model.indexer.topk
  names = [p.name for p in cfg.phases]
  rows = [R.Row("dense original", "original"),
          R.Row("sparse, fresh indexer", "original", "sparse", k,
                recall=True),
          R.Row("sparse after warm-up", "warmup", "sparse", k, recall=True),
          R.Row("sparse after sparse training (KL)", "sparse", "sparse", k,
                recall=True)]
  if "sparse_lm" in names:
    rows.append(R.Row("sparse after sparse training (LM gate)", "sparse_lm",
                      "sparse", k, recall=True))
  rows += [R.Row("dense control", cfg.control),
           R.Row("local window + 4 sinks", "original", "sparse", k, "local"),
           R.Row("oracle top-k", "original", "sparse", k, "oracle")]
  return rows


def text_sets(cfg, tok, val: list[str], n_batches: int) -> dict[str, list]:
  """Held-out batches of the validation documents, split into the natural
  prose (natural.jsonl's documents) and the standard-library code."""
  from dsax import data  # pylint: disable=import-outside-toplevel
  natural = set()
  for path in cfg.data.paths:
    with open(path, encoding="utf-8") as f:
      natural.update(json.loads(line)[cfg.data.text_field] for line in f
                     if line.strip())
  prose = [d for d in val if d in natural]
  code = [d for d in val if d not in natural]
  out = {"stdlib": data.heldout_batches(cfg.data, tok, code, n_batches),
         "prose": data.heldout_batches(cfg.data, tok, prose, n_batches)}
  return {k: v for k, v in out.items() if v}


def task_examples(tok, lengths: list[int], depths, passkey_seeds: int,
                  needle_seeds: int, seed: int = 0) -> list:
  """Passkey at each length x depth x seed (its noise filler); the single
  needle in natural (standard-library prose) text at the longest length,
  one per depth x seed."""
  from dsax import tasks  # pylint: disable=import-outside-toplevel
  count = lambda text: len(tok.encode_array(text))
  out = retrieval.build_eval_set(tok, seed, lengths, depths, ("passkey",),
                                 passkey_seeds)
  length = max(lengths)
  for di, depth in enumerate(depths):
    rng = np.random.default_rng([seed, 99, length, di])
    for _ in range(needle_seeds):
      ex = tasks.generate("niah_single", rng, length, count, "natural", depth)
      ex.meta["cell"] = {"task": "niah_single", "length": length,
                         "depth": depth, "haystack": "natural"}
      out.append(ex)
  return out


def evaluate(run_dir: str, quick: bool = False) -> dict[str, Any]:
  """Every row's result plus the settings; resumes from RUN_DIR/page."""
  import tqdm  # pylint: disable=import-outside-toplevel
  from dsax import checkpoint, evals  # pylint: disable=import-outside-toplevel
  from dsax import params as P  # pylint: disable=import-outside-toplevel
  cfg, tok, val = evals.load_run(run_dir)
  T = cfg.data.seq_len
  # quick (the tiny test model, bytes): one length that fits every task.
  lengths = [512] if quick else [T // 2, T]
  depths = (0.0, 1.0) if quick else retrieval.PASSKEY_DEPTHS
  seeds = (1, 1) if quick else (PASSKEY_SEEDS, NEEDLE_SEEDS)
  texts = text_sets(cfg, tok, val, 1 if quick else 2)
  examples = task_examples(tok, lengths, depths, *seeds)
  recall_batches = next(iter(texts.values()))[:1]
  rows = page_rows(cfg)
  abstract = P.abstract_params(cfg.model)
  loaded: dict[str, Any] = {}

  def load(name):
    if name not in loaded:
      loaded.clear()  # one parameter set in memory at a time
      loaded[name] = checkpoint.load_params(
          os.path.join(run_dir, "phases", name), abstract)
    return loaded[name]

  t0 = time.perf_counter()
  bar = tqdm.tqdm(total=R.n_ticks(rows, texts, examples), desc="page eval",
                  unit="fwd", dynamic_ncols=True)
  res = R.evaluate_rows(rows, load, cfg.model, texts, examples, tok,
                        recall_batches, os.path.join(run_dir, "page"), bar)
  bar.close()
  weights = {k: np.concatenate([np.asarray(b["weights"]).reshape(-1)
                                for b in v]) for k, v in texts.items()}
  return {"cfg": cfg, "rows": rows, "results": res, "weights": weights,
          "settings": {"seq_len": T, "topk": cfg.model.indexer.topk,
                       "lengths": lengths, "depths": list(depths),
                       "passkey_seeds": seeds[0], "needle_seeds": seeds[1],
                       "texts": {k: res[rows[0].label]["heldout"][k]["tokens"]
                                 for k in texts},
                       "eval_seconds": time.perf_counter() - t0}}


# ------------------------------------------------------------------ the page


def _cell(hits_n) -> str:
  h, n = hits_n
  lo, hi = R.wilson(h, n)
  return f"{h}/{n} [{lo:.2f}, {hi:.2f}]"


def kl_windows(kl: list[float], n: int = 8) -> list[tuple[int, int, float]]:
  """(first step, last step, mean KL) of ``n`` equal windows of the warm-up
  (the last takes the remainder): a batch-of-one KL is noisy per step, so
  whether it has flattened shows in the window means."""
  size = max(1, len(kl) // n)
  out = []
  for a in range(0, len(kl), size):
    if len(out) == n - 1:
      out.append((a + 1, len(kl), float(np.mean(kl[a:]))))
      break
    out.append((a + 1, min(a + size, len(kl)), float(np.mean(kl[a:a + size]))))
  return out


def _ratios(res: dict, ref: dict, text: str) -> list[float | None]:
  a = res["heldout"][text]["by_position"]["loss"]
  b = ref["heldout"][text]["by_position"]["loss"]
  return [x / y if x is not None and y else None for x, y in zip(a, b)]


def tables(ev: dict) -> list[str]:
  rows, res, s = ev["rows"], ev["results"], ev["settings"]
  ref = res[rows[0].label]
  texts = list(ref["heldout"])
  T = max(s["lengths"])
  pk = [f"passkey@{l}" for l in s["lengths"]]
  head = (["row"] + [f"{t} loss" for t in texts] + ["top-1 agree"]
          + [f"passkey {l}" for l in s["lengths"]]
          + [f"needle (natural) {T}", "recall (mean over layers)"])
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    r = res[row.label]
    agree = [R.agreement(r["top1"][t], ref["top1"][t], ev["weights"][t])
             for t in texts]
    w = [ev["weights"][t].sum() for t in texts]
    cells = [row.label] + [f"{r['heldout'][t]['loss']:.4f}" for t in texts]
    cells.append(f"{np.dot(agree, w) / max(sum(w), 1):.3f}")
    cells += [_cell(R.totals(r["tasks"][p])) if p in r["tasks"] else "-"
              for p in pk]
    nd = f"niah_single/natural@{T}"
    cells.append(_cell(R.totals(r["tasks"][nd])) if nd in r["tasks"] else "-")
    cells.append(f"{np.mean(r['recall']['recall']):.3f}" if "recall" in r
                 else "-")
    out.append("| " + " | ".join(cells) + " |")
  # NLL ratio by position bucket (standard-library text).
  text = texts[0]
  edges = ref["heldout"][text]["by_position"]["edges"]
  buckets = [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])]
  out += ["", f"NLL ratio to the dense original by position bucket "
          f"({text} text; tokens per bucket: "
          + ", ".join(map(str, ref["heldout"][text]["by_position"]["tokens"]))
          + "):", "", "| row | " + " | ".join(buckets) + " |",
          "|" + "---|" * (len(buckets) + 1)]
  for row in rows[1:]:
    rat = _ratios(res[row.label], ref, text)
    out.append(f"| {row.label} | " + " | ".join(
        "-" if x is None else f"{x:.3f}" for x in rat) + " |")
  # Passkey by depth.
  out += ["", "Passkey hits by depth (each cell: hits/n):", "",
          "| row | " + " | ".join(f"{p} d={d:g}" for p in pk
                                  for d in s["depths"]) + " |",
          "|" + "---|" * (len(pk) * len(s["depths"]) + 1)]
  for row in rows:
    t = res[row.label]["tasks"]
    out.append(f"| {row.label} | " + " | ".join(
        "{}/{}".format(*t[p].get(f"{d:g}", [0, 0])) if p in t else "-"
        for p in pk for d in s["depths"]) + " |")
  # Recall by layer.
  rec = [row for row in rows if "recall" in res[row.label]]
  if rec:
    first = res[rec[0].label]["recall"]
    out += ["", f"Attention-mass recall at k = {s['topk']}, mean over layers "
            f"(per layer in the plot): oracle top-k "
            f"{np.mean(first['recall_oracle']):.3f}, local window "
            f"{np.mean(first['recall_local']):.3f}, random "
            f"{np.mean(first['recall_random']):.3f}."]
  return out


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def plots(ev: dict, metrics: list[dict], out_dir: str, stem: str) -> list[str]:
  plt = _plt()
  rows, res = ev["rows"], ev["results"]
  ref = res[rows[0].label]
  paths = []
  # Training curves.
  fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
  by = {}
  for m in sorted(metrics, key=lambda m: m["step"]):
    by.setdefault(m["phase"], []).append(m)
  if "warmup" in by:
    w = [m.get("indexer_kl") for m in by["warmup"]]
    a.plot(range(1, len(w) + 1), w, lw=0.6, alpha=0.5, label="per step")
    a.plot([(x + y) / 2 for x, y, _ in kl_windows(w)],
           [m for _, _, m in kl_windows(w)], "k.-", label="window mean")
    a.legend(fontsize=7)
  a.set(title="warm-up: indexer KL to dense", xlabel="step", ylabel="KL")
  for name, ms in by.items():
    if name != "warmup" and any("lm_loss" in m for m in ms):
      b.plot(range(1, len(ms) + 1), [m.get("lm_loss") for m in ms],
             label=name, marker=".")
  b.set(title="train LM loss (batch of 1)", xlabel="step")
  b.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, f"{stem}_training.png"))
  fig.savefig(paths[-1])
  plt.close(fig)
  # NLL ratio by position.
  text = list(ref["heldout"])[0]
  edges = ref["heldout"][text]["by_position"]["edges"]
  mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
  fig, ax = plt.subplots(figsize=(6, 3.4), dpi=80)
  for row in rows[1:]:
    rat = _ratios(res[row.label], ref, text)
    ax.plot(mids, [np.nan if x is None else x for x in rat], marker=".",
            label=row.label)
  ax.axhline(1.0, color="k", lw=0.5)
  ax.set(xscale="log", xlabel="position", ylabel="NLL / dense original",
         title=f"held-out {text} NLL ratio by position")
  ax.legend(fontsize=6)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, f"{stem}_position.png"))
  fig.savefig(paths[-1])
  plt.close(fig)
  # Recall by layer.
  rec = [row for row in rows if "recall" in res[row.label]]
  if rec:
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=80)
    for row in rec:
      ax.plot(res[row.label]["recall"]["recall"], marker=".", label=row.label)
    first = res[rec[0].label]["recall"]
    for key, style in (("recall_oracle", "k--"), ("recall_local", "k:"),
                       ("recall_random", "k-.")):
      ax.plot(first[key], style, label=key.replace("recall_", ""))
    ax.set(xlabel="layer", ylabel="attention mass kept",
           title=f"indexer recall by layer, k = {ev['settings']['topk']}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{stem}_recall.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
  return paths


def write(ev: dict, metrics: list[dict], out_dir: str, stem: str,
          command: str, notes: str = "") -> str:
  """Writes OUT_DIR/STEM.md (the tables, the plots, the command) and the
  PNGs; the page's text around the tables is ``notes``."""
  os.makedirs(out_dir, exist_ok=True)
  pngs = plots(ev, metrics, out_dir, stem)
  s = ev["settings"]
  kl = [m["indexer_kl"] for m in sorted(metrics, key=lambda m: m["step"])
        if m["phase"] == "warmup" and m.get("indexer_kl") is not None]
  lines = [f"# {ev['cfg'].name}: SmolLM2-135M-Instruct converted to DSA on a "
           "CPU", "", "Reproduce (2 CPU cores, f32; resumable):", "",
           "```bash", command, "```", "",
           f"T = {s['seq_len']}, k = {s['topk']}; phases and steps: "
           + ", ".join(f"{p.name} {p.kind} {p.steps}"
                       for p in ev["cfg"].phases)
           + f". Held-out tokens: " + ", ".join(
               f"{k} {v}" for k, v in s["texts"].items())
           + f"; passkey {s['passkey_seeds']} seeds x "
           f"{len(s['depths'])} depths per length; needle "
           f"{s['needle_seeds']} x {len(s['depths'])}. Intervals: Wilson "
           "95%.", ""]
  if kl:
    win = kl_windows(kl)
    lines += [f"Warm-up KL: {kl[0]:.3f} at step 1, {kl[-1]:.3f} at step "
              f"{len(kl)} (mean of the last 5: {np.mean(kl[-5:]):.3f}). "
              "Mean per window of steps: " + ", ".join(
                  f"{a}-{b} {m:.3f}" for a, b, m in win) + "."]
    if len(win) > 1:
      lines[-1] += (f" The last window is {1 - win[-1][2] / win[-2][2]:.1%} "
                    "below the one before.")
    lines.append("")
  if notes:
    lines += [notes.strip(), ""]
  lines += tables(ev) + [""]
  lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs]
  path = os.path.join(out_dir, stem + ".md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def main(run_dir: str, out_dir: str, stem: str, command: str,
         quick: bool = False) -> str:
  from dsax import metrics  # pylint: disable=import-outside-toplevel
  ev = evaluate(run_dir, quick)
  notes_path = os.path.join(out_dir, stem + ".notes.md")
  notes = ""
  if os.path.isfile(notes_path):
    with open(notes_path, encoding="utf-8") as f:
      notes = f.read()
  path = write(ev, metrics.read_metrics(run_dir), out_dir, stem, command,
               notes)
  print(f"wrote {path}", file=sys.stderr)
  return path
