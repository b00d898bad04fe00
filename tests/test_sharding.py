"""Sharded training: meshes, shardings, multi-device and multi-process runs.

The multi-device checks run in subprocesses that set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts (this
file is also the worker: ``python tests/test_sharding.py WORKER``); one
subprocess compiles every mesh in turn. Reference: the same steps on one device.
Tolerance (f32; sharded reductions add in another order): losses within
1e-5 relative + 1e-6 absolute, final parameters within 1e-5 absolute; the
selected indices of the trained indexer are identical. Meshes with a
``sequence`` axis run context parallel (dsax.context: zig-zag batch, one
all-gather of the latent keys per layer); their compiled steps' collectives
are checked too.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # configs/, also when run as a worker

import jax  # noqa: E402  (a worker's XLA_FLAGS are set before it starts)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AbstractMesh, PartitionSpec as PS  # noqa: E402

from configs.tiny_run import get_config  # noqa: E402
from dsax import checkpoint, context, data, model, train  # noqa: E402
from dsax.attention import AttentionMode  # noqa: E402
from dsax import params as P  # noqa: E402
from dsax import sharding as S  # noqa: E402
from dsax.config import ConfigError, MeshConfig, override  # noqa: E402
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
PARAM_ATOL = 1e-5
# (data, fsdp, tensor, sequence); the first is the one-device reference.
MESHES = [(1, 1, 1, 1), (8, 1, 1, 1), (2, 2, 2, 1), (1, 4, 2, 1),
          (2, 1, 1, 4), (1, 1, 1, 8)]
OPS = ("all-gather", "all-reduce", "collective-permute", "all-to-all",
       "reduce-scatter")
STEPS = 3  # per phase (the phase lengths set the lr schedules)
FAST = ["data.seq_len=64", "data.batch_size=8", "data.max_docs=12",
        "eval.every=0", "model.indexer.topk=8", "compare=false",
        "log_every=1", "model.n_layers=1", "model.indexer.q_chunk=64",
        f"phases.pretrain.steps={STEPS}", f"phases.warmup.steps={STEPS}",
        f"phases.sparse.steps={STEPS}"]


def _config(extra=()):
  return override(get_config(), FAST + list(extra))


# ------------------------------------------------------------------ workers


def _batches(cfg, n):
  tok, train_docs, _ = data.prepare(cfg.data, None)
  it = data.make_train_iterator(cfg.data, tok, train_docs)
  return [next(it) for _ in range(n)]


def _mesh(shape):
  """(data, fsdp, tensor, sequence[, expert]) -> the mesh on that many
  devices."""
  d, f, t, s, e = tuple(shape) + (1,) * (5 - len(shape))
  return S.make_mesh(MeshConfig(data=d, fsdp=f, tensor=t, sequence=s,
                                expert=e), jax.devices()[:d * f * t * s * e])


def _collectives(hlo):
  """[op, result type] of every collective in a compiled step's HLO."""
  found = (re.search(r"= (.*?) (" + "|".join(OPS) + r")(?:-start)?\(", line)
           for line in hlo.splitlines())
  return [[m.group(2), m.group(1)] for m in found if m]


def _steps(cfg, phase, params, mesh, batches, state=None, hlo=None):
  """Runs len(batches) steps of a phase; (params, state, losses). With a
  list ``hlo``, the collectives of the compiled step are appended to it."""
  state, frozen, tx, sched = train.init_state(cfg, phase, params, mesh, state)
  step = train.make_train_step(cfg, phase, tx, sched, mesh)
  bsh = train.data_sharding(cfg, mesh)
  losses = []
  with jax.set_mesh(mesh):
    for batch in batches:
      batch = train.place_batch(batch, bsh)
      if hlo is not None and not losses:
        step = step.jitted.lower(state, frozen, batch).compile()
        hlo.append(_collectives(step.as_text()))
      state, out = step(state, frozen, batch)
      losses.append(float(out["loss"]))
  return train.unflatten({**frozen, **state["trainable"]}), state, losses


def _indices(cfg, params, mesh, batch):
  """Selected keys of every layer (sparse forward, context parallel on a
  ``sequence`` axis), gathered whole, in natural order [L, B, T, K]."""
  mode = AttentionMode.of(cfg.model, "sparse", indices=True)
  fwd = jax.jit(lambda p, b: model.forward(
      p, b["inputs"], cfg.model, b["segment_ids"], positions_BT=b["positions"],
      mode=mode, context_parallel=True)[1].idx,
      out_shardings=S.replicated(mesh))
  with jax.set_mesh(mesh):
    idx = np.asarray(fwd(params, train.place_batch(
        batch, train.data_sharding(cfg, mesh))))
  return context.from_layout(idx, mesh.shape["sequence"], axis=2)


def _checkpoint_case(cfg, batches, out_dir):
  """Pretrain 2 steps on 4 devices, save, restore onto 2 devices, 2 more
  steps; the uninterrupted 4-device run gives the reference losses."""
  phase = cfg.phases[0]
  mesh4, mesh2 = _mesh((4, 1, 1, 1)), _mesh((2, 1, 1, 1))
  params4 = train.init_params(cfg, mesh4)
  _, state, _ = _steps(cfg, phase, params4, mesh4, batches[:2])
  ckpts = checkpoint.RunCheckpoints(os.path.join(out_dir, "run"))
  ckpts.save(2, state, {"row": 0}, {"phase": phase.name})
  _, _, straight = _steps(cfg, phase, params4, mesh4, batches[2:4], state)
  restored = ckpts.restore_state(2, train.abstract_state(cfg, phase, mesh2))
  ckpts.close()
  devices = sorted({len(x.sharding.device_set)
                    for x in restored["trainable"].values()})
  _, _, resumed = _steps(cfg, phase, train.init_params(cfg, mesh2), mesh2,
                         batches[2:4], restored)
  return {"straight": straight, "resumed": resumed,
          "restored_devices": devices}


def _topk_case():
  """lax.top_k over sharded rows: all-gathered by XLA, kept local by
  ``batch_local``; same values either way."""
  mesh = _mesh((4, 2, 1, 1))
  x = jax.device_put(np.random.default_rng(0).normal(size=(8, 16, 32)),
                     S.batch_sharding(mesh, 8, 16))
  out = {}
  for name, fn in (("plain", lambda y: jax.lax.top_k(y, 4)[1]),
                   ("local", S.batch_local(lambda y: jax.lax.top_k(y, 4)[1]))):
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(x).compile()
      out[name] = {"all_gathers": compiled.as_text().count(" all-gather("),
                   "equal": bool(np.array_equal(
                       np.asarray(compiled(x)),
                       np.asarray(jax.lax.top_k(np.asarray(x), 4)[1])))}
  return out


def _other_modes_case(cfg, batch):
  """The local selection (per shard) and the modes that dsax.context runs
  on whole rows (the oracle selection, dense recall) on data 2 x sequence 4
  against one device: the forward's logits, indexer KL, recall and
  selected indices."""
  params = train.init_params(cfg, _mesh((1, 1, 1, 1)))
  mesh = _mesh((2, 1, 1, 4))
  out = {}
  for name, kind, flags in (
      ("local", "sparse", {"selection": "local", "indices": True,
                           "indexer_loss": True}),
      ("oracle", "sparse", {"selection": "oracle", "indices": True}),
      ("recall", "dense", {"recall": True, "indexer_loss": True})):
    mode = AttentionMode.of(cfg.model, kind, **flags)
    fwd = lambda p, b, cp, mode=mode: model.forward(  # noqa: E731
        p, b["inputs"], cfg.model, b["segment_ids"], mode=mode,
        positions_BT=b["positions"], context_parallel=cp)
    logits, aux = jax.jit(fwd, static_argnums=2)(params, batch, False)
    with jax.set_mesh(mesh):
      logits_cp, aux_cp = jax.jit(fwd, static_argnums=2)(
          train.init_params(cfg, mesh),
          train.place_batch(batch, train.data_sharding(cfg, mesh)), True)
    got = {"logits": context.from_layout(np.asarray(logits_cp), 4)}
    want = {"logits": np.asarray(logits)}
    for k in ("indexer_kl", "recall"):
      if getattr(aux, k) is not None:
        got[k], want[k] = np.asarray(getattr(aux_cp, k)), np.asarray(
            getattr(aux, k))
    if aux.idx is not None:
      got["idx"] = context.from_layout(np.asarray(aux_cp.idx), 4, axis=2)
      want["idx"] = np.asarray(aux.idx)
    out[name] = {k: float(np.max(np.abs(got[k] - want[k]))) for k in want}
  return out


def worker_meshes(out_dir, *shapes):
  """Every phase on each mesh ("d,f,t,s"; "ckpt": the checkpoint case);
  writes result.json and <mesh>.npz (final parameters, selected indices)."""
  cfg = _config()
  batches = _batches(cfg, 3 * STEPS)
  out = {}
  for name in shapes:
    t0 = time.perf_counter()
    if name == "ckpt":
      out[name] = _checkpoint_case(cfg, batches, out_dir)
    elif name == "topk":
      out[name] = _topk_case()
    elif name == "modes":
      out[name] = _other_modes_case(cfg, batches[0])
    else:
      shape = tuple(int(x) for x in name.split(","))
      mesh = _mesh(shape)
      params, losses, hlo = train.init_params(cfg, mesh), [], []
      for i, phase in enumerate(cfg.phases[:3]):
        params, _, ls = _steps(cfg, phase, params, mesh,
                               batches[i * STEPS:(i + 1) * STEPS],
                               hlo=hlo if shape[3] > 1 else None)
        losses += ls
      arrays = {k: np.asarray(v) for k, v in train.flatten(params).items()}
      arrays["idx"] = _indices(cfg, params, mesh, batches[0])
      np.savez(os.path.join(out_dir, name + ".npz"), **arrays)
      out[name] = {"losses": losses, "collectives": hlo,
                   "embed_spec": str(params["embed"].sharding.spec)}
    out[name]["seconds"] = time.perf_counter() - t0
  with open(os.path.join(out_dir, "result.json"), "w") as f:
    json.dump(out, f)


# ------------------------------------------------------- in-process tests


def test_mesh_shape_resolves_minus_one_and_names_bad_values():
  assert S.mesh_shape(MeshConfig(), 1) == {"data": 1, "fsdp": 1, "expert": 1,
                                           "sequence": 1, "tensor": 1}
  assert S.mesh_shape(MeshConfig(expert=4), 8)["data"] == 2
  assert S.mesh_shape(MeshConfig(fsdp=2, tensor=2), 8)["data"] == 2
  assert S.mesh_shape(MeshConfig(data=2, fsdp=-1), 8)["fsdp"] == 4
  with pytest.raises(ConfigError, match=r"mesh.data=3 .* 6 devices, but "
                     r"there are 8"):
    S.mesh_shape(MeshConfig(data=3, tensor=2), 8)
  with pytest.raises(ConfigError, match=r"mesh.tensor=3.*do not divide the 8"):
    S.mesh_shape(MeshConfig(tensor=3), 8)
  with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
    S.mesh_shape(MeshConfig(fsdp=-1), 8)
  with pytest.raises(ConfigError, match="mesh.tensor must be >= 1 or -1, "
                     "got 0"):
    S.mesh_shape(MeshConfig(tensor=0), 8)


def test_rules_cover_every_parameter_and_never_split_indexer_keys():
  cfg = _config().model
  leaves = jax.tree.leaves(P.logical_axes(cfg),
                           is_leaf=lambda x: isinstance(x, tuple))
  names = {a for axes in leaves for a in axes}
  assert names <= set(S.RULES), names - set(S.RULES)
  # Top-k needs whole rows of scores: the indexer key (one per position,
  # dim idx_dim) is never split; its heads may be.
  assert S.RULES["idx_dim"] == () and S.RULES["idx_heads"] == ("tensor",)
  assert set(S.MESH_AXES) >= {a for v in S.RULES.values() for a in v}


def test_logical_spec_drops_reused_and_indivisible_axes():
  mesh = AbstractMesh((2, 2, 1, 1, 2), S.MESH_AXES)
  assert S.logical_spec(("vocab", "embed"), (256, 64), mesh) == PS(
      "tensor", "fsdp")
  # heads and mlp both want tensor: the first dimension gets it.
  assert S.logical_spec(("heads", "mlp"), (4, 8), mesh) == PS("tensor", None)
  # 3 heads do not split over 2 devices: replicated, not an error.
  assert S.logical_spec(("layers", "heads"), (2, 3), mesh) == PS(None, None)
  with pytest.raises(KeyError, match="'nope' has no rule"):
    S.logical_spec(("nope",), (4,), mesh)


# --------------------------------------------------------- subprocess tests

# Compile time dominates; level-0 XLA CPU codegen halves it. The reference
# runs under the same flags, so the comparison is unaffected.
FAST_XLA = "--xla_backend_optimization_level=0 " \
           "--xla_llvm_disable_expensive_passes=true"


def _spawn(args, devices=1, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"{FAST_XLA} --xla_force_host_platform_device_count={devices}"))
  env.update(kw.pop("env", {}))
  return subprocess.Popen([sys.executable] + args, cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kw)


def _wait(proc, timeout=400):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-4000:]
  return out, err


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
  """Runs the mesh workers, two at a time (two cores); returns (results,
  npz per mesh, wall seconds)."""
  t0 = time.perf_counter()
  key = lambda s: ",".join(map(str, s))  # noqa: E731
  groups = [[key(s) for s in MESHES[:3]] + [key(MESHES[5])],
            [key(s) for s in MESHES[3:5]] + ["ckpt", "topk", "modes"]]
  dirs = [tmp_path_factory.mktemp(f"meshes{i}") for i in range(len(groups))]
  procs = [_spawn([os.path.abspath(__file__), "meshes", str(d), *g],
                  devices=8) for d, g in zip(dirs, groups)]
  results, arrays = {}, {}
  for proc, d in zip(procs, dirs):
    _wait(proc, timeout=600)  # four meshes a worker, two workers on two cores
    with open(d / "result.json") as f:
      results.update(json.load(f))
    for name in os.listdir(d):
      if name.endswith(".npz"):
        arrays[name[:-4]] = dict(np.load(d / name))
  return results, arrays, time.perf_counter() - t0


def test_every_phase_on_every_mesh_matches_one_device(meshes):
  results, arrays, wall = meshes
  ref_key = ",".join(map(str, MESHES[0]))
  ref_losses, ref = results[ref_key]["losses"], arrays[ref_key]
  report = {}
  for shape in MESHES[1:]:
    key = ",".join(map(str, shape))
    losses = results[key]["losses"]
    assert len(losses) == 3 * STEPS
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL,
                               atol=LOSS_ATOL, err_msg=key)
    params = arrays[key]
    assert set(params) == set(ref)
    diff = max(float(np.max(np.abs(params[k] - ref[k])))
               for k in ref if k != "idx")
    assert diff <= PARAM_ATOL, (key, diff)
    report[key] = (max(abs(a - b) for a, b in zip(losses, ref_losses)), diff)
  # The parameters really are sharded where the mesh allows.
  assert results["2,2,2,1"]["embed_spec"] == "P('tensor', 'fsdp')"
  print(f"max |loss diff|, max |param diff| per mesh: {report}; "
        f"workers {wall:.1f} s")


def test_selected_indices_agree_on_every_mesh(meshes):
  _, arrays, _ = meshes
  ref = arrays[",".join(map(str, MESHES[0]))]["idx"]
  assert ref.ndim == 4 and ref.shape[-1] == 8  # L, B, T, K
  for shape in MESHES[1:]:
    key = ",".join(map(str, shape))
    np.testing.assert_array_equal(arrays[key]["idx"], ref, err_msg=key)


def test_context_parallel_steps_gather_only_the_latent_keys(meshes):
  """On a ``sequence`` axis of n shards each phase's compiled step has one
  all-gather of the latent keys [B_r, T, A] (A = C + R, + J with the
  indexer; B_r the rows of one batch shard), its backward one
  reduce-scatter [B_r, T / n, A], one all-gather of the segment ids [B_r,
  T], and no collective-permute or all-to-all; the rest are all-reduces
  (the gradients of the parameters over data and sequence)."""
  cfg = _config().model
  c_r, j = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.indexer.head_dim
  t = _config().data.seq_len
  for shape in MESHES:
    if shape[3] == 1:
      continue
    rows, n = 8 // shape[0], shape[3]
    phases = meshes[0][",".join(map(str, shape))]["collectives"]
    assert len(phases) == 3
    for name, ops in zip(("pretrain", "warmup", "sparse"), phases):
      a = c_r + (j if name != "pretrain" else 0)
      shapes = sorted((op, re.sub(r"\{.*", "", ty)) for op, ty in ops
                      if op != "all-reduce")
      assert shapes == sorted([
          ("all-gather", f"f32[{rows},{t},{a}]"),
          ("all-gather", f"s32[{rows},{t}]"),
          ("reduce-scatter", f"f32[{rows},{t // n},{a}]")]), (shape, name,
                                                              ops)


def test_context_parallel_other_modes_match_one_device(meshes):
  """The local selection (per shard), the oracle selection and dense recall
  (on whole rows) on a sequence mesh: the same logits, KL, recall and
  selected keys as one device."""
  case = dict(meshes[0]["modes"])
  del case["seconds"]
  assert set(case) == {"local", "oracle", "recall"}
  assert set(case["local"]) == {"logits", "indexer_kl", "idx"}
  assert set(case["oracle"]) == {"logits", "idx"}
  assert set(case["recall"]) == {"logits", "indexer_kl", "recall"}
  for name, diffs in case.items():
    for k, d in diffs.items():
      assert d <= (0 if k == "idx" else 1e-5), (name, k, d)


def test_checkpoint_from_four_devices_continues_on_two(meshes):
  case = meshes[0]["ckpt"]
  assert case["restored_devices"] == [2]
  np.testing.assert_allclose(case["resumed"], case["straight"],
                             rtol=LOSS_RTOL, atol=LOSS_ATOL)


def test_batch_local_keeps_top_k_on_its_rows(meshes):
  case = meshes[0]["topk"]
  assert case["plain"]["equal"] and case["local"]["equal"]
  assert case["local"]["all_gathers"] == 0, case


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# Two processes (launch.py with a localhost coordinator, per-process data
# streams, a SIGTERM to one of them, the resume, equality to one device):
# tests/test_multihost.py, which reuses _spawn and _free_port.


if __name__ == "__main__":
  if sys.argv[1] == "meshes":
    worker_meshes(*sys.argv[2:])
