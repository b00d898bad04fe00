"""Eval outputs: results.json (every number), report.md (tables), PNG plots.

``results`` (as ``dsax.evals.run_eval`` builds it):
  {"run": name, "settings": {...},
   "modes": {label: {"phase", "attention", "topk", "selection",
                     "retrieval": retrieval.accuracy_tables(...),
                     "greedy": {"method", "n", "score"},
                     "loss_by_position": position.loss_by_position(...),
                     "loss_vs_length": {length: loss}}},
   "recall": {label: position.recall_by_layer(...)},
   "heldout": {"rows": {model: comparison row}, "summary": {key: value}}}
Every part is optional. Plots (matplotlib, Agg):
  loss_by_position.png   NLL per position bucket, one line per mode
  loss_vs_length.png     mean held-out NLL against evaluation length
  retrieval_passkey.png  passkey accuracy, lengths x depths, one panel per mode
  retrieval_tasks.png    accuracy per task and length, one panel per mode
  recall_by_layer.png    selected / oracle / local / random recall per layer
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def _mean_acc(table: dict[str, dict[str, float]]) -> float | None:
  vals = [v for row in table.values() for v in row.values()]
  return float(np.mean(vals)) if vals else None


def summary_rows(results: dict) -> dict[str, dict[str, Any]]:
  """One row per mode: heldout loss, passkey / task accuracy, greedy, recall."""
  rows = {}
  for label, m in results.get("modes", {}).items():
    ret = m.get("retrieval", {})
    tasks_acc = {t: v for t, v in ret.get("tasks", {}).items()
                 if t != "passkey"}
    rec = results.get("recall", {}).get(label)
    rows[label] = {
        "loss": m.get("loss_by_position", {}).get("mean"),
        "passkey_acc": _mean_acc(ret.get("passkey", {})),
        "tasks_acc": _mean_acc(tasks_acc),
        "greedy_score": m.get("greedy", {}).get("score"),
        "recall": float(np.mean(rec["recall"])) if rec else None,
    }
  return rows


def markdown(results: dict) -> str:
  lines = [f"# Eval: {results.get('run', '?')}", ""]
  settings = results.get("settings")
  if settings:
    lines += ["Settings: `" + json.dumps(settings, sort_keys=True) + "`", ""]
  held = results.get("heldout", {}).get("rows")
  if held:
    from dsax.evals import comparison  # pylint: disable=import-outside-toplevel
    lines += ["## Held-out comparison", "",
              "Same held-out batches for every model; the sparse model with "
              "its top-k attention, the others dense.", ""]
    lines += comparison.markdown_table(held) + [""]
  rows = summary_rows(results)
  cols = ("loss", "passkey_acc", "tasks_acc", "greedy_score", "recall")
  if rows:
    lines += ["## Summary", "", "| mode | " + " | ".join(cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(_fmt(r[c]) for c in cols) + " |"
              for k, r in rows.items()]
    lines.append("")
  for label, m in results.get("modes", {}).items():
    ret = m.get("retrieval")
    if ret and ret.get("passkey"):
      depths = sorted({d for row in ret["passkey"].values() for d in row},
                      key=float)
      lines += [f"## Passkey accuracy: {label}", "",
                "| length | " + " | ".join(f"depth {d}" for d in depths)
                + " |", "|---" * (len(depths) + 1) + "|"]
      for length, row in ret["passkey"].items():
        lines.append(f"| {length} | " + " | ".join(_fmt(row.get(d))
                                                   for d in depths) + " |")
      lines.append("")
    if ret and ret.get("tasks"):
      lengths = sorted({l for row in ret["tasks"].values() for l in row},
                       key=int)
      lines += [f"## Task accuracy (teacher-forced exact match): {label}", "",
                "| task | " + " | ".join(lengths) + " |",
                "|---" * (len(lengths) + 1) + "|"]
      for task, row in ret["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(_fmt(row.get(l))
                                                 for l in lengths) + " |")
      lines.append("")
  lbp = {k: m["loss_by_position"] for k, m in results.get("modes", {}).items()
         if "loss_by_position" in m}
  if lbp:
    edges = next(iter(lbp.values()))["edges"]
    heads = [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])]
    lines += ["## Loss by position", "", "| mode | " + " | ".join(heads)
              + " |", "|---" * (len(heads) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(_fmt(x) for x in v["loss"]) + " |"
              for k, v in lbp.items()]
    lines.append("")
  lvl = {k: m["loss_vs_length"] for k, m in results.get("modes", {}).items()
         if m.get("loss_vs_length")}
  if lvl:
    lengths = sorted({l for v in lvl.values() for l in v}, key=int)
    lines += ["## Loss against evaluation length", "",
              "| mode | " + " | ".join(lengths) + " |",
              "|---" * (len(lengths) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(_fmt(v.get(l)) for l in lengths) + " |"
              for k, v in lvl.items()]
    lines.append("")
  if results.get("recall"):
    lines += ["Recall: share of the head-summed dense attention mass (queries "
              "that see more than k keys) in the indexer's top-k (selected), "
              "the k largest (oracle), the k most recent keys (local) and k "
              "uniformly random visible keys (random: its expectation k/n_t).",
              ""]
  for label, rec in results.get("recall", {}).items():
    keys = ("recall", "recall_oracle", "recall_local", "recall_random")
    lines += [f"## Indexer recall by layer: {label}", "",
              "| layer | selected | oracle | local | random |",
              "|---|---|---|---|---|"]
    for i in range(len(rec["recall"])):
      lines.append(f"| {i} | " + " | ".join(_fmt(rec[k][i]) for k in keys)
                   + " |")
    lines.append("")
  return "\n".join(lines)


# ------------------------------------------------------------------ plots


def _lines(series: dict[str, tuple[list, list]], path: str, xlabel: str,
           ylabel: str, title: str) -> None:
  """One marked line per label over a log2 x axis."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, (x, y) in series.items():
    ax.plot(x, y, marker="o", label=label)
  ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_loss_by_position(modes: dict, path: str) -> None:
  series = {}
  for label, m in modes.items():
    lbp = m["loss_by_position"]
    e = lbp["edges"]
    series[label] = ([max(a, 1) * 0.5 + b * 0.5 for a, b in zip(e[:-1], e[1:])],
                     [np.nan if v is None else v for v in lbp["loss"]])
  _lines(series, path, "position in document (bucket centre, tokens)",
         "next-token NLL (nats)", "Held-out loss by position")


def plot_loss_vs_length(modes: dict, path: str) -> None:
  series = {}
  for label, m in modes.items():
    lengths = sorted(m["loss_vs_length"], key=int)
    series[label] = ([int(l) for l in lengths],
                     [m["loss_vs_length"][l] for l in lengths])
  _lines(series, path, "evaluation sequence length (tokens)",
         "mean next-token NLL (nats)",
         "Held-out loss against evaluation length")


def _heatmaps(panels: dict[str, tuple[list, list, np.ndarray]], path: str,
              title: str, xlabel: str, ylabel: str) -> None:
  plt = _plt()
  n = len(panels)
  fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1.5, 3.8), squeeze=False,
                           layout="constrained")
  im = None
  for i_ax, (ax, (label, (rows, cols, acc))) in enumerate(
      zip(axes[0], panels.items())):
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                   origin="lower")
    ax.set_xticks(range(len(cols)), cols, rotation=45, fontsize=7)
    ax.set_yticks(range(len(rows)), rows if i_ax == 0 else [], fontsize=7)
    ax.set_xlabel(xlabel)
    if i_ax == 0:
      ax.set_ylabel(ylabel)
    ax.set_title(label, fontsize=9)
    for i in range(acc.shape[0]):
      for j in range(acc.shape[1]):
        if not np.isnan(acc[i, j]):
          ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center",
                  fontsize=7, color="w" if acc[i, j] < 0.5 else "k")
  fig.colorbar(im, ax=list(axes[0]), label="accuracy")
  fig.suptitle(title)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_passkey(modes: dict, path: str) -> None:
  panels = {}
  for label, m in modes.items():
    pk = m["retrieval"]["passkey"]
    lengths = sorted(pk, key=int)
    depths = sorted({d for row in pk.values() for d in row}, key=float)
    acc = np.array([[pk[l].get(d, np.nan) for d in depths] for l in lengths],
                   float)
    panels[label] = (lengths, depths, acc)
  _heatmaps(panels, path, "Passkey accuracy (teacher-forced; white: not "
            "run)", "needle depth",
            "length (tokens)")


def plot_tasks(modes: dict, path: str) -> None:
  panels = {}
  for label, m in modes.items():
    tk = m["retrieval"]["tasks"]
    names = list(tk)
    lengths = sorted({l for row in tk.values() for l in row}, key=int)
    acc = np.array([[tk[t].get(l, np.nan) for l in lengths] for t in names],
                   float)
    panels[label] = (names, lengths, acc)
  _heatmaps(panels, path, "Task accuracy per length (teacher-forced; white: "
            "length below the task's shortest example)",
            "length (tokens)", "task")


def plot_recall(recall: dict, path: str) -> None:
  plt = _plt()
  n = len(recall)
  ncol = min(n, 3)
  nrow = -(-n // ncol)
  fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.4 * nrow),
                           squeeze=False)
  top = max(max(max(v) for v in rec.values()) for rec in recall.values())
  for ax in axes.flat[n:]:
    ax.axis("off")
  names = {"recall": "selected (indexer top-k)", "recall_oracle": "oracle top-k",
           "recall_local": "local window", "recall_random": "random k keys"}
  for ax, (label, rec) in zip(axes.flat, recall.items()):
    layers = np.arange(len(rec["recall"]))
    for key, name in names.items():
      ax.plot(layers, rec[key], marker="o", label=name)
    ax.set_xticks(layers)
    ax.set_ylim(0, min(1.05, 1.15 * top))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of dense attention mass")
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle("Indexer recall by layer")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(outdir: str, results: dict) -> list[str]:
  """Writes results.json, report.md and the plots; returns the paths."""
  os.makedirs(outdir, exist_ok=True)
  paths = [os.path.join(outdir, "results.json"),
           os.path.join(outdir, "report.md")]
  with open(paths[0], "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)  # keep the modes in evaluation order
    f.write("\n")
  with open(paths[1], "w", encoding="utf-8") as f:
    f.write(markdown(results) + "\n")
  modes = results.get("modes", {})
  plots = [
      ("loss_by_position.png", plot_loss_by_position, "loss_by_position"),
      ("loss_vs_length.png", plot_loss_vs_length, "loss_vs_length"),
  ]
  for name, fn, key in plots:
    sel = {k: m for k, m in modes.items() if m.get(key)}
    if sel:
      paths.append(os.path.join(outdir, name))
      fn(sel, paths[-1])
  sel = {k: m for k, m in modes.items()
         if m.get("retrieval", {}).get("passkey")}
  if sel:
    paths.append(os.path.join(outdir, "retrieval_passkey.png"))
    plot_passkey(sel, paths[-1])
  sel = {k: m for k, m in modes.items() if m.get("retrieval", {}).get("tasks")}
  if sel:
    paths.append(os.path.join(outdir, "retrieval_tasks.png"))
    plot_tasks(sel, paths[-1])
  if results.get("recall"):
    paths.append(os.path.join(outdir, "recall_by_layer.png"))
    plot_recall(results["recall"], paths[-1])
  return paths


# ---------------------------------------------------------------- compare


def compare(run_dirs: Sequence[str], outdir: str) -> tuple[str, list[str]]:
  """Merges RUN_DIR/eval/results.json of several runs: one table (markdown,
  also printed by the caller) and one loss-by-position plot. Returns the
  table and the written paths."""
  merged: dict[str, dict] = {}
  modes: dict[str, dict] = {}
  for d in run_dirs:
    path = os.path.join(d, "eval", "results.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no eval results at {path}: run "
                              f"`launch.py eval {d}` first")
    with open(path, encoding="utf-8") as f:
      res = json.load(f)
    name = res.get("run") or os.path.basename(os.path.normpath(d))
    if any(k.startswith(name + " / ") for k in merged):
      name = os.path.normpath(d)
    for label, row in summary_rows(res).items():
      merged[f"{name} / {label}"] = row
    for label, m in res.get("modes", {}).items():
      if m.get("loss_by_position"):
        modes[f"{name} / {label}"] = m
  cols = ("loss", "passkey_acc", "tasks_acc", "greedy_score", "recall")
  lines = ["| run / mode | " + " | ".join(cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
  lines += [f"| {k} | " + " | ".join(_fmt(r[c]) for c in cols) + " |"
            for k, r in merged.items()]
  table = "\n".join(lines)
  os.makedirs(outdir, exist_ok=True)
  paths = [os.path.join(outdir, "compare.md"),
           os.path.join(outdir, "compare.json")]
  with open(paths[0], "w", encoding="utf-8") as f:
    f.write(table + "\n")
  with open(paths[1], "w", encoding="utf-8") as f:
    json.dump(merged, f, indent=2, sort_keys=True)
    f.write("\n")
  if modes:
    paths.append(os.path.join(outdir, "compare_loss_by_position.png"))
    plot_loss_by_position(modes, paths[-1])
  return table, paths
