"""Trainer: freezing, optimizer-state partition, crash/resume, signals,
non-finite losses."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dsax import checkpoint, metrics, train
from dsax import params as P
from dsax.config import override

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs.tiny_run import get_config  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
FAST = ["data.seq_len=64", "data.max_docs=12", "eval.every=0",
        "phases.pretrain.steps=4", "phases.warmup.steps=3",
        "phases.sparse.steps=3", "phases.dense.steps=2", "log_every=1",
        "model.indexer.topk=8", "compare=false"]


def small_cfg(extra=()):
  return override(get_config(), FAST + list(extra))


def test_warmup_leaves_every_non_indexer_parameter_bit_identical(tmp_path):
  cfg = small_cfg(["phases.sparse.steps=0", "phases.dense.steps=0"])
  train.run(cfg, str(tmp_path))
  abstract = P.abstract_params(cfg.model)
  before = train.flatten(checkpoint.load_params(
      str(tmp_path / "phases" / "pretrain"), abstract))
  after = train.flatten(checkpoint.load_params(
      str(tmp_path / "phases" / "warmup"), abstract))
  changed = [k for k in before if not np.array_equal(before[k], after[k])]
  assert changed and all(k.startswith("layers/indexer/") for k in changed)
  assert len(changed) == len([k for k in before if "indexer" in k])


def test_optimizer_state_exists_only_for_trainable_parameters():
  cfg = small_cfg()
  for phase in cfg.phases:
    state = train.abstract_state(cfg, phase)
    keys = set(state["trainable"])
    opt_keys = set()
    all_keys = set(train.param_paths(cfg))
    for leaf_path, _ in jax.tree_util.tree_flatten_with_path(state["opt"])[0]:
      for k in leaf_path:
        if getattr(k, "key", None) in all_keys:
          opt_keys.add(k.key)
    assert opt_keys == keys, phase.name
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["opt"]))
    n_train = sum(int(np.prod(x.shape)) for x in state["trainable"].values())
    assert n_opt <= 2 * n_train + 16  # Adam's two moments (+ counters)
    if phase.kind == "warmup":
      assert keys and all(k.startswith("layers/indexer/") for k in keys)
    if phase.kind == "sparse":
      assert any("indexer" in k for k in keys) and any(
          "attn" in k for k in keys)


def test_weight_decay_spares_norms_and_biases():
  """With zero gradients only decay moves the parameters: matrices shrink,
  norms, the indexer key LayerNorm bias and the MoE router bias do not."""
  import dataclasses
  from conftest import tiny
  from dsax.config import MoEConfig
  cfg = tiny(n_layers=2, moe=MoEConfig(n_routed_experts=4, n_activated=2,
                                       d_expert=8, first_k_dense=1,
                                       topk_method="noaux_tc"))
  phase = small_cfg().phases[0]
  phase = dataclasses.replace(phase, optim=dataclasses.replace(
      phase.optim, weight_decay=0.5, lr_warmup_steps=1))
  params = train.flatten(P.init_params(cfg, jax.random.PRNGKey(0)))
  params = {k: v + 1.0 for k, v in params.items()}  # non-zero biases
  tx, _ = train.optimizer(phase, {k: "main" for k in params})
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  moved = {k for k, u in updates.items() if np.abs(np.asarray(u)).max() > 0}
  spared = {k for k in params if "norm" in k or "bias" in k}
  assert "moe/router_bias" in spared and "layers/indexer/k_norm_bias" in spared
  assert moved == set(params) - spared


def test_each_group_gets_its_own_optimizer():
  """optim drives the main group, and the indexer alone in a warm-up;
  indexer_optim drives the sparse phase's indexer group: with zero
  gradients, weight decay set on one group moves only that group."""
  import dataclasses
  cfg = small_cfg()
  params = train.flatten(P.init_params(cfg.model, jax.random.PRNGKey(0)))
  by_kind = {p.kind: p for p in cfg.phases}
  for kind, field, group in [("sparse", "indexer_optim", "indexer"),
                             ("sparse", "optim", "main"),
                             ("warmup", "optim", "indexer")]:
    phase = by_kind[kind]
    phase = dataclasses.replace(phase, **{field: dataclasses.replace(
        getattr(phase, field), weight_decay=0.5)})
    labels = train.labels_for(phase, list(params))
    trainable = {k: v for k, v in params.items() if k in labels}
    tx, _ = train.optimizer(phase, labels)
    zeros = jax.tree.map(np.zeros_like, trainable)
    updates, _ = tx.update(zeros, tx.init(trainable), trainable)
    moved = {k for k, u in updates.items() if np.abs(np.asarray(u)).max() > 0}
    assert moved and {labels[k] for k in moved} == {group}, (kind, field)
  assert set(train.groups(by_kind["warmup"])) == {"indexer"}
  assert train.groups(by_kind["sparse"])["indexer"][1] == (
      by_kind["sparse"].indexer_optim)


def _launch(workdir, extra, **kw):
  args = [sys.executable, os.path.join(ROOT, "launch.py"), "tiny_run",
          "--workdir", str(workdir)]
  for item in FAST + list(extra):
    args += ["--set", item]
  return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, **kw)


def _losses(workdir):
  rows = metrics.read_metrics(str(workdir))
  return {(r["phase"], r["step"]): r["loss"] for r in rows}


def _wait_for_checkpoint(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, "ckpt", str(step))
  t0 = time.time()
  while not os.path.isdir(path) or not any(
      "meta" in d for d in os.listdir(path)):
    assert proc.poll() is None, proc.stderr.read()
    assert time.time() - t0 < timeout, "no checkpoint appeared"
    time.sleep(0.2)


def test_killed_run_resumes_with_identical_losses(tmp_path):
  extra = ["save_every=2"]
  ref = _launch(tmp_path / "ref", extra)
  victim = _launch(tmp_path / "victim", extra)
  # Global step 6 = warm-up step 2: killed mid-phase, after pretraining.
  _wait_for_checkpoint(str(tmp_path / "victim"), 6, victim)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert ref.wait() == 0, ref.stderr.read()
  resumed = _launch(tmp_path / "victim", extra)
  assert resumed.wait() == 0, resumed.stderr.read()
  a, b = _losses(tmp_path / "ref"), _losses(tmp_path / "victim")
  assert len(a) == sum(p.steps for p in small_cfg().phases)
  assert a == b


def test_sigterm_saves_then_exits_and_the_run_resumes(tmp_path):
  proc = _launch(tmp_path, ["phases.pretrain.steps=400", "save_every=0"])
  _wait_for_checkpoint_any = time.time()
  while not os.path.exists(tmp_path / "metrics.jsonl"):
    assert proc.poll() is None, proc.stderr.read()
    assert time.time() - _wait_for_checkpoint_any < 240
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  err = proc.communicate(timeout=120)[1]
  assert proc.returncode != 0 and "signal" in err
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  step = ckpts.latest_step()
  ckpts.close()
  assert step is not None and 0 < step < 400


def test_non_finite_loss_stops_without_replacing_the_good_checkpoint(tmp_path):
  cfg = small_cfg(["phases.pretrain.optim.lr=1e30", "phases.pretrain.steps=30",
                   "save_every=1", "phases.pretrain.optim.grad_clip=1e30"])
  with pytest.raises(train.NonFiniteLoss, match="loss is"):
    train.run(cfg, str(tmp_path))
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  step = ckpts.latest_step()
  meta, _ = ckpts.restore_meta(step)
  state = ckpts.restore_state(step, train.abstract_state(cfg, cfg.phases[0]))
  ckpts.close()
  assert checkpoint.all_finite(state)
  rows = metrics.read_metrics(str(tmp_path))
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert meta["phase_step"] < 30


def test_config_json_is_written_and_resolved(tmp_path):
  cfg = small_cfg(["phases.warmup.steps=0", "phases.sparse.steps=0",
                   "phases.dense.steps=0", "phases.pretrain.steps=1"])
  train.run(cfg, str(tmp_path))
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["data"]["seq_len"] == 64 and len(saved["phases"]) == 4
