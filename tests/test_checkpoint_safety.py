"""Runs that cannot be silently corrupted (issue 17, part B): checkpoints
verified on restore (a damaged latest step is reported in one line, moved
aside, never deleted, and the run falls back to the newest intact step),
nothing non-finite written as a phase's parameters or a checkpoint,
keep_checkpoints never deleting the step just written, idempotent saves,
strict-JSON metrics, and expected stops (signals, non-finite losses, bad
data, unwritable paths) ending with one-line messages."""

import json
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsax import checkpoint, data, metrics, train
from dsax import sharding as S
from dsax.config import DataConfig

from test_train import small_cfg

ONLY_PRETRAIN = ["phases.warmup.steps=0", "phases.sparse.steps=0",
                 "phases.dense.steps=0"]


def _tree(step):
  """A state whose data file is large enough to damage in the middle."""
  w = np.random.default_rng(step).normal(size=(64, 64)).astype(np.float32)
  return {"w": jnp.asarray(w), "b": jnp.full((8,), step, jnp.bfloat16),
          "step": jnp.asarray(step, jnp.int32)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _bit_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_array_equal(x.view(f"u{x.dtype.itemsize}"),
                                  y.view(f"u{y.dtype.itemsize}"))


def _listing(directory):
  """{relative path: contents} of every file under ``directory``."""
  out = {}
  for root, _, names in os.walk(directory):
    for n in names:
      p = os.path.join(root, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, directory)] = f.read()
  return out


def _largest_data_file(step_dir):
  files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns
           if f"{os.sep}d{os.sep}" in os.path.join(r, n)]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return os.path.relpath(path, step_dir)


def _flip(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  return os.path.relpath(path, step_dir)


def _delete_manifests(step_dir):
  found = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns
           if n == "manifest.ocdbt"]
  assert found
  for p in found:
    os.remove(p)
  return "manifest.ocdbt"


def _delete_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))
  return os.path.join("state", "_METADATA")


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)
  return "empty"


def _delete_dsax_manifest(step_dir):
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
  return checkpoint.MANIFEST


DAMAGE = {"truncated data file": _truncate, "flipped bytes": _flip,
          "deleted manifests": _delete_manifests,
          "deleted _METADATA": _delete_metadata,
          "empty step directory": _empty,
          "deleted dsax manifest": _delete_dsax_manifest}


class _Lines(logging.Handler):
  """The ``dsax`` logger's messages (it does not propagate to caplog once a
  run has set up its logging)."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture
def dsax_log():
  handler = _Lines()
  logger = logging.getLogger("dsax")
  logger.addHandler(handler)
  level = logger.level
  logger.setLevel(logging.INFO)
  yield handler.lines
  logger.removeHandler(handler)
  logger.setLevel(level)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_step_is_reported_kept_and_skipped(tmp_path, dsax_log,
                                                          damage):
  ckpts = checkpoint.RunCheckpoints(str(tmp_path), keep=3)
  for step in (10, 20):
    assert ckpts.save(step, _tree(step), {"row": step}, {"step": step})
  ckpts.close()
  step_dir = str(tmp_path / "ckpt" / "20")
  name = DAMAGE[damage](step_dir)
  before = _listing(step_dir)

  again = checkpoint.RunCheckpoints(str(tmp_path), keep=3)
  assert again.latest_step() == 10
  said = [line for line in dsax_log if "damaged" in line]
  assert len(said) == 1 and "\n" not in said[0], dsax_log
  assert "step 20" in said[0] and name in said[0] and "step 10" in said[0]
  # Kept (moved aside, byte for byte), not deleted.
  moved = str(tmp_path / "ckpt" / "20.damaged")
  assert _listing(moved) == before
  _bit_equal(again.restore_state(10, _abstract(_tree(10))), _tree(10))
  assert again.restore_meta(10) == ({"step": 10}, {"row": 10})

  # The run goes on: step 20 is written again, and retention never counts
  # or deletes the damaged copy.
  for step in (20, 30, 40, 50):
    assert again.save(step, _tree(step), {"row": step}, {"step": step})
  again.close()
  steps = sorted(int(d) for d in os.listdir(tmp_path / "ckpt") if d.isdigit())
  assert steps == [30, 40, 50]
  assert _listing(moved) == before


def test_a_damaged_step_twice_is_kept_twice(tmp_path):
  for _ in range(2):
    ckpts = checkpoint.RunCheckpoints(str(tmp_path))
    assert ckpts.save(1, _tree(1), {}, {})
    assert ckpts.save(2, _tree(2), {}, {})
    ckpts.close()
    _flip(str(tmp_path / "ckpt" / "2"))
    assert checkpoint.RunCheckpoints(str(tmp_path)).latest_step() == 1
  moved = sorted(d for d in os.listdir(tmp_path / "ckpt") if "damaged" in d)
  assert len(moved) == 2


def test_every_step_damaged_means_a_fresh_start(tmp_path, dsax_log):
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  assert ckpts.save(3, _tree(3), {}, {})
  ckpts.close()
  _truncate(str(tmp_path / "ckpt" / "3"))
  again = checkpoint.RunCheckpoints(str(tmp_path))
  assert again.latest_step() is None
  said = [line for line in dsax_log if "damaged" in line]
  assert len(said) == 1 and "no intact checkpoint" in said[0]


def test_steps_written_before_manifests_restore_unverified(tmp_path, dsax_log):
  """A run directory from before checksums: its steps have no manifest and
  are restored with orbax's checks only; once a step has a manifest, a
  newer step without one is incomplete, an older one is still accepted."""
  ckpts = checkpoint.RunCheckpoints(str(tmp_path), keep=3)
  for step in (1, 2):
    assert ckpts.save(step, _tree(step), {}, {"step": step})
  ckpts.close()
  for step in (1, 2):
    os.remove(tmp_path / "ckpt" / str(step) / checkpoint.MANIFEST)
  again = checkpoint.RunCheckpoints(str(tmp_path), keep=3)
  assert again.latest_step() == 2 and not again.damaged
  assert any("unverified" in line for line in dsax_log)
  assert again.save(3, _tree(3), {}, {"step": 3})  # with a manifest
  again.close()
  _flip(str(tmp_path / "ckpt" / "3"))
  last = checkpoint.RunCheckpoints(str(tmp_path), keep=3)
  assert last.latest_step() == 2 and len(last.damaged) == 1
  _bit_equal(last.restore_state(2, _abstract(_tree(2))), _tree(2))
  last.close()


def test_keep_zero_never_deletes_the_step_just_written(tmp_path):
  ckpts = checkpoint.RunCheckpoints(str(tmp_path), keep=0)
  for step in (1, 2, 3):
    assert ckpts.save(step, _tree(step), {}, {})
    assert ckpts.latest_step() == step
  ckpts.close()
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["3"]
  assert checkpoint.RunCheckpoints(str(tmp_path)).latest_step() == 3


def test_saving_a_step_already_saved_intact_is_a_no_op(tmp_path):
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  assert ckpts.save(5, _tree(5), {"row": 5}, {"first": True})
  assert ckpts.save(5, _tree(6), {"row": 6}, {"first": False})
  assert ckpts.latest_step() == 5
  _bit_equal(ckpts.restore_state(5, _abstract(_tree(5))), _tree(5))
  assert ckpts.restore_meta(5) == ({"first": True}, {"row": 5})
  ckpts.close()


def test_saving_over_a_damaged_step_moves_it_aside_first(tmp_path):
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  assert ckpts.save(5, _tree(5), {}, {})
  _flip(str(tmp_path / "ckpt" / "5"))
  assert ckpts.save(5, _tree(6), {}, {"second": True})
  assert ckpts.restore_meta(5)[0] == {"second": True}
  ckpts.close()
  assert os.path.isdir(tmp_path / "ckpt" / "5.damaged")


def test_phase_parameters_are_verified_and_never_non_finite(tmp_path):
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  tree = {"w": _tree(1)["w"], "b": _tree(1)["b"]}
  path = ckpts.save_phase_params("pretrain", tree)
  _bit_equal(checkpoint.load_params(path, _abstract(tree)), tree)
  bad = {"w": tree["w"].at[3, 4].set(jnp.nan), "b": tree["b"]}
  with pytest.raises(ValueError, match="non-finite"):
    ckpts.save_phase_params("sparse", bad)
  assert not os.path.exists(ckpts.phase_params_path("sparse"))
  ckpts.close()
  _flip(path)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"phases/pretrain.* does not match") as e:
    checkpoint.load_params(path, _abstract(tree))
  assert "\n" not in str(e.value)


def test_non_finite_leaves_are_counted():
  tree = {"a": jnp.ones(3), "b": jnp.asarray([1.0, jnp.inf]),
          "c": jnp.asarray([jnp.nan]), "n": jnp.asarray(3, jnp.int32)}
  assert checkpoint.non_finite(tree) == (["b", "c"], 3)
  assert checkpoint.non_finite({"a": jnp.ones(2)}) == ([], 1)


# ------------------------------------------------------------------ metrics


def _strict(line):
  def refuse(name):
    raise ValueError(f"not JSON: {name}")
  return json.loads(line, parse_constant=refuse)


def test_metrics_jsonl_is_strict_json_and_readers_accept_it(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write("p", 1, {"loss": 1.5, "grad_norm": float("nan")})
  writer.write("p", 2, {"loss": float("inf"), "lr": np.float32(-np.inf)})
  writer.close()
  rows = [_strict(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[0]["grad_norm"] is None and rows[1]["loss"] is None
  # A legacy file with NaN, and a line cut short by a kill, still read.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"phase": "p", "step": 3, "loss": NaN}\n{"phase": "p", "st')
  got = {r["step"]: r for r in metrics.read_metrics(str(tmp_path))}
  assert sorted(got) == [1, 2, 3]
  assert got[1]["loss"] == 1.5 and np.isnan(got[1]["grad_norm"])
  assert np.isnan(got[2]["loss"]) and np.isnan(got[3]["loss"])
  # The next writer starts on a fresh line.
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write("p", 4, {"loss": 2.0})
  writer.close()
  assert metrics.read_metrics(str(tmp_path))[-1] == {
      "phase": "p", "step": 4, "loss": 2.0}


# ------------------------------------------------------------ whole runs


def _signal_at(monkeypatch, global_step):
  """SIGTERM to this process just before global step ``global_step``."""
  calls = []
  real = S.global_batch

  def global_batch(*args):
    calls.append(1)
    if len(calls) == global_step:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)
  monkeypatch.setattr(S, "global_batch", global_batch)


def test_sigterm_at_a_phase_end_saves_once_and_resumes(tmp_path, monkeypatch):
  """SIGTERM at the last step of a phase whose periodic save already wrote
  that step (StepAlreadyExistsError before); the message is one line."""
  cfg = small_cfg(ONLY_PRETRAIN + ["phases.pretrain.steps=4", "save_every=2"])
  _signal_at(monkeypatch, 4)
  with pytest.raises(train.Interrupted) as e:
    train.run(cfg, str(tmp_path))
  message = str(e.value)
  assert "\n" not in message and "rerun the same command to resume" in message
  assert "step 4" in message and "'pretrain'" in message
  monkeypatch.undo()
  train.run(cfg, str(tmp_path))
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  assert ckpts.latest_step() == 4
  assert ckpts.restore_meta(4)[0]["phase_step"] == 4
  ckpts.close()
  assert os.path.isdir(tmp_path / "phases" / "pretrain")


def test_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path):
  cfg = small_cfg(ONLY_PRETRAIN + ["phases.pretrain.steps=6", "save_every=2",
                                   "keep_checkpoints=3"])
  train.run(cfg, str(tmp_path))
  first = {r["step"]: r["loss"] for r in metrics.read_metrics(str(tmp_path))}
  name = _flip(str(tmp_path / "ckpt" / "6"))
  os.remove(tmp_path / "metrics.jsonl")
  train.run(cfg, str(tmp_path))
  said = [line for line in open(tmp_path / "log.txt") if "is damaged" in line]
  assert len(said) == 1 and name in said[0] and "step 4" in said[0]
  again = {r["step"]: r["loss"] for r in metrics.read_metrics(str(tmp_path))}
  assert sorted(again) == [5, 6] and all(again[s] == first[s] for s in again)
  assert os.path.isdir(tmp_path / "ckpt" / "6.damaged")


def test_non_finite_phase_parameters_are_not_written(tmp_path, monkeypatch):
  """A learning rate that makes the parameters NaN at a phase's last step
  (the loss of that step is still finite): neither phases/sparse nor a
  checkpoint is written, and the message says what was kept."""
  real = train.schedule

  def schedule(optim, steps):
    if optim.lr == 0.00123:  # the sparse phase's main group
      return lambda count: jnp.float32(jnp.nan)
    return real(optim, steps)
  monkeypatch.setattr(train, "schedule", schedule)
  cfg = small_cfg(["phases.pretrain.steps=2", "phases.warmup.steps=1",
                   "phases.sparse.steps=1", "phases.dense.steps=0",
                   "phases.sparse.optim.lr=0.00123", "save_every=0"])
  with pytest.raises(train.NonFiniteLoss) as e:
    train.run(cfg, str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  n_main = len([k for k, g in train.labels_for(
      cfg.phases[2], train.param_paths(cfg)).items() if g == "main"])
  n_all = len(train.param_paths(cfg))
  assert (f"phase 'sparse' ended with non-finite parameters ({n_main} of "
          f"{n_all} leaves); kept checkpoint step 3 and phases/pretrain, "
          "phases/warmup; lower phases.sparse.optim.lr") in message
  assert sorted(os.listdir(tmp_path / "phases")) == ["pretrain", "warmup"]
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  assert ckpts.latest_step() == 3
  ckpts.close()


def test_unwritable_work_directory_is_one_line(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  cfg = small_cfg(ONLY_PRETRAIN)
  for workdir in (tmp_path / "file", tmp_path / "file" / "run"):
    with pytest.raises(train.UnwritablePath) as e:
      train.run(cfg, str(workdir))
    assert "\n" not in str(e.value) and str(workdir) in str(e.value)
  assert (tmp_path / "file").read_text() == "not a directory"


# ------------------------------------------------------------------- data


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
  cfg = DataConfig(source="files", paths=(str(path),))
  with pytest.raises(data.DataError) as e:
    data.load_documents(cfg)
  assert "\n" not in str(e.value) and f"{path}:2" in str(e.value)


def test_one_document_names_the_cause(tmp_path):
  (tmp_path / "only.txt").write_text("a single document\n")
  cfg = DataConfig(source="files", paths=(str(tmp_path / "only.txt"),))
  with pytest.raises(data.DataError) as e:
    data.prepare(cfg, None)
  message = str(e.value)
  assert "\n" not in message and "1 document" in message
  assert "val_fraction" not in message
