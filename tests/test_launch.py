"""launch.py and dsax.sweep: named configs, sweeps, strict errors, the table.

CLI behaviour runs launch.py in a subprocess; the rest calls functions
directly. Nothing here trains: real runs go through a fake dsax.train.
"""

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

import dsax
from dsax import config as C
from dsax import sweep as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.py")

import launch  # noqa: E402  (conftest puts the repo root on sys.path)


def cli(*args, cwd=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, LAUNCH, *args], capture_output=True,
                        text=True, cwd=cwd or ROOT, env=env, timeout=120)


def write_sweep(tmp_path, body, name="sw.py"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(body))
  return str(path)


GRID_2X2 = """
    CONFIG = "tiny_run"
    BASE = {"phases.pretrain.steps": 3}
    GRID = {"model.indexer.topk": [8, 32],
            "phases.sparse.optim.lr": [1e-4, 3e-4]}
"""


# -------------------------------------------------------------------- CLI


def test_help_is_fast_and_imports_no_jax():
  code = textwrap.dedent(f"""
      import runpy, sys
      sys.argv = ["launch.py", "--help"]
      try:
        runpy.run_path({LAUNCH!r}, run_name="__main__")
      except SystemExit as e:
        assert e.code == 0, e.code
      assert "jax" not in sys.modules, "launch.py --help imported jax"
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
  assert out.returncode == 0, out.stderr
  for word in ("--sweep", "--set", "--workdir", "--dry-run", "eval",
               "compare", "prepare", "tiny_run"):
    assert word in out.stdout


@pytest.mark.parametrize("args,named", [
    (("prepare", "somewhere"), "somewhere"),
    (("convert", "/no/such/dir", "out"), "/no/such/dir")])
def test_prepare_and_convert_name_a_bad_argument(args, named):
  out = cli(*args)
  assert out.returncode == 2
  assert named in out.stderr
  assert cli(args[0], "--help").returncode == 0


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_eval_and_compare_need_a_run(command, tmp_path):
  assert cli(command, "--help").returncode == 0
  out = cli(command, str(tmp_path / "nowhere"))
  assert out.returncode == 2
  assert "not implemented" not in out.stderr
  assert "error:" in out.stderr and "nowhere" in out.stderr


def test_eval_rejects_bad_k(tmp_path):
  out = cli("eval", str(tmp_path), "--k", "16,x")
  assert out.returncode == 2 and "comma-separated integers" in out.stderr


def test_eval_rejects_a_bad_baseline(tmp_path):
  from test_evals import fake_run
  d = fake_run(tmp_path, name="tiny_run")
  out = cli("eval", d, "--baselines", "window")
  assert out.returncode == 2 and "'window' is not local or oracle" in out.stderr


def test_eval_then_compare(tmp_path, capsys):
  """launch.py eval on a run directory with random-init phases, then compare
  (in process: one jax start-up)."""
  from test_evals import fake_run
  d = fake_run(tmp_path, name="tiny_run")
  assert launch.main(["eval", d, "--k", "16", "--lengths", "300", "--quick",
                      "--tasks", "passkey", "--per-cell", "1",
                      "--greedy", "0", "--baselines", "local"]) == 0
  out = capsys.readouterr().out
  assert "| sparse (sparse) k=16 |" in out
  assert "| local (pretrain) k=16 |" in out
  with open(os.path.join(d, "eval", "results.json")) as f:
    res = json.load(f)
  assert res["settings"]["ks"] == [16] and res["settings"]["lengths"] == [300]
  assert os.path.isfile(os.path.join(d, "eval", "retrieval_passkey.png"))
  cmp_dir = str(tmp_path / "cmp")
  assert launch.main(["compare", d, d, "--out", cmp_dir]) == 0
  out = capsys.readouterr().out
  assert "tiny_run / base (pretrain) dense" in out
  assert os.path.isfile(os.path.join(cmp_dir, "compare_loss_by_position.png"))


def test_command_word_only_counts_first():
  with pytest.raises(SystemExit) as e:
    launch.main(["--dry-run", "eval"])
  assert e.value.code == 2


def test_dry_run_prints_resolved_config(tmp_path):
  out = cli("tiny_run", "--set", "phases.sparse.steps=7", "--set",
            "model.indexer.topk=8", "--workdir", str(tmp_path / "r"),
            "--dry-run")
  assert out.returncode == 0, out.stderr
  cfg = json.loads(out.stdout)
  assert cfg["name"] == "tiny_run"
  assert cfg["workdir"] == str(tmp_path / "r")
  assert cfg["model"]["indexer"]["topk"] == 8
  sparse = [p for p in cfg["phases"] if p["name"] == "sparse"][0]
  assert sparse["steps"] == 7
  assert str(tmp_path / "r") in out.stderr
  assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_default_workdir_is_work_name(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert launch.main(["tiny_run", "--dry-run"]) == 0
  cfg = json.loads(capsys.readouterr().out)
  assert cfg["workdir"] == os.path.join("work", "tiny_run")
  assert not (tmp_path / "work").exists()


def test_sweep_dry_run_gives_four_distinct_configs(tmp_path):
  path = write_sweep(tmp_path, GRID_2X2)
  out = cli("--sweep", path, "--set", "phases.dense.steps=2", "--workdir",
            str(tmp_path / "w"), "--dry-run")
  assert out.returncode == 0, out.stderr
  runs = json.loads(out.stdout)
  assert len(runs) == 4
  names = [r["name"] for r in runs]
  assert names == ["topk-8_sparse.optim.lr-0.0001",
                   "topk-8_sparse.optim.lr-0.0003",
                   "topk-32_sparse.optim.lr-0.0001",
                   "topk-32_sparse.optim.lr-0.0003"]
  configs = [json.dumps(r["config"], sort_keys=True) for r in runs]
  assert len(set(configs)) == 4
  seen = set()
  for r in runs:
    cfg = r["config"]
    phases = {p["name"]: p for p in cfg["phases"]}
    assert r["workdir"] == str(tmp_path / "w" / "sw" / r["name"])
    assert cfg["workdir"] == r["workdir"]
    assert phases["pretrain"]["steps"] == 3   # BASE
    assert phases["dense"]["steps"] == 2      # --set
    seen.add((cfg["model"]["indexer"]["topk"],
              phases["sparse"]["optim"]["lr"]))
  assert seen == {(8, 1e-4), (8, 3e-4), (32, 1e-4), (32, 3e-4)}
  assert not (tmp_path / "w").exists()


def test_sweep_topk_experiment_expands():
  runs = S.expand_sweep(os.path.join(ROOT, "experiments", "sweep_topk.py"))
  assert len(runs) == 4
  assert S.load_sweep(os.path.join(ROOT, "experiments",
                                   "sweep_topk.py")).config == "main"
  if "main" in S.available_configs(ROOT):
    base = S.load_config("main", ROOT)
    for _, overrides in runs:  # every point is a valid config
      C.override(base, overrides)


@pytest.mark.parametrize("setting, words", [
    ("model.indexer.topkk=8", ["model.indexer.topkk"]),
    ("data.seq_len=long", ["data.seq_len", "int"]),
    ("model.indexer.topk=128", ["phases.sparse", "topk", "seq_len"]),
    ("phases.dense.init_from=/no/such/ckpt", ["phases.dense.init_from"]),
    ("nokey", ["nokey", "key=value"]),
    ("phases.warmup.trainable=x", ["phases.warmup.trainable", "kind=warmup"]),
    ("phases.sparse.lr=1e-4", ["phases.sparse.lr", "phases.sparse.optim.lr"]),
])
def test_bad_config_exits_2_naming_the_key(setting, words):
  out = cli("tiny_run", "--set", setting, "--dry-run")
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  for word in words:
    assert word in lines[0]
  assert out.stdout == ""


def test_trainable_regex_matching_nothing_exits_2():
  out = cli("tiny_run", "--set", "phases.sparse.trainable=^no/such/param",
            "--dry-run")
  assert out.returncode == 2, out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "phases.sparse.trainable" in last


def test_unknown_config_lists_available():
  out = cli("no_such_config", "--dry-run")
  assert out.returncode == 2
  assert "no_such_config" in out.stderr and "tiny_run" in out.stderr


def test_bad_sweep_in_a_run_names_the_run(tmp_path):
  path = write_sweep(tmp_path, """
      CONFIG = "tiny_run"
      GRID = {"model.indexer.topk": [8, 200]}
  """)
  out = cli("--sweep", path, "--dry-run")
  assert out.returncode == 2
  assert out.stderr.startswith("error: topk-200:")
  assert "seq_len" in out.stderr


# ------------------------------------------------------ runs (fake train)


@pytest.fixture
def fake_train(monkeypatch):
  calls = []

  def run(cfg, workdir):
    calls.append((cfg, workdir))
    if cfg.model.indexer.topk == 13:
      raise RuntimeError("boom")
    os.makedirs(workdir, exist_ok=True)
    summary = {"sparse/val_loss": 1.0 + cfg.model.indexer.topk / 100,
               "steps": sum(p.steps for p in cfg.phases)}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
    return summary

  fake = types.ModuleType("dsax.train")
  fake.run = run
  fake.preflight = lambda cfg: None
  monkeypatch.setitem(sys.modules, "dsax.train", fake)
  monkeypatch.setattr(dsax, "train", fake, raising=False)
  return calls


def test_single_run_calls_train(fake_train, tmp_path, capsys):
  wd = str(tmp_path / "one")
  assert launch.main(["tiny_run", "--set", "seed=3", "--workdir", wd]) == 0
  (cfg, workdir), = fake_train
  assert workdir == wd and cfg.workdir == wd and cfg.seed == 3
  out = capsys.readouterr().out
  assert "sparse/val_loss" in out and os.path.abspath(wd) in out


def test_sweep_continues_after_a_failed_run(fake_train, tmp_path, capsys):
  path = write_sweep(tmp_path, """
      CONFIG = "tiny_run"
      ZIP = {"model.indexer.topk": [8, 13, 32], "seed": [1, 2, 3]}
      SUMMARY = ["sparse/val_loss"]
  """, name="zipped.py")
  code = launch.main(["--sweep", path, "--workdir", str(tmp_path / "w")])
  assert code == 1
  assert [c.seed for c, _ in fake_train] == [1, 2, 3]
  out, err = capsys.readouterr()
  assert "topk-13_seed-2 FAILED" in err and "boom" in err
  lines = out.splitlines()
  assert lines[0].split() == ["run", "status", "sparse/val_loss"]
  assert lines[2].split() == ["topk-8_seed-1", "ok", "1.08"]
  assert lines[3].split() == ["topk-13_seed-2", "failed", "-"]
  assert lines[4].split() == ["topk-32_seed-3", "ok", "1.32"]
  table = (tmp_path / "w" / "zipped" / "summary.txt").read_text()
  assert "topk-32_seed-3" in table


# ------------------------------------------------------------------ sweep


def test_run_name_example():
  names = S.run_names([{"model.indexer.topk": 64,
                        "phases.sparse.optim.lr": 1e-4}])
  assert names == ["topk-64_sparse.optim.lr-0.0001"]


def test_short_keys_disambiguate():
  short = S.short_keys(["model.n_heads", "model.indexer.n_heads",
                        "phases.sparse.optim.lr", "phases.dense.optim.lr",
                        "phases.sparse.indexer_optim.lr", "phases.2.steps",
                        "seed"])
  assert short == {"model.n_heads": "model.n_heads",
                   "model.indexer.n_heads": "indexer.n_heads",
                   "phases.sparse.optim.lr": "sparse.optim.lr",
                   "phases.dense.optim.lr": "dense.optim.lr",
                   "phases.sparse.indexer_optim.lr":
                       "sparse.indexer_optim.lr",
                   "phases.2.steps": "2.steps", "seed": "seed"}


def test_run_names_are_safe_and_unique():
  names = S.run_names([{"data.paths": "a/b c"}, {"data.paths": "a_b_c"},
                       {"data.paths": ("x", "y")}, {"data.paths": "x" * 300}])
  assert len(set(names)) == 4
  for n in names:
    assert "/" not in n and " " not in n and len(n) <= 120


def test_zip_base_and_errors(tmp_path):
  runs = S.expand_sweep(write_sweep(tmp_path, """
      CONFIG = "tiny_run"
      BASE = {"seed": 5}
      ZIP = {"model.indexer.topk": [8, 16],
             "phases.sparse.optim.lr": [1e-4, 2e-4]}
  """))
  assert runs == [
      ("topk-8_sparse.optim.lr-0.0001",
       {"seed": 5, "model.indexer.topk": 8, "phases.sparse.optim.lr": 1e-4}),
      ("topk-16_sparse.optim.lr-0.0002",
       {"seed": 5, "model.indexer.topk": 16, "phases.sparse.optim.lr": 2e-4})]
  bad = {
      "unequal": 'CONFIG = "t"\nZIP = {"a": [1, 2], "b": [1]}\n',
      "both": 'CONFIG = "t"\nGRID = {"a": [1]}\nZIP = {"a": [1]}\n',
      "neither": 'CONFIG = "t"\n',
      "noconfig": 'GRID = {"a": [1]}\n',
      "scalar": 'CONFIG = "t"\nGRID = {"a": 1}\n',
      "clash": 'CONFIG = "t"\nBASE = {"a": 2}\nGRID = {"a": [1]}\n',
  }
  for name, body in bad.items():
    with pytest.raises(C.ConfigError):
      S.expand_sweep(write_sweep(tmp_path, body, name=f"{name}.py"))
  with pytest.raises(C.ConfigError, match="does not exist"):
    S.expand_sweep(str(tmp_path / "missing.py"))


def test_load_config_arg_and_errors():
  cfg = S.load_config("tiny_run")
  assert isinstance(cfg, C.ExperimentConfig) and cfg.name == "tiny_run"
  C.validate(cfg)
  with pytest.raises(C.ConfigError, match="tiny_run"):
    S.load_config("nope")
  with pytest.raises(C.ConfigError, match="get_config"):
    S.load_config("tiny")  # a model-only file
  with pytest.raises(C.ConfigError, match="unknown config"):
    S.load_config("../tiny_run")


def test_load_config_reads_a_file_path(tmp_path):
  """PATH.py[:ARG], from the working directory or the repository (what
  launch.py and experiments/bench_train.py use for experiments/*.py)."""
  spec = "experiments/smollm2_dsa.py:test"
  cfg = S.load_config(spec, ROOT)
  assert cfg.name == "smollm2_dsa_test"
  assert S.load_config(os.path.join(ROOT, spec)) == cfg
  with pytest.raises(C.ConfigError, match="does not exist"):
    S.load_config(str(tmp_path / "missing.py"))
  (tmp_path / "bad.py").write_text("def get_config(arg):\n  return arg\n")
  with pytest.raises(C.ConfigError, match="not an ExperimentConfig"):
    S.load_config(str(tmp_path / "bad.py") + ":x")
  (tmp_path / "none.py").write_text("X = 1\n")
  with pytest.raises(C.ConfigError, match="get_config"):
    S.load_config(str(tmp_path / "none.py"))


def test_summary_table_aligns():
  table = S.summary_table(
      [{"run": "a", "loss": 1.234567, "steps": 10},
       {"run": "long-name", "loss": 0.5},
       {"run": "c", "steps": 2000, "note": "x"}], keys=["loss", "steps"])
  lines = table.splitlines()
  assert lines[0].split() == ["run", "loss", "steps"]
  assert lines[2].split() == ["a", "1.235", "10"]
  assert lines[3].split() == ["long-name", "0.5", "-"]
  assert len({len(line) for line in lines[:2]}) == 1
  assert lines[2].index("1.235") + 5 == lines[3].index("0.5") + 3  # right
  assert "note" in S.summary_table([{"run": "c", "note": "x"}])


def test_sweep_rejects_set_on_swept_key_and_a_config(tmp_path, capsys):
  path = write_sweep(tmp_path, GRID_2X2)
  assert launch.main(["--sweep", path, "--set", "model.indexer.topk=8",
                      "--dry-run"]) == 2
  assert "model.indexer.topk" in capsys.readouterr().err
  assert launch.main(["tiny_run", "--sweep", path, "--dry-run"]) == 2
  assert "not both" in capsys.readouterr().err
