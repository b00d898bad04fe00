"""Expert parallelism (dsax.expert_parallel): the MoE layer with its experts
sharded over the ``expert`` mesh axis and tokens exchanged by all-to-all.

The multi-device checks run in two subprocesses with 8 simulated CPU devices
(this file is the worker: ``python tests/test_expert_parallel.py WORKER``),
as tests/test_sharding.py does, whose helpers they reuse. References, on one
device: the dense dispatch (every expert on every token) for one layer's
outputs, gradients, chosen experts, load and balance loss; the same 3
training steps for the trainer. Tolerance (f32): 1e-5 relative to each
array's largest entry (moe tests' rule), losses and metrics 1e-5 relative +
1e-6 absolute, final parameters 1e-5 absolute.
"""

from __future__ import annotations

# test_sharding's helpers (_mesh, _config, _batches, _spawn, _wait) are used
# as they are: pylint: disable=protected-access

import json
import os
import re
import sys
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.join(TESTS, "..")]

import jax  # noqa: E402  (a worker's XLA_FLAGS are set before it starts)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AbstractMesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

import test_sharding as T  # noqa: E402
from dsax import expert_parallel as EP  # noqa: E402
from dsax import moe, train  # noqa: E402
from dsax import params as P  # noqa: E402
from dsax import sharding as S  # noqa: E402
from dsax.config import ConfigError  # noqa: E402

TOL = 1e-5
# One layer: (case, routing variant of test_moe, mesh (data, fsdp, tensor,
# sequence, expert), forced experts). X = 8, K = 3, so X_l = 2 on 4 shards
# (C = U min(K, X_l) = 2U) and 1 on 8 (C = U); forced: C = U K.
LAYER_CASES = [
    ("v2_group_limited", (2, 1, 1, 1, 4), False),
    ("v3_noaux", (1, 1, 1, 1, 8), False),
    ("v2_group_limited", (1, 2, 1, 2, 2), True),
]
TRAIN_MESHES = [(1, 1, 1, 1, 1), (1, 2, 2, 1, 2)]
TRAIN_SETS = ["model.moe.n_routed_experts=8", "model.moe.n_activated=2",
              "model.moe.d_expert=16", "model.moe.first_k_dense=0",
              "model.moe.score_func=sigmoid", "model.moe.topk_method=noaux_tc",
              "model.moe.n_group=2", "model.moe.topk_group=1",
              "model.moe.norm_topk_prob=true",
              "phases.pretrain.loss.moe_bias_rate=0.01",
              "phases.pretrain.loss.moe_balance_weight=0.01"]


# ------------------------------------------------------------------ workers


def _layer(variant):
  """test_moe's layer: 8 experts, top-3, a router that varies per token."""
  import test_moe  # pylint: disable=import-outside-toplevel
  return test_moe._layer(variant)


def _rel_err(a, b):
  """Max over leaves of |a - b| / max(1, max |b|)."""
  err = 0.0
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    err = max(err, float(np.abs(u - v).max()) / max(1.0, float(
        np.abs(v).max())))
  return err


def _gather_elements(hlo):
  """Element counts of every all-gather result in compiled HLO text."""
  out = []
  for line in hlo.splitlines():
    m = re.search(r"= (.*?) all-gather\(", line)
    if m:
      for dims in re.findall(r"\[([\d,]*)\]", m.group(1)):
        out.append(int(np.prod([int(x) for x in dims.split(",") if x])))
  return out


def _layer_case(variant, shape, forced):
  cfg, p = _layer(variant)
  x_BTD = jax.random.normal(jax.random.PRNGKey(3), (8, 16, cfg.d_model))
  r_BTD = jax.random.normal(jax.random.PRNGKey(9), x_BTD.shape)
  experts = (jax.random.randint(jax.random.PRNGKey(4), (8, 16, 3), 0, 8)
             if forced else None)  # random: repeats within a token happen

  def loss(p, x_BTD, experts, dispatch):
    y, aux = moe.moe_forward(p, x_BTD, cfg, experts_BTK=experts,
                             dispatch=dispatch, impl="blocks", block=4)
    return jnp.sum(y * r_BTD), (y, aux)

  fn = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True),
               static_argnums=3)
  (_, (y_ref, aux_ref)), g_ref = fn(p, x_BTD, experts, "dense")
  mesh = T._mesh(shape)
  put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
  # each parameter on its sharding from RULES (the layer's slice of the
  # stacked ``moe`` specs): experts over ``expert``, D over ``fsdp``
  axes = jax.tree.map(lambda a: a[1:], P.logical_axes(cfg)["moe"],
                      is_leaf=lambda a: isinstance(a, tuple))
  p_sh = jax.tree.map(lambda v, a: put(v, S.logical_spec(a, v.shape, mesh)),
                      p, axes, is_leaf=lambda a: isinstance(a, tuple))
  tok = S.batch_sharding(mesh, 8, 16)
  x_sh = put(x_BTD, PS(*tok.spec, None))
  e_sh = None if experts is None else put(experts, PS(*tok.spec, None))
  with jax.set_mesh(mesh):
    compiled = fn.lower(p_sh, x_sh, e_sh, "grouped").compile()
    (_, (y, aux)), g = compiled(p_sh, x_sh, e_sh)
  hlo = compiled.as_text()
  m = cfg.moe
  return {"y_err": _rel_err(y, y_ref), "g_err": _rel_err(g, g_ref),
          "g_scale": float(jnp.abs(g_ref[0]["router"]).max()),
          "experts_equal": bool(np.array_equal(aux.experts,
                                               aux_ref.experts)),
          "forced_kept": experts is None or bool(np.array_equal(
              aux.experts, experts)),
          "load_equal": bool(np.array_equal(aux.load, aux_ref.load)),
          "balance": [float(aux.balance), float(aux_ref.balance)],
          "all_to_all": hlo.count(" all-to-all("),
          "gathers": _gather_elements(hlo),
          "expert_weights": m.n_routed_experts * cfg.d_model * m.d_expert,
          "w_spec": str(p_sh["w_gate"].sharding.spec),
          "w_grad_spec": str(g[0]["w_gate"].sharding.spec)}


def _train_case(cfg, batches, shape):
  """3 pretraining steps on a mesh: losses, MoE metrics, final params."""
  mesh = T._mesh(shape)
  phase = cfg.phases[0]
  params = train.init_params(cfg, mesh)
  state, frozen, tx, sched = train.init_state(cfg, phase, params, mesh)
  step = train.make_train_step(cfg, phase, tx, sched, mesh)
  bsh = train.data_sharding(cfg, mesh)
  rows = []
  for batch in batches:
    state, out = step(state, frozen, S.global_batch(batch, bsh))
    rows.append({k: float(v) for k, v in out.items()
                 if k == "loss" or k.startswith("moe_")})
  gb = S.global_batch(batches[0], bsh)
  with jax.set_mesh(mesh):  # lowered, not compiled again: shard_map's
    # collectives are explicit there already
    n_a2a = step.jitted.lower(state, frozen, gb).as_text().count(
        "all_to_all")
  flat = {**frozen, **state["trainable"]}
  return rows, n_a2a, {k: np.asarray(v) for k, v in flat.items()}


def worker(out_dir, kind):
  out = {}
  t0 = time.perf_counter()
  if kind == "layer":
    for i, (variant, shape, forced) in enumerate(LAYER_CASES):
      out[str(i)] = _layer_case(variant, shape, forced)
  else:
    cfg = T._config(TRAIN_SETS)
    batches = T._batches(cfg, T.STEPS)
    for shape in TRAIN_MESHES:
      key = ",".join(map(str, shape))
      rows, n_a2a, arrays = _train_case(cfg, batches, shape)
      np.savez(os.path.join(out_dir, key + ".npz"), **arrays)
      out[key] = {"rows": rows, "all_to_all": n_a2a}
  out["seconds"] = time.perf_counter() - t0
  with open(os.path.join(out_dir, "result.json"), "w") as f:
    json.dump(out, f)


# ------------------------------------------------------- in-process tests


def test_exchange_layout_fills_each_shards_slot_in_expert_order():
  idx_UK = jnp.array([[5, 0], [3, 1], [0, 2], [4, 5], [1, 0]], jnp.int32)
  u, k, x, shards, cap = 5, 2, 6, 3, 5  # X_l = 2: shard j has 2j, 2j + 1
  ex = EP.exchange_layout(idx_UK, x, shards, cap)
  src, tok, loc = (np.asarray(a) for a in (ex.src_R, ex.token_R, ex.local_R))
  # slot j: shard j's assignments (u*K + k), by expert, token order within
  # one; 10 = unused
  np.testing.assert_array_equal(src, [1, 4, 9, 3, 8, 5, 2, 10, 10, 10,
                                      6, 0, 7, 10, 10])
  np.testing.assert_array_equal(loc, [0, 0, 0, 1, 1, 0, 1, 2, 2, 2,
                                      0, 1, 1, 2, 2])
  np.testing.assert_array_equal(tok, np.where(src < 10, src // k, u))
  dest = np.asarray(ex.dest_UK)
  for m in range(u * k):
    assert src[dest[m // k, m % k]] == m


def test_expert_layout_spare_ids_sort_last_and_never_run():
  ids = jnp.array([[1], [2], [0], [2], [1], [2]], jnp.int32)  # 2 = spare
  lay = moe.expert_layout(ids, 2, 2, spare=True)
  np.testing.assert_array_equal(lay.sizes_X, [1, 2])
  assert int(lay.n_used) == 2  # expert 0: one block, expert 1: one block
  src = np.asarray(lay.src_R)
  assert set(src[:4]) == {2, 0, 4, 6}  # the used blocks: real rows, padding
  assert set(src[4:]) >= {1, 3, 5}
  x_UD = jnp.arange(12.0).reshape(6, 2)
  w = {"w_gate": jnp.ones((2, 2, 3)), "w_up": jnp.ones((2, 2, 3)),
       "w_down": jnp.ones((2, 3, 2))}
  y_RD = moe.swiglu_rows(w, moe.gather_rows(x_UD, lay.token_R, lay.dest_UK),
                         lay, "blocks", jnp.float32)
  y_UD = np.asarray(moe.sum_rows(y_RD, lay.token_R, lay.dest_UK))
  assert (y_UD[[1, 3, 5]] == 0).all() and (y_UD[[0, 2, 4]] != 0).all()
  # ragged_dot (GPU/TPU's impl, block 1): rows past the groups give zeros
  lay1 = moe.expert_layout(ids, 2, 1, spare=True)
  y1_RD = moe.swiglu_rows(w, moe.gather_rows(x_UD, lay1.token_R,
                                             lay1.dest_UK),
                          lay1, "ragged", jnp.float32)
  np.testing.assert_allclose(moe.sum_rows(y1_RD, lay1.token_R, lay1.dest_UK),
                             y_UD, rtol=1e-6)


def test_rules_put_experts_on_the_expert_axis_and_rows_over_it():
  mesh = AbstractMesh((1, 2, 4, 1, 1), S.MESH_AXES)
  assert S.logical_spec(("expert", "embed", "mlp"), (8, 64, 16), mesh) == PS(
      "expert", "fsdp", None)
  assert S.logical_spec(("batch", "sequence"), (8, 64), mesh) == PS(
      ("fsdp", "expert"), None)
  # an expert count the axis does not divide: refused by the config check
  # and by the layer itself
  with pytest.raises(ConfigError, match=r"mesh.expert=3 must divide "
                     r"model.moe.n_routed_experts=8"):
    T._config(TRAIN_SETS + ["mesh.expert=3"])
  cfg, p = _layer("v3_noaux")
  with jax.sharding.use_abstract_mesh(AbstractMesh((1, 1, 3, 1, 1),
                                                   S.MESH_AXES)):
    with pytest.raises(ConfigError, match="n_routed_experts=8 does not "
                       "divide by mesh.expert=3"):
      jax.eval_shape(lambda x: moe.moe_forward(p, x, cfg)[0],
                     jnp.zeros((3, 4, cfg.d_model)))


# --------------------------------------------------------- subprocess tests


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Runs the layer and train workers side by side (two cores)."""
  t0 = time.perf_counter()
  kinds = ("layer", "train")
  dirs = {k: tmp_path_factory.mktemp(k) for k in kinds}
  procs = {k: T._spawn([os.path.abspath(__file__), str(dirs[k]), k],
                       devices=8) for k in kinds}
  out = {}
  for k in kinds:
    _, err = T._wait(procs[k])
    # XLA's warning that it resharded by replicating (EP.lookup_table)
    assert "Involuntary full rematerialization" not in err, err[-3000:]
    with open(dirs[k] / "result.json") as f:
      out[k] = json.load(f)
    out[k]["arrays"] = {n[:-4]: dict(np.load(dirs[k] / n))
                        for n in os.listdir(dirs[k]) if n.endswith(".npz")}
  out["wall"] = time.perf_counter() - t0
  return out


def test_layer_equals_one_device_dense(results):
  """Outputs, gradients (every parameter and the input), chosen experts,
  load and balance loss of the expert-parallel layer equal the one-device
  dense reference; forced experts are kept; the compiled step exchanges
  with all-to-all and never gathers more than a shard's own experts."""
  layer = results["layer"]
  for i, (variant, shape, forced) in enumerate(LAYER_CASES):
    case, name = layer[str(i)], f"{variant} {shape} forced={forced}"
    assert case["y_err"] <= TOL and case["g_err"] <= TOL, (name, case)
    assert case["g_scale"] > 1e-3, name  # the router gradient is not zero
    assert case["experts_equal"] and case["forced_kept"], name
    assert case["load_equal"], name
    np.testing.assert_allclose(*case["balance"], rtol=1e-6, err_msg=name)
    # forward: rows, their expert ids, results back; backward: 2 more
    assert case["all_to_all"] == 5, (name, case["all_to_all"])
    e = shape[4]
    assert max(case["gathers"], default=0) <= case["expert_weights"] // e, (
        name, case["gathers"])
    assert case["w_spec"].startswith("P('expert'"), case["w_spec"]
    assert case["w_grad_spec"].startswith("P('expert'"), case["w_grad_spec"]
  errs = [(layer[str(i)]["y_err"], layer[str(i)]["g_err"])
          for i in range(len(LAYER_CASES))]
  print(f"layer: relative errors (y, grads) {errs}; worker "
        f"{layer['seconds']:.1f} s, wall {results['wall']:.1f} s")


def test_three_train_steps_equal_one_device(results):
  """Losses, the MoE metrics (load statistics, balance loss) and the final
  parameters, router bias included (moved by the load sign rule), of 3
  pretraining steps with expert > 1 equal one device's."""
  run, arrays = results["train"], results["train"]["arrays"]
  ref_key = ",".join(map(str, TRAIN_MESHES[0]))
  ref_rows, ref = run[ref_key]["rows"], arrays[ref_key]
  assert run[ref_key]["all_to_all"] == 0
  assert {"moe_maxvio", "moe_balance", "moe_idle"} <= set(ref_rows[0])
  assert "moe/router_bias" in ref and np.abs(ref["moe/router_bias"]).max() > 0
  for shape in TRAIN_MESHES[1:]:
    key = ",".join(map(str, shape))
    assert run[key]["all_to_all"] >= 5, key
    rows = run[key]["rows"]
    for name in ref_rows[0]:
      np.testing.assert_allclose([r[name] for r in rows],
                                 [r[name] for r in ref_rows], rtol=T.LOSS_RTOL,
                                 atol=T.LOSS_ATOL, err_msg=f"{key} {name}")
    diff = max(float(np.abs(arrays[key][k] - ref[k]).max()) for k in ref)
    assert set(arrays[key]) == set(ref) and diff <= T.PARAM_ATOL, (key, diff)
  print(f"train: losses {[r['loss'] for r in ref_rows]}; "
        f"worker {run['seconds']:.1f} s")


if __name__ == "__main__":
  worker(*sys.argv[1:])
