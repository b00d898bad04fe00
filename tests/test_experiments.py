"""Smoke tests of the benchmark and experiment scripts at tiny sizes, so that
none of them rots: each runs end to end and prints its summary line."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def test_bench_attention_runs_at_tiny_sizes(capsys):
  import bench_attention
  bench_attention.main([
      "--lengths", "64,128", "--k", "16", "--d", "32", "--q", "16", "--n", "2",
      "--c", "16", "--r", "8", "--h", "8", "--e", "8", "--i", "2", "--j", "8",
      "--ri", "4", "--dense-chunk", "32", "--sparse-chunk", "16", "--reps",
      "1", "--dense-budget-s", "1", "--budget-s", "1"])
  out = capsys.readouterr().out
  assert "summary: time_ratio=" in out


def test_bench_train_runs_every_phase_kind(capsys):
  import bench_train
  bench_train.main(["--config", "tiny_run", "--seq-len", "64",
                    "--batch-size", "2", "--set", "model.indexer.topk=16",
                    "--reps", "1", "--steps", "1"])
  out = capsys.readouterr().out
  for kind in ("pretrain", "warmup", "sparse"):
    assert f"{kind:8s} phase" in out, out
  assert "step-time ratios (median): warmup/pretrain=" in out


def test_bench_train_reads_an_experiment_file(capsys):
  """Any config launch.py accepts: here an experiment file with its ARG."""
  import bench_train
  bench_train.main(["--config", os.path.join(ROOT, "experiments",
                                             "smollm2_dsa.py") + ":test",
                    "--reps", "0"])
  out = capsys.readouterr().out
  assert "warmup   phase 'warmup'" in out and "compile" in out


@pytest.mark.slow
def test_collectives_script_counts_ops():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "experiments/collectives.py", "64"],
                       cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600, check=True).stdout
  assert "all-gather" in out
