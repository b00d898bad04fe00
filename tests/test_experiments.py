"""Smoke tests of the benchmark and experiment scripts at tiny sizes, so that
none of them rots: each runs end to end and prints its summary line."""

import os
import re
import subprocess
import sys

import numpy as np
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


SUMMARY = re.compile(r"^summary: pretrain_util=(\S+) "
                     r"warmup_over_pretrain=(\S+) sparse_util=(\S+) "
                     r"compile_s=(\S+)$", re.M)


def bench_summary(out):
  """The four numbers of bench_train's summary line (its last line)."""
  assert out.rstrip().splitlines()[-1].startswith("summary: "), out
  match = SUMMARY.search(out)
  assert match, out
  return [float(x) for x in match.groups()]


def test_bench_train_runs_every_phase_kind(capsys):
  import bench_train
  bench_train.main(["--config", "tiny_run", "--seq-len", "64",
                    "--batch-size", "2", "--set", "model.indexer.topk=16",
                    "--reps", "1", "--steps", "1", "--matmul-n", "64",
                    "--breakdown"])
  out = capsys.readouterr().out
  for kind in ("pretrain", "warmup", "sparse"):
    assert f"{kind:8s} phase" in out, out
  assert "GFLOP/s (best of 5)" in out and "warm-up breakdown (ms)" in out
  assert "step-time ratios (median): warmup/pretrain=" in out
  parts = re.search(r"pretrain step parts \(ms, each timed alone\): (\d+) x "
                    r"layer (\d+) \(of which attention sublayer (\d+)\) \+ "
                    r"head (\d+) \+ update (\d+) = (\d+)", out)
  assert parts, out
  n, layer, attn, head, update, total = map(int, parts.groups())
  assert n == 2 and min(layer, attn, head, update) >= 0  # ms, rounded
  assert abs(layer + head + update - total) <= 2  # rounding of each term
  pretrain_util, ratio, sparse_util, compile_s = bench_summary(out)
  assert pretrain_util > 0 and sparse_util > 0 and ratio > 0
  assert compile_s > 0


def test_bench_train_reads_an_experiment_file(capsys):
  """Any config launch.py accepts: here an experiment file with its ARG (a
  GQA model); --reps 0 compiles only, so only compile_s is a number."""
  import bench_train
  bench_train.main(["--config", os.path.join(ROOT, "experiments",
                                             "smollm2_dsa.py") + ":test",
                    "--reps", "0", "--matmul-n", "64"])
  out = capsys.readouterr().out
  assert "warmup   phase 'warmup'" in out and "compile" in out
  assert "gqa" in out
  pretrain_util, ratio, sparse_util, compile_s = bench_summary(out)
  assert np.isnan([pretrain_util, ratio, sparse_util]).all()
  assert compile_s > 0


def test_bench_train_flop_counts_follow_the_docstring():
  """The counting rule on a config small enough to check by hand."""
  import bench_train
  from dsax import sweep
  cfg = sweep.load_config("tiny_run")
  m, b, t = cfg.model, cfg.data.batch_size, cfg.data.seq_len
  n_idx = sum(int(np.prod(v.shape)) for k, v in bench_train.train.flatten(
      bench_train.P.abstract_params(m)).items() if "indexer" in k)
  groups = bench_train.param_groups(m)
  assert groups["indexer"] == n_idx
  assert groups["trunk"] + groups["head"] + n_idx == bench_train.P.param_count(
      m) - (0 if m.tie_embeddings else m.vocab_size * m.d_model)
  pre = bench_train.step_flops(cfg, "pretrain", 16)
  a_d = 2 * m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim
                         + m.v_head_dim)
  assert pre["attention"] == 3 * a_d * t * (t + 1) / 2 * b * m.n_layers
  sparse = bench_train.step_flops(cfg, "sparse", t)  # k >= T: every key
  a_s = 2 * m.n_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
  assert sparse["attention"] == 3 * a_s * t * (t + 1) / 2 * b * m.n_layers
  warm = bench_train.step_flops(cfg, "warmup", 16)
  assert warm["matmul"] == 2 * groups["trunk"] * b * t


@pytest.mark.slow
def test_collectives_script_counts_ops():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "experiments/collectives.py", "64"],
                       cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600, check=True).stdout
  assert "all-gather" in out


def test_bench_kernels_runs_every_op_at_tiny_sizes(capsys):
  """Every op, Pallas (interpret mode) and reference, forward and backward."""
  import bench_kernels
  bench_kernels.main(["--t", "64", "--k", "16", "--n", "2", "--c", "32",
                      "--r", "16", "--h", "16", "--e", "16", "--i", "2",
                      "--j", "16", "--batch", "1", "--reps", "1",
                      "--q-chunk", "32", "--logits_rows", "32"])
  out = capsys.readouterr().out
  for op in bench_kernels.OPS:
    assert f"{op:8s} pallas" in out and f"{op:8s} reference" in out, op


def test_smollm2_check_parses_and_names_a_missing_model(tmp_path):
  """The real check needs the imported model (launch.py prepare smollm2);
  without it the script must stop with a message, not a traceback."""
  out = subprocess.run([sys.executable, "experiments/smollm2_check.py",
                        "--model-dir", str(tmp_path / "none")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr[-2000:]


def test_bench_util_compiles_times_and_sizes_programs(capsys):
  """experiments/bench_util.py: compile_all's first outputs are the
  programs' outputs, its peak covers at least the arguments and outputs,
  and interleaved times every program."""
  import jax
  import jax.numpy as jnp
  import bench_util
  x = jnp.ones((256, 256), jnp.float32)
  fns = {"double": jax.jit(lambda a: a * 2), "mm": jax.jit(lambda a: a @ a)}
  compiled, peaks, first = bench_util.compile_all(fns, x)
  np.testing.assert_allclose(first["double"], 2 * np.ones((256, 256)))
  np.testing.assert_allclose(first["mm"], 256 * np.ones((256, 256)))
  for n in fns:   # one [256, 256] f32 argument and output: 0.25 MiB each
    assert peaks[n] >= 0.5 - 1e-6, (n, peaks[n])
  times = bench_util.interleaved(compiled, (x,), reps=2)
  assert set(times) == set(fns) and all(t > 0 for t in times.values())
  out = capsys.readouterr().out
  assert "rep 1: double" in out and "cpus=" in bench_util.machine()


def test_smollm2_page_cells_and_ratios():
  """experiments/smollm2_page.py (its page is written end to end by
  tests/test_smollm2_experiment.py): a passkey cell carries the Wilson
  interval, and the NLL ratio by position skips empty buckets."""
  sys.path.insert(0, ROOT)
  from experiments import smollm2_page
  from dsax.evals import rows
  lo, hi = rows.wilson(3, 4)
  assert smollm2_page._cell((3, 4)) == f"3/4 [{lo:.2f}, {hi:.2f}]"

  def ev(losses):
    return {"heldout": {"prose": {"by_position": {"loss": losses}}}}
  got = smollm2_page._ratios(ev([2.0, None, 3.0]), ev([1.0, 1.0, 0.0]),
                             "prose")
  assert got == [2.0, None, None]
  # Warm-up KL windows: equal windows, the remainder in the last.
  assert smollm2_page.kl_windows([1, 2, 3, 4, 5, 6, 7, 8], 4) == [
      (1, 2, 1.5), (3, 4, 3.5), (5, 6, 5.5), (7, 8, 7.5)]
  assert smollm2_page.kl_windows(list(range(10)), 3) == [
      (1, 3, 1.0), (4, 6, 4.0), (7, 10, 7.5)]
  assert smollm2_page.kl_windows([2.0], 8) == [(1, 1, 2.0)]


def test_passkey_positions():
  """experiments/passkey_selection.py (run end to end by
  tests/test_smollm2_experiment.py): every prompt occurrence of the answer,
  none in the answer itself."""
  sys.path.insert(0, ROOT)
  from experiments import passkey_selection
  ids = np.array([5, 1, 2, 9, 1, 2, 7, 1, 2])
  assert passkey_selection.passkey_positions(ids, 6, np.array([1, 2])) == [
      1, 2, 4, 5]
  assert passkey_selection.passkey_positions(ids, 6, np.array([3])) == []
