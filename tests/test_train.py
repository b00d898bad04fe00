"""Trainer: freezing, optimizer-state partition, crash/resume, signals,
non-finite losses."""

import json
import os
import re
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
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  step = ckpts.latest_step()
  ckpts.close()
  assert step is not None and 0 < step < 400
  assert (f"SIGTERM: saved phase 'pretrain' step {step} (checkpoint step "
          f"{step}); rerun the same command to resume") in err


def test_non_finite_loss_stops_without_replacing_the_good_checkpoint(tmp_path):
  cfg = small_cfg(["phases.pretrain.optim.lr=1e30", "phases.pretrain.steps=30",
                   "save_every=1", "phases.pretrain.optim.grad_clip=1e30"])
  with pytest.raises(train.NonFiniteLoss) as e:
    train.run(cfg, str(tmp_path))
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  step = ckpts.latest_step()
  assert re.fullmatch(
      r"phase 'pretrain' step (\d+): loss is (nan|inf|-inf); stopped, "
      rf"keeping checkpoint step {step}; lower phases.pretrain.optim.lr or "
      "check the data", str(e.value)), str(e.value)
  assert int(re.match(r"phase 'pretrain' step (\d+)", str(e.value))[1]) == (
      step + 1)
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


def _phase_inputs(cfg, kind, seed=0):
  """(phase, trainable, frozen, batch) of the first phase of ``kind``."""
  phase = next(p for p in cfg.phases if p.kind == kind)
  flat = train.flatten(P.init_params(cfg.model, jax.random.PRNGKey(seed)))
  labels = train.labels_for(phase, list(flat))
  b, t = cfg.data.batch_size, cfg.data.seq_len
  tokens = np.random.default_rng(seed).integers(
      0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": np.ones((b, t), np.int32),
           "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
           "weights": np.ones((b, t), np.float32)}
  return (phase, {k: v for k, v in flat.items() if k in labels},
          {k: v for k, v in flat.items() if k not in labels}, batch)


def test_warmup_step_computes_no_lm_loss_and_drops_the_head():
  """The warm-up's loss is the KL alone, and its compiled gradient has no
  [B, T, V] logits (XLA drops the unused head); the pretrain one has."""
  from dsax import model
  cfg = small_cfg(["model.vocab_size=263"])  # a V no other axis has
  v = cfg.model.vocab_size
  texts = {}
  for kind in ("warmup", "pretrain"):
    phase, trainable, frozen, batch = _phase_inputs(cfg, kind)
    compiled = jax.jit(jax.grad(train.make_loss_fn(cfg, phase),
                                has_aux=True)).lower(
                                    trainable, frozen, batch).compile()
    texts[kind] = compiled.as_text()
    if kind == "warmup":
      out = compiled(trainable, frozen, batch)[1]
      assert set(out) == {"loss", "indexer_kl"}
      mode = train.phase_mode(cfg, phase)
      kl_L = jax.jit(lambda p, b: model.forward(
          p, b["inputs"], cfg.model, b["segment_ids"], mode=mode,
          positions_BT=b["positions"])[1].indexer_kl)(
              train.unflatten({**frozen, **trainable}), batch)
      np.testing.assert_allclose(
          out["loss"], phase.loss.indexer_weight * np.sum(kl_L), rtol=1e-5)
  # Any array with V as its last axis: the logits (perhaps as [B*T, V]) or
  # the head's matrix [D, V]; the embedding itself is [V, D].
  last_v = re.compile(rf"\[(\d+,)+{v}\]")
  assert last_v.search(texts["pretrain"]) and not last_v.search(
      texts["warmup"])


def test_run_caches_compiled_programs_in_the_workdir(tmp_path, monkeypatch):
  """A run writes JAX's persistent compilation cache to <workdir>/cache/jax
  and restores the global setting after; a second launch with that cache
  (here a copy, in another run directory: the keys hold no path) loads its
  programs instead of compiling them, so it writes no new entry."""
  import shutil
  monkeypatch.setattr(checkpoint, "COMPILE_CACHE_MIN_S", 0.0)  # tiny programs too
  cfg = small_cfg(["phases.warmup.steps=0", "phases.sparse.steps=0",
                   "phases.dense.steps=0", "phases.pretrain.steps=2"])
  train.run(cfg, str(tmp_path / "a"))
  cache = checkpoint.compile_cache_dir(str(tmp_path / "a"))
  assert os.listdir(cache)
  assert jax.config.jax_compilation_cache_dir is None
  shutil.copytree(cache, checkpoint.compile_cache_dir(str(tmp_path / "b")))
  hits = []

  def listen(event, **kwargs):
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
      hits.append(event)
  jax.monitoring.register_event_listener(listen)
  try:
    train.run(cfg, str(tmp_path / "b"))
  finally:
    jax.monitoring.unregister_event_listener(listen)
  assert hits
  assert sorted(os.listdir(checkpoint.compile_cache_dir(str(tmp_path / "b")))) == (
      sorted(os.listdir(cache)))


def test_a_user_compilation_cache_is_kept(tmp_path):
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
  try:
    with checkpoint.compilation_cache(str(tmp_path / "run")) as path:
      assert path == str(tmp_path / "mine")
      assert jax.config.jax_compilation_cache_dir == path
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
  assert not os.path.exists(tmp_path / "run")


def test_tokens_per_s_times_each_step_to_its_metrics(tmp_path, monkeypatch):
  """Each logged step's time runs to the moment its metrics arrive. Reading
  them is made to take 0.25 s here (as a step still running on the device
  would), so no step, the saved ones and the last included, can show more
  than tokens / 0.25 s; the save step used to be timed before its wait."""
  slow = train._check_finite  # pylint: disable=protected-access

  def waiting(*a, **kw):
    time.sleep(0.25)
    return slow(*a, **kw)
  monkeypatch.setattr(train, "_check_finite", waiting)
  cfg = small_cfg(["phases.warmup.steps=0", "phases.sparse.steps=0",
                   "phases.dense.steps=0", "phases.pretrain.steps=4",
                   "save_every=2"])
  train.run(cfg, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
  assert len(speeds) == 4
  bound = cfg.data.batch_size * cfg.data.seq_len / 0.25
  assert max(speeds) <= bound, (speeds, bound)
