#!/usr/bin/env python
"""dsax launcher: run a config or a sweep (eval, compare, prepare: later).

  python launch.py tiny_run --dry-run
  python launch.py tiny_run --set phases.sparse.steps=5 --workdir /tmp/run
  python launch.py --sweep experiments/sweep_topk.py --dry-run

A config is ``configs/NAME.py`` (``NAME:ARG`` passes ARG to its get_config);
``--set`` overrides are dotted and strict (dsax.config.override). A bad config
prints ``error: <message>`` and exits with code 2 before any compute. This file
imports jax only when a run needs it (through dsax.train).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))

SUBCOMMANDS = {
    "eval": ("RUN_DIR [options]", "evaluate a run's checkpoints "
             "(held-out loss, retrieval tasks, recall)"),
    "compare": ("RUN_DIR [RUN_DIR ...]", "compare the summaries and curves "
                "of finished runs"),
    "prepare": ("[options]", "prepare data: tokenizer and packed shards"),
}

USAGE = """\
launch.py CONFIG[:ARG] [--set KEY=VALUE ...] [--workdir DIR] [--dry-run]
       launch.py --sweep FILE [--set KEY=VALUE ...] [--workdir ROOT] [--dry-run]
       launch.py {eval,compare,prepare} ...   (not implemented yet)"""


def _epilog() -> str:
  lines = ["commands (the first argument; anything else is a config name):"]
  for name, (_, text) in SUBCOMMANDS.items():
    lines.append(f"  {name:9s}{text} (not implemented yet)")
  try:
    from dsax import sweep
    names = ", ".join(sweep.available_configs(ROOT)) or "none"
  except Exception:  # pylint: disable=broad-except
    names = "(configs/ unreadable)"
  lines += ["", f"configs: {names}",
            "sweep files: experiments/*.py (CONFIG, GRID or ZIP, BASE; see "
            "src/dsax/sweep.py)"]
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="launch.py", usage=USAGE, epilog=_epilog(),
      description="Run a named config or a sweep of it.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", nargs="?", metavar="CONFIG[:ARG]",
                 help="configs/CONFIG.py; ARG goes to its get_config(arg)")
  p.add_argument("--sweep", metavar="FILE",
                 help="a sweep file (experiments/X.py); runs go to "
                 "ROOT/<file stem>/<run name>")
  p.add_argument("--set", dest="overrides", action="append", default=[],
                 metavar="KEY=VALUE",
                 help="dotted override, repeatable: --set "
                 "model.indexer.topk=32 --set phases.sparse.lr=1e-4")
  p.add_argument("--workdir", metavar="DIR",
                 help="run directory (default: the config's workdir, else "
                 "work/<name>); with --sweep, the root (default: work)")
  p.add_argument("--dry-run", action="store_true",
                 help="print the resolved config(s) as JSON; run nothing")
  return p


def build_subparser(name: str) -> argparse.ArgumentParser:
  args, text = SUBCOMMANDS[name]
  p = argparse.ArgumentParser(
      prog=f"launch.py {name}", usage=f"launch.py {name} {args}",
      description=f"{text}. Not implemented yet.")
  p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
  return p


# ------------------------------------------------------------------ helpers


def _error(message: str, code: int = 2) -> int:
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  return code


def _info(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _train(required: bool):
  """dsax.train, or None while it does not exist (then checks are skipped)."""
  try:
    from dsax import train  # imports jax
  except ModuleNotFoundError as e:
    if e.name != "dsax.train" or required:
      raise
    return None
  return train


def _preflight(cfg, train, label: str = "") -> None:
  if train is None or not hasattr(train, "preflight"):
    _info("warning: dsax.train.preflight is not available; model checks "
          "(trainable regexes, checkpoints) skipped")
    return
  from dsax.config import ConfigError
  try:
    train.preflight(cfg)
  except ConfigError as e:
    raise ConfigError(f"{label}: {e}" if label else str(e)) from None


def _parse_sets(items: list[str]) -> dict[str, str]:
  from dsax.config import ConfigError
  pairs = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
      raise ConfigError(f"--set {item!r} must look like key=value")
    pairs[key.strip()] = value
  return pairs


def _resolve(spec: str, overrides: dict, workdir: str | None):
  """Loads, overrides strictly, validates; fixes the run directory."""
  import dataclasses
  from dsax import config as C
  from dsax import sweep
  cfg = C.override(sweep.load_config(spec, ROOT), overrides)
  workdir = workdir or cfg.workdir or os.path.join("work", cfg.name)
  return dataclasses.replace(cfg, workdir=workdir)


def _read_summary(workdir: str, result) -> dict:
  path = os.path.join(workdir, "summary.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  return dict(result) if isinstance(result, dict) else {}


# --------------------------------------------------------------------- modes


def run_one(args) -> int:
  from dsax import config as C
  cfg = _resolve(args.config, _parse_sets(args.overrides), args.workdir)
  train = _train(required=not args.dry_run)
  _preflight(cfg, train)
  if args.dry_run:
    print(C.dumps(cfg))
    _info(f"run directory (dry run, nothing written): {cfg.workdir}")
    return 0
  _info(f"run directory: {os.path.abspath(cfg.workdir)}")
  result = train.run(cfg, cfg.workdir)
  print(json.dumps(_read_summary(cfg.workdir, result), indent=2))
  print(f"run directory: {os.path.abspath(cfg.workdir)}")
  return 0


def run_sweep(args) -> int:
  from dsax import config as C
  from dsax import sweep as S
  if args.config:
    raise C.ConfigError(f"give a config ({args.config!r}) or --sweep, "
                        "not both: the sweep file names its CONFIG")
  sw = S.load_sweep(args.sweep)
  sets = _parse_sets(args.overrides)
  clash = sorted(set(sets) & set(sw.swept))
  if clash:
    raise C.ConfigError(f"--set {clash} would override keys the sweep "
                        f"{sw.path} varies")
  root = os.path.join(args.workdir or "work", sw.stem)
  runs = []
  for name, overrides in sw.runs:
    try:
      cfg = _resolve(sw.config, {**overrides, **sets},
                     os.path.join(root, name))
    except C.ConfigError as e:
      raise C.ConfigError(f"{name}: {e}") from None
    runs.append((name, overrides, cfg))
  train = _train(required=not args.dry_run)
  for name, _, cfg in runs:
    _preflight(cfg, train, name)
  if args.dry_run:
    print(json.dumps([{"name": n, "workdir": c.workdir, "overrides": o,
                       "config": C.to_dict(c)} for n, o, c in runs],
                     indent=2))
    _info(f"{len(runs)} runs of {sw.config} under {root} (dry run)")
    return 0
  rows, failed = [], []
  for i, (name, _, cfg) in enumerate(runs):
    _info(f"[{i + 1}/{len(runs)}] {name}: {os.path.abspath(cfg.workdir)}")
    try:
      result = train.run(cfg, cfg.workdir)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      _info(f"[{i + 1}/{len(runs)}] {name} FAILED: {type(e).__name__}: {e}")
      failed.append(name)
      rows.append({"run": name, "status": "failed"})
      continue
    rows.append({"run": name, "status": "ok",
                 **_read_summary(cfg.workdir, result)})
  keys = ["status", *sw.summary_keys] if sw.summary_keys else None
  table = S.summary_table(rows, keys)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "summary.txt"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  print(table)
  print(f"sweep directory: {os.path.abspath(root)}")
  if failed:
    _info(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}")
    return 1
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in SUBCOMMANDS:
    build_subparser(argv[0]).parse_args(argv[1:])
    return _error(f"launch.py {argv[0]} is not implemented yet")
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.config in SUBCOMMANDS:
    parser.error(f"the command {args.config!r} must be the first argument")
  if not args.config and not args.sweep:
    parser.error("give a CONFIG[:ARG] or --sweep FILE")
  from dsax.config import ConfigError
  try:
    return run_sweep(args) if args.sweep else run_one(args)
  except ConfigError as e:
    return _error(e)


if __name__ == "__main__":
  sys.exit(main())
