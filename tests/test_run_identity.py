"""A run's identity (issue 17, part A): validation before anything is written,
the comparison with the run directory's config, the config history,
--force-new, the work-directory lock and launch.py's exit codes.

Each test starts from a command of the issue, at tiny sizes. Run directories
are made by hand (config.json, empty ckpt/<step>/ and phases/<name>/ folders
stand for what a run leaves) and launch.py runs with a fake dsax.train, so
nothing trains except in the two tests marked slow.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

import dsax
from dsax import config as C
from dsax import run_identity as R
from dsax import train as real_train
from dsax.run_lock import LockHeld, RunLock

import launch  # noqa: E402  (conftest puts the repo root on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.py")

# The issue's $A, scaled down: pretrain 6, warm-up 2, sparse 2, dense 2 steps.
A = ["--set", "phases.pretrain.steps=6", "--set", "phases.warmup.steps=2",
     "--set", "phases.sparse.steps=2", "--set", "phases.dense.steps=2",
     "--set", "save_every=2", "--set", "log_every=1"]


def sets(*items):
  return [x for item in items for x in ("--set", item)]


def made_run(tmp_path, extra=(), steps=(), done=(), name="w"):
  """A run directory as a tiny_run launched with $A + ``extra`` leaves it:
  config.json, ckpt/<global step>/ for ``steps``, phases/<name>/ for
  ``done``."""
  d = str(tmp_path / name)
  cfg = launch._resolve("tiny_run", launch._parse_sets(
      [a for a in A + list(extra) if a != "--set"]), d)
  R.record(cfg, d, "new")
  for s in steps:
    os.makedirs(os.path.join(d, "ckpt", str(s)))
  for n in done:
    os.makedirs(os.path.join(d, "phases", n))
  return d


def config_text(d):
  with open(os.path.join(d, "config.json")) as f:
    return f.read()


@pytest.fixture
def fake_train(monkeypatch):
  """dsax.train with run() doing what ``behaviour[0]`` says (a callable or
  an exception to raise); the real preflight and parameter names."""
  calls, behaviour = [], [None]
  fake = types.ModuleType("dsax.train")

  class Interrupted(RuntimeError):
    pass

  class NonFiniteLoss(RuntimeError):
    pass

  def run(cfg, workdir):
    calls.append((cfg, workdir))
    what = behaviour[0]
    if isinstance(what, BaseException):
      raise what
    if callable(what):
      what(cfg, workdir)
    return {"done": True}

  fake.run, fake.preflight = run, real_train.preflight
  fake.param_paths = real_train.param_paths
  fake.Interrupted, fake.NonFiniteLoss = Interrupted, NonFiniteLoss
  fake.calls, fake.behaviour = calls, behaviour
  monkeypatch.setitem(sys.modules, "dsax.train", fake)
  monkeypatch.setattr(dsax, "train", fake, raising=False)
  return fake


def lines(err):
  return [line for line in err.strip().splitlines() if line.strip()]


# ---------------------------------------------- item 7: impossible values


@pytest.mark.parametrize("setting,named", [
    ("phases.sparse.topk=-1", "phases.sparse.topk"),
    ("log_every=0", "log_every"),
    ("phases.sparse.optim.lr=nan", "phases.sparse.optim.lr"),
    ("phases.pretrain.optim.lr=inf", "phases.pretrain.optim.lr"),
    ("phases.sparse.loss.lm_weight=nan", "phases.sparse.loss.lm_weight"),
    ("save_every=-1", "save_every"),
    ("keep_checkpoints=-1", "keep_checkpoints"),
    ("keep_checkpoints=0", "keep_checkpoints"),
    ("phases.sparse.optim.grad_clip=-1", "phases.sparse.optim.grad_clip"),
    ("phases.sparse.optim.b1=2", "phases.sparse.optim.b1"),
    ("mesh.data=0", "mesh.data"),
    ("data.val_fraction=0", "data.val_fraction"),
    ("phases.warmup.indexer_trainable=", "phases.warmup.indexer_trainable"),
    ("phases.warmup.indexer_trainable=^layers/", "non-indexer"),
    ("data.source=nowhere", "data.source"),
    ("data.source=files", "data.paths"),
    ("model.rope_theta=nan", "model.rope_theta"),
])
def test_impossible_values_stop_the_dry_run(setting, named, tmp_path, capsys):
  d = str(tmp_path / "w")
  assert launch.main(["tiny_run", *sets(setting), "--workdir", d,
                      "--dry-run"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and len(lines(err)) == 1, err
  assert lines(err)[0].startswith("error: ") and named in err
  assert not os.path.exists(d)


# ------------------------- items 2 and 7: data and paths before any write


def test_data_errors_stop_the_dry_run(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": oops}\n')
  one = tmp_path / "one.txt"
  one.write_text("a single document")
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  cases = [("/nonexistent.txt", "/nonexistent.txt"),
           (str(bad), f"{bad}:2"), (str(one), "at least 2"),
           (str(empty), "no non-empty documents")]
  for path, named in cases:
    code = launch.main(["tiny_run", *sets("data.source=files",
                                          f"data.paths={path}"),
                        "--workdir", str(tmp_path / "w"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert len(lines(err)) == 1 and named in err, err


def test_a_failed_launch_leaves_a_finished_run_as_it_was(tmp_path, fake_train,
                                                         capsys):
  """Issue item 2: `--set data.source=files --set data.paths=/nonexistent.txt`
  on a finished run rewrote its config.json."""
  d = made_run(tmp_path, steps=(12,), done=("pretrain", "warmup", "sparse",
                                            "dense"))
  before = config_text(d)
  code = launch.main(["tiny_run", *A, *sets("data.source=files",
                                            "data.paths=/nonexistent.txt"),
                      "--workdir", d])
  assert code == 4 and "/nonexistent.txt" in capsys.readouterr().err
  assert config_text(d) == before and not fake_train.calls
  assert len(R.read_history(d)) == 1


@pytest.mark.parametrize("how", ["file", "unwritable"])
def test_unusable_work_directory_exits_6(how, tmp_path, monkeypatch, capsys):
  d = tmp_path / "w"
  if how == "file":
    d.write_text("not a directory")
  else:
    def refuse(*a, **k):
      raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(R.tempfile, "mkstemp", refuse)
  assert launch.main(["tiny_run", "--workdir", str(d), "--dry-run"]) == 6
  err = capsys.readouterr().err
  assert len(lines(err)) == 1 and str(d) in err, err


# ----------------------------------------- item 1: resume against a config


def test_resume_with_a_renamed_phase_is_refused(tmp_path, fake_train, capsys):
  """Issue item 1: SIGTERM mid-pretrain, then `--set phases.pretrain.name=pre
  --set phases.dense.init_from=pre` trained `pre` from scratch and deleted
  checkpoints."""
  d = made_run(tmp_path, steps=(2, 4))
  before = config_text(d)
  code = launch.main(["tiny_run", *A, *sets("phases.pretrain.name=pre",
                                            "phases.dense.init_from=pre"),
                      "--workdir", d])
  err = capsys.readouterr().err
  assert code == 2 and not fake_train.calls
  assert len(lines(err)) == 2, err
  assert "phases.pretrain.name ('pretrain' -> 'pre')" in err
  assert "phase pretrain at step 4" in err and "--force-new" in err
  assert "phases.dense.init_from" not in err  # a future phase may change
  assert config_text(d) == before
  assert sorted(os.listdir(os.path.join(d, "ckpt"))) == ["2", "4"]


@pytest.mark.parametrize("change,key", [
    ("phases.pretrain.optim.lr=1e-4", "phases.pretrain.optim.lr"),
    ("phases.pretrain.steps=3", "phases.pretrain.steps"),
    ("phases.pretrain.trainable=^layers/", "phases.pretrain.trainable"),
    ("model.d_model=96", "model.d_model"),
    ("data.seq_len=96", "data.seq_len"),
    ("data.max_docs=30", "data.max_docs"),
    ("seed=1", "seed"),
])
def test_changes_to_steps_already_taken_are_refused(change, key, tmp_path,
                                                    capsys):
  d = made_run(tmp_path, steps=(4,))
  assert launch.main(["tiny_run", *A, *sets(change), "--workdir", d,
                      "--dry-run"]) == 2
  err = capsys.readouterr().err
  assert f"{key} (" in err and "error: " in err


def test_a_finished_phase_cannot_change(tmp_path, capsys):
  d = made_run(tmp_path, steps=(6, 8), done=("pretrain",))
  for change in ("phases.pretrain.steps=10", "phases.warmup.optim.lr=1e-4"):
    assert launch.main(["tiny_run", *A, *sets(change), "--workdir", d,
                        "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert change.split("=")[0] + " (" in err and "is finished" in err


def test_future_changes_are_allowed_logged_and_recorded(tmp_path, fake_train,
                                                        capsys):
  d = made_run(tmp_path, steps=(2, 4))
  future = sets("phases.pretrain.steps=9", "phases.sparse.optim.lr=1e-4",
                "phases.dense.steps=5", "log_every=2", "eval.every=3",
                "save_every=3", "model.kernel_impl=auto")
  assert launch.main(["tiny_run", *A, *future, "--workdir", d]) == 0
  err = capsys.readouterr().err
  assert "config changes for the future" in err
  assert "phases.pretrain.steps (6 -> 9)" in err
  (cfg, _), = fake_train.calls
  assert cfg.phases[0].steps == 9
  saved = json.loads(config_text(d))
  assert saved["phases"][0]["steps"] == 9 and saved["log_every"] == 2
  new, resume = R.read_history(d)
  assert new["event"] == "new" and resume["event"] == "resume"
  assert resume["step"] == 4 and resume["changes"]["log_every"] == [1, 2]
  assert resume["changes"]["phases.sparse.optim.lr"] == [1e-3, 1e-4]
  assert resume["config"] == saved


def test_current_phase_may_shrink_to_the_step_reached(tmp_path, capsys):
  d = made_run(tmp_path, steps=(4,))
  assert launch.main(["tiny_run", *A, *sets("phases.pretrain.steps=4"),
                      "--workdir", d, "--dry-run"]) == 0
  assert "phases.pretrain.steps (6 -> 4)" in capsys.readouterr().err
  assert launch.main(["tiny_run", *A, *sets("phases.pretrain.steps=3"),
                      "--workdir", d, "--dry-run"]) == 2
  assert "the run reached step 4" in capsys.readouterr().err


def test_before_any_checkpoint_everything_may_change(tmp_path, capsys):
  d = made_run(tmp_path)
  assert launch.main(["tiny_run", *A, *sets("model.d_model=96"),
                      "--workdir", d, "--dry-run"]) == 0
  assert "before any step was kept" in capsys.readouterr().err


def test_checkpoints_without_a_config_or_an_unreadable_one(tmp_path, capsys):
  d = tmp_path / "w"
  os.makedirs(d / "ckpt" / "5")
  assert launch.main(["tiny_run", "--workdir", str(d), "--dry-run"]) == 2
  assert "no config.json" in capsys.readouterr().err
  (d / "config.json").write_text("{truncated")
  assert launch.main(["tiny_run", "--workdir", str(d), "--dry-run"]) == 2
  assert "cannot be read" in capsys.readouterr().err


def test_force_new_moves_the_old_run_aside(tmp_path, fake_train, capsys):
  d = made_run(tmp_path, steps=(2, 4), done=())
  with open(os.path.join(d, "notes.txt"), "w") as f:
    f.write("mine")
  os.makedirs(os.path.join(d, "cache", "jax"))
  changed = sets("phases.pretrain.name=pre", "phases.dense.init_from=pre")
  assert launch.main(["tiny_run", *A, *changed, "--workdir", d,
                      "--force-new", "--dry-run"]) == 0
  assert os.path.isdir(os.path.join(d, "ckpt", "4"))  # a dry run moves nothing
  capsys.readouterr()
  assert launch.main(["tiny_run", *A, *changed, "--workdir", d,
                      "--force-new"]) == 0
  err = capsys.readouterr().err
  old, = os.listdir(os.path.join(d, "superseded"))
  old = os.path.join(d, "superseded", old)
  assert old in err and "notes.txt" in err
  assert sorted(os.listdir(os.path.join(old, "ckpt"))) == ["2", "4"]
  assert json.load(open(os.path.join(old, "config.json")))["phases"][0][
      "name"] == "pretrain"
  assert sorted(os.listdir(d)) == ["cache", "config.json",
                                   "config_history.jsonl", "notes.txt",
                                   "superseded"]
  assert json.loads(config_text(d))["phases"][0]["name"] == "pre"
  assert [h["event"] for h in R.read_history(d)] == ["force_new"]
  assert len(fake_train.calls) == 1


# ------------------------------------------------- item 3: the lock


def test_a_second_launch_on_the_same_directory_is_refused(tmp_path, fake_train,
                                                          capsys):
  """Issue item 3: two launches 20 s apart both ran, metrics interleaved."""
  d = str(tmp_path / "w")
  started, finish = threading.Event(), threading.Event()
  fake_train.behaviour[0] = lambda cfg, wd: (started.set(), finish.wait(30))
  codes = []
  first = threading.Thread(target=lambda: codes.append(
      launch.main(["tiny_run", *A, "--workdir", d])))
  first.start()
  try:
    assert started.wait(60)
    assert launch.main(["tiny_run", *A, "--workdir", d]) == 5
  finally:
    finish.set()
    first.join()
  assert codes == [0] and len(fake_train.calls) == 1
  err = capsys.readouterr().err
  held = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(held) == 1, err
  assert f"pid {os.getpid()} on host {socket.gethostname()}" in held[0]
  assert not os.path.exists(os.path.join(d, "run.lock"))  # released


def test_lock_held_by_another_process_then_stale(tmp_path, fake_train, capsys):
  d = str(tmp_path / "w")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\n"
       "from dsax.run_lock import RunLock\n"
       "RunLock(sys.argv[1]).acquire(); print('held', flush=True)\n"
       "time.sleep(120)\n", d], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert launch.main(["tiny_run", *A, "--workdir", d]) == 5
    err = capsys.readouterr().err
    assert f"pid {holder.pid} on host {socket.gethostname()}" in err
    assert not fake_train.calls
  finally:
    holder.send_signal(signal.SIGKILL)  # dies holding it: a stale lock
    holder.wait()
  assert launch.main(["tiny_run", *A, "--workdir", d]) == 0
  err = capsys.readouterr().err
  assert f"took over the stale lock of pid {holder.pid}" in err
  assert len(fake_train.calls) == 1


def test_run_lock_records_and_staleness(tmp_path):
  d = str(tmp_path / "w")
  with RunLock(d) as lock:
    record = json.load(open(lock.path))
    assert record["pid"] == os.getpid()
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
      RunLock(d).acquire()
  assert not os.path.exists(os.path.join(d, "run.lock"))
  # A record from another host: live while its heartbeat is fresh.
  path = os.path.join(d, "run.lock")
  with open(path, "w") as f:
    json.dump({"pid": 1, "host": "elsewhere", "started": time.time()}, f)
  with pytest.raises(LockHeld, match="host elsewhere"):
    RunLock(d).acquire()
  old = time.time() - 3600
  os.utime(path, (old, old))
  lock = RunLock(d)
  assert "stale lock of pid 1 on host elsewhere" in lock.acquire()
  lock.release()


# ------------------------------------------ item 4: expected stops, codes


@pytest.mark.parametrize("name,code,head", [
    ("Interrupted", 0, "stopped: "), ("NonFiniteLoss", 3, "error: "),
    ("KeyboardInterrupt", 7, "stopped: "), ("DataError", 4, "error: "),
    ("OSError", 6, "error: ")])
def test_expected_stops_print_two_lines_at_most(name, code, head, tmp_path,
                                                fake_train, capsys):
  cls = {"KeyboardInterrupt": KeyboardInterrupt, "DataError": C.DataError,
         "OSError": OSError}.get(name) or getattr(fake_train, name)
  fake_train.behaviour[0] = cls(f"the {name} message")
  d = str(tmp_path / "w")
  assert launch.main(["tiny_run", *A, "--workdir", d]) == code
  err = lines(capsys.readouterr().err)
  stop = [i for i, line in enumerate(err) if line.startswith(head)]
  assert stop and len(err) - stop[0] <= 2, err
  assert "Traceback" not in "\n".join(err)
  assert not os.path.exists(os.path.join(d, "run.lock"))
  assert launch.main(["tiny_run", *A, "--workdir", d, "--debug"]) == code
  assert "Traceback" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(tmp_path, fake_train):
  fake_train.behaviour[0] = ZeroDivisionError("a bug")
  d = str(tmp_path / "w")
  with pytest.raises(ZeroDivisionError):
    launch.main(["tiny_run", *A, "--workdir", d])
  assert not os.path.exists(os.path.join(d, "run.lock"))


def test_exit_codes_are_documented():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  epilog = launch.build_parser().format_help()
  for code in launch.EXIT_CODES:
    assert f"| {code} |" in readme and f"  {code}  " in epilog


# --------------------------------------------- item 10: smaller points


def test_topk_error_names_the_key_that_was_set(capsys):
  assert launch.main(["tiny_run", *sets("phases.sparse.topk=200"),
                      "--dry-run"]) == 2
  err = capsys.readouterr().err
  assert "phases.sparse.topk=200 must be smaller" in err
  assert "model.indexer.topk" not in err


def test_convert_set_errors_keep_the_model_prefix(tmp_path, capsys):
  assert launch.main(["convert", str(tmp_path / "nohf"), str(tmp_path / "o"),
                      "--set", "model.indexer.topkk=3"]) == 2
  assert "'model.indexer.topkk'" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["tiny_run:bogus", "main:bogus"])
def test_a_config_argument_it_does_not_take_is_an_error(spec, capsys):
  assert launch.main([spec, "--dry-run"]) == 2
  err = capsys.readouterr().err
  assert "'bogus'" in err and len(lines(err)) == 1


# -------------------------------------------- real runs (slow)


def cli(*args, **kw):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, LAUNCH, *args], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_then_a_changed_lr_is_refused(tmp_path):
  d = str(tmp_path / "w")
  run = cli("tiny_run", *sets("phases.pretrain.steps=500", "save_every=0",
                              "log_every=1", "eval.every=0"),
            "--workdir", d)
  metrics = os.path.join(d, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and run.poll() is None and not (
      os.path.exists(metrics) and os.path.getsize(metrics)):
    time.sleep(0.5)
  run.send_signal(signal.SIGTERM)
  _, err = run.communicate(timeout=240)
  assert run.returncode == 0, err
  tail = lines(err)[-2:]
  assert any(line.startswith("stopped: ") for line in tail), err
  assert "Traceback" not in err
  step = max(int(n) for n in os.listdir(os.path.join(d, "ckpt")))
  assert 0 < step < 500
  code = launch.main(["tiny_run", *sets("phases.pretrain.steps=500",
                                        "save_every=0", "log_every=1",
                                        "eval.every=0",
                                        "phases.pretrain.optim.lr=1e-2"),
                      "--workdir", d, "--dry-run"])
  assert code == 2


def test_prepare_with_a_damaged_gguf_stops_in_one_line_naming_the_file(
    tmp_path, capsys):
  """Issue 17 item 9 through the command line: a file that is not GGUF
  gives exit 2 and one `error:` line naming it, no traceback."""
  import launch  # pylint: disable=import-outside-toplevel
  bad = tmp_path / "cut.gguf"
  bad.write_bytes(b"GGUF" + b"\x00" * 11)
  code = launch.main(["prepare", "smollm2", "--gguf", str(bad), "--out",
                      str(tmp_path / "model")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2, err
  errors = [line for line in err if line.startswith("error:")]
  assert len(errors) == 1 and str(bad) in errors[0], err
  assert not any("Traceback" in line for line in err)
  assert not (tmp_path / "model" / "params").exists()
