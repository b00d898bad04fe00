"""Checkpoints (dsax.checkpoint): bit-exact round trips of a train state and
of phase parameters, the data state and metadata beside them, keep-last-N,
reopening a run directory, refusing non-finite states, restoring onto target
shardings. tests/test_train.py and tests/test_sharding.py exercise the same
calls inside whole runs; these tests pin the module's own contract."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import (NamedSharding, PartitionSpec,
                          SingleDeviceSharding)

from conftest import tiny
from dsax import checkpoint
from dsax import params as P
from dsax import sharding as S
from dsax.config import MeshConfig


def _state():
  """A train state shaped like train.py's (flat paths of the trainable
  parameters, here the indexer's: bf16 with the f32 weights_proj), AdamW
  moments after one update (non-zero), an int32 step."""
  indexer = P.init_specs(P.indexer_specs(tiny()), jax.random.PRNGKey(1),
                         "bfloat16")
  trainable = {"layers/indexer/" + k: v for k, v in indexer.items()}
  tx = optax.adamw(1e-3)
  opt = tx.init(trainable)
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), trainable)
  updates, opt = tx.update(grads, opt, trainable)
  trainable = optax.apply_updates(trainable, updates)
  return {"trainable": trainable, "opt": opt,
          "step": jnp.asarray(7, jnp.int32)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _assert_bit_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    # Compare bits (bf16 as uint16), so -0.0 vs 0.0 or a NaN payload counts.
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_array_equal(x.view(f"u{x.dtype.itemsize}"),
                                  y.view(f"u{y.dtype.itemsize}"))


@pytest.fixture(scope="module")
def state():
  return _state()


@pytest.fixture(scope="module")
def params():
  """A whole tiny model's tree (random values from numpy: an eager init
  compiles one op per shape, and the values do not matter here)."""
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype),
                      P.abstract_params(tiny()))


def test_state_data_and_meta_round_trip_bit_exact(tmp_path, state):
  data_state = {"row": 123, "epoch": 2, "files": ["a.bin", "b.bin"],
                "rng": [1, 2, 3]}
  meta = {"phase": "warmup", "phase_step": 7, "global_base": 0,
          "config": {"model": {"d_model": 64}, "lr": 1e-3}}
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  assert ckpts.latest_step() is None
  assert ckpts.save(7, state, data_state, meta) is True
  assert os.path.isdir(os.path.join(str(tmp_path), "ckpt", "7"))
  restored = ckpts.restore_state(7, _abstract(state))
  got_meta, got_data = ckpts.restore_meta(7)
  ckpts.close()
  _assert_bit_equal(restored, state)
  assert restored["trainable"]["layers/indexer/wk"].dtype == jnp.bfloat16
  assert restored["trainable"]["layers/indexer/weights_proj"].dtype == (
      jnp.float32)
  assert got_meta == meta and got_data == data_state
  # A target without shardings lands on this process's first device.
  for x in jax.tree.leaves(restored):
    assert x.sharding == SingleDeviceSharding(jax.local_devices()[0])


def test_keep_holds_the_newest_steps_and_a_reopened_run_finds_them(tmp_path):
  tree = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
          "step": jnp.asarray(0, jnp.int32)}
  ckpts = checkpoint.RunCheckpoints(str(tmp_path), keep=2)
  for step in (10, 20, 30, 40):
    marked = {"w": tree["w"] + step, "step": jnp.asarray(step, jnp.int32)}
    assert ckpts.save(step, marked, {"row": step}, {"step": step})
  assert ckpts.latest_step() == 40
  ckpts.close()
  on_disk = sorted(int(d) for d in os.listdir(tmp_path / "ckpt")
                   if d.isdigit())
  assert on_disk == [30, 40]
  again = checkpoint.RunCheckpoints(str(tmp_path), keep=2)
  assert again.latest_step() == 40
  assert sorted(again.manager.all_steps()) == [30, 40]
  meta, data_state = again.restore_meta(30)
  got = again.restore_state(30, _abstract(tree))
  again.close()
  assert meta == {"step": 30} and data_state == {"row": 30}
  np.testing.assert_array_equal(np.asarray(got["w"]),
                                np.arange(6).reshape(2, 3) + 30)
  assert int(got["step"]) == 30


def test_non_finite_state_is_not_saved(tmp_path):
  good = {"w": jnp.ones((4,), jnp.bfloat16), "n": jnp.asarray(3, jnp.int32)}
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  assert ckpts.save(1, good, {}, {})
  for bad in (jnp.asarray([1.0, jnp.nan, 0.0, 0.0], jnp.bfloat16),
              jnp.asarray([1.0, jnp.inf, 0.0, 0.0], jnp.bfloat16)):
    assert not ckpts.save(2, {**good, "w": bad}, {}, {})
  assert ckpts.latest_step() == 1
  ckpts.close()
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]
  # Integer leaves are not checked, and a tree of them alone is finite.
  assert checkpoint.all_finite({"n": jnp.asarray([2**31 - 1], jnp.int32)})
  assert checkpoint.all_finite({})
  assert not checkpoint.all_finite(
      {"a": jnp.ones((2, 2)), "b": jnp.asarray([[1.0, -jnp.inf]])})


def test_phase_params_round_trip_and_are_replaced(tmp_path, params):
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  path = ckpts.save_phase_params("warmup", params)
  assert path == ckpts.phase_params_path("warmup")
  assert os.path.isdir(path) and path.startswith(str(tmp_path))
  ckpts.close()
  _assert_bit_equal(checkpoint.load_params(path, _abstract(params)), params)
  # Saving again under the same name replaces the parameters.
  changed = jax.tree.map(lambda x: x * 2 + 1, params)
  checkpoint.save_params(path, changed)
  _assert_bit_equal(checkpoint.load_params(path, _abstract(params)), changed)
  with pytest.raises(FileNotFoundError, match="no parameter checkpoint"):
    checkpoint.load_params(str(tmp_path / "phases" / "missing"),
                           _abstract(params))


def test_restore_onto_target_shardings_of_a_one_device_mesh(tmp_path, state,
                                                           params):
  mesh = S.make_mesh(MeshConfig())
  assert mesh.devices.size == 1
  # Mesh axes of size 1 may still be named: the spec must come back as given.
  specs = {"trainable": jax.tree.map(
      lambda x: PartitionSpec("tensor") if x.ndim else PartitionSpec(),
      state["trainable"])}
  specs["opt"] = jax.tree.map(lambda _: PartitionSpec(), state["opt"])
  specs["step"] = PartitionSpec()
  shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                           is_leaf=lambda x: isinstance(x, PartitionSpec))
  target = S.with_shardings(_abstract(state), shardings)
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  assert ckpts.save(3, state, {}, {})
  restored = ckpts.restore_state(3, target)
  ckpts.close()
  _assert_bit_equal(restored, state)
  for x, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert x.sharding == want, (x.sharding, want)

  # Phase parameters too, onto the sharding table's shardings.
  want = S.param_shardings(tiny(), mesh)
  checkpoint.save_params(str(tmp_path / "p"), params)
  got = checkpoint.load_params(
      str(tmp_path / "p"), S.with_shardings(_abstract(params), want))
  _assert_bit_equal(got, params)
  for x, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert isinstance(x.sharding, NamedSharding) and x.sharding == w
