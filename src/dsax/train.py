"""The phase trainer: one jitted step per phase, checkpoints, resumption.

Freezing is partitioning: a phase's trainable parameters are those whose path
(``layers/attn/wq_a``) matches its regex; only they are differentiated and
only they have optimizer state. Losses per phase kind:

  pretrain  L = loss.lm_weight * LM                       (optim)
  warmup    L = loss.indexer_weight * sum_l KL_l(p_t || softmax(I_t))
            dense attention; the indexer is the only group (optim); no
            LM loss (the trunk is frozen: see make_loss_fn)
  sparse    L = loss.lm_weight * LM + loss.indexer_weight * sum_l KL_l on S_t
            The indexer's inputs are detached and the LM loss cannot reach the
            indexer, so one backward gives each group exactly its own gradient;
            the two groups have their own optimizers (optax.multi_transform:
            optim for the main group, indexer_optim for the indexer).
            S_t by ``selection`` (indexer, local, oracle). ``indexer_grad``:
            "kl" (the above), "both" (the LM loss also reaches the indexer
            through the router-style gate, dsax.dsa.gate_delta; the main
            group's gradient is unchanged), "lm" (the gate only: the KL
            term is dropped from L and only reported).
  MoE: + loss.moe_balance_weight * balance loss; the router bias moves by
  loss.moe_bias_rate from each step's load (moe.train_terms, bias_update).

The host loop does no array maths and reads each step's metrics one step late.

Sharding (dsax.sharding): the step is jitted with the shardings of the state,
the frozen parameters and the batch, state donated; fresh parameters are
initialised under jit straight onto theirs. Several processes
(``jax.distributed``) run the same loop, each reading its own share of the
documents and feeding its devices' batch rows, and all stop after the same
step on a signal to any of them (dsax.multihost); only process 0 writes logs,
metrics and summaries. With a ``sequence`` mesh axis each row is placed in
the zig-zag layout of context parallelism (``place_batch``; the train stream
does the same) and the step's forward is context parallel (``dsax.context``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from dsax import checkpoint, context, lm_loss, model, moe, multihost
from dsax import params as P, sharding as S
from dsax.checkpoint import CheckpointError, UnwritablePath  # noqa: F401
from dsax.attention import AttentionMode
from dsax.config import (ConfigError, ExperimentConfig, OptimConfig,
                         PhaseConfig, dumps)

log = logging.getLogger("dsax")


class NonFiniteLoss(RuntimeError):
  """A step's loss, or a phase's final parameters, are not finite; the run
  stops and nothing non-finite is saved (the message says what is kept)."""


class Interrupted(RuntimeError):
  """SIGTERM or Ctrl-C: the state was saved and the run stopped cleanly."""

# ------------------------------------------------------------ partitioning


def flatten(params: Any) -> dict[str, Any]:
  """{"layers/attn/wq_a": array, ...}."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(k.key) for k in path): v for path, v in flat}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def param_paths(cfg: ExperimentConfig) -> list[str]:
  return list(flatten(P.abstract_params(cfg.model)))


def groups(phase: PhaseConfig) -> dict[str, tuple[str, OptimConfig]]:
  """Optimizer group -> (path regex, optimizer settings) for a phase: the
  main group (``trainable``, ``optim``) in pretrain and sparse phases, the
  indexer (``indexer_trainable``) with ``optim`` in a warm-up phase, where it
  is the only group, and with ``indexer_optim`` in a sparse phase."""
  if phase.kind == "warmup":
    return {"indexer": (phase.indexer_trainable, phase.optim)}
  main = {"main": (phase.trainable, phase.optim)}
  if phase.kind == "sparse":
    return {**main, "indexer": (phase.indexer_trainable, phase.indexer_optim)}
  return main


def lr_keys(phase: PhaseConfig, group_names=None) -> str:
  """The learning-rate keys of ``group_names`` (default: every group of the
  phase), for a message: "phases.sparse.optim.lr or ...indexer_optim.lr"."""
  names = groups(phase) if group_names is None else group_names
  fields = sorted({"indexer_optim" if g == "indexer" and phase.kind == "sparse"
                   else "optim" for g in names}, key=len)
  return " or ".join(f"phases.{phase.name}.{f}.lr" for f in fields)


def labels_for(phase: PhaseConfig, paths: list[str]) -> dict[str, str]:
  """Trainable path -> its group (the first group whose regex matches)."""
  out = {}
  for path in paths:
    for group, (rx, _) in groups(phase).items():
      if re.search(rx, path):
        out[path] = group
        break
  return out


def preflight(cfg: ExperimentConfig) -> None:
  """Checks that need the model's parameter names; no compute. (What needs
  no model, init_from included, is config validation's: config.validate.)"""
  paths = param_paths(cfg)
  for phase in cfg.phases:
    for group, (rx, _) in groups(phase).items():
      if not any(re.search(rx, p) for p in paths):
        key = "indexer_trainable" if group == "indexer" else "trainable"
        raise ConfigError(f"phases.{phase.name}.{key}={rx!r} matches no "
                          f"parameter (names look like {paths[1]!r})")


# ------------------------------------------------------------- optimizers


def schedule(optim: OptimConfig, steps: int) -> optax.Schedule:
  """The learning rate of a group over a phase of ``steps`` steps."""
  lr = optim.lr
  warm = max(1, min(optim.lr_warmup_steps, steps))
  if optim.schedule == "constant":
    return optax.linear_schedule(lr / warm, lr, warm)
  return optax.warmup_cosine_decay_schedule(
      lr / warm, lr, warm, max(steps, warm + 1),
      end_value=lr * optim.min_lr_ratio)


def decayed(tree: Any) -> Any:
  """Weight-decay mask of a {path: array} tree: matrices decay; norms and
  biases do not (MoE's router bias gets no gradient: decay would shrink it)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not re.search(r"norm|bias", jax.tree_util.keystr(path)),
      tree)


def optimizer(phase: PhaseConfig, labels: dict[str, str]):
  """(transform, lr schedule of the main group or the only group); each
  group of ``groups(phase)`` gets its own AdamW, clipped by its own norm."""
  def adamw(optim: OptimConfig):
    sched = schedule(optim, phase.steps)
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                       optax.adamw(sched, optim.b1, optim.b2,
                                   weight_decay=optim.weight_decay,
                                   mask=decayed)), sched
  present = sorted(set(labels.values()))
  txs = {g: adamw(optim) for g, (_, optim) in groups(phase).items()}
  if len(present) == 1:
    return txs[present[0]]
  return (optax.multi_transform({g: txs[g][0] for g in present}, labels),
          txs["main"][1])


# ------------------------------------------------------------------- steps


def phase_mode(cfg: ExperimentConfig, phase: PhaseConfig) -> AttentionMode:
  """How a phase's step attends: sparse (with the KL on the selected set,
  computed even when ``indexer_grad="lm"`` leaves it out of the loss) in a
  sparse phase, selecting by ``phase.selection`` (``phase.sinks``: local),
  with the router-style gate unless ``phase.indexer_grad`` is "kl"; dense
  with the warm-up KL in a warm-up; plain dense in pretraining."""
  if phase.kind != "sparse":
    return AttentionMode.of(cfg.model, "dense", topk=phase.topk,
                            indexer_loss=phase.kind != "pretrain")
  return AttentionMode.of(cfg.model, "sparse", topk=phase.topk,
                          indexer_loss=True, selection=phase.selection,
                          sinks=phase.sinks,
                          indexer_gate=phase.indexer_grad != "kl")


def batch_loss(params, batch, cfg: ExperimentConfig, mode: AttentionMode):
  """(LM loss, LayerAux) of one batch; params nested; no [B, T, V] logits."""
  h_BTD, aux = model.forward(
      params, batch["inputs"], cfg.model, batch["segment_ids"], mode=mode,
      positions_BT=batch["positions"], head=False, context_parallel=True)
  return lm_loss.loss(params, h_BTD, batch["targets"], batch["weights"],
                      cfg.model), aux


def make_loss_fn(cfg: ExperimentConfig, phase: PhaseConfig) -> Callable:
  """``loss_fn(trainable, frozen, batch) -> (loss, metrics)``: what a phase's
  step differentiates w.r.t. ``trainable`` (flat paths; ``frozen`` is not
  differentiated, so no tangent enters the frozen trunk).

  A warm-up computes no LM loss (with the trunk frozen it only reports the
  base model); XLA drops the unused head and V-wide log-softmax (2 D V FLOPs
  per token: SmolLM2 at T = 2048, 116 GFLOP, most of dense attention's fwd)."""
  mode = phase_mode(cfg, phase)

  def loss_fn(trainable, frozen, batch):
    params = unflatten({**frozen, **trainable})
    if phase.kind == "warmup":
      _, aux = model.forward(params, batch["inputs"], cfg.model,
                             batch["segment_ids"], mode=mode,
                             positions_BT=batch["positions"],
                             context_parallel=True)
      loss = phase.loss.indexer_weight * jnp.sum(aux.indexer_kl)
      return loss, {"indexer_kl": jnp.mean(aux.indexer_kl), "loss": loss}
    lm, aux = batch_loss(params, batch, cfg, mode)
    out = {"lm_loss": lm}
    if phase.kind == "pretrain":
      loss = phase.loss.lm_weight * lm
    else:
      kl = aux.indexer_kl
      out["indexer_kl"] = jnp.mean(kl)
      # indexer_grad="lm": the indexer learns from the LM loss (the gate)
      # alone; the KL is only reported (and not differentiated).
      lm_only = phase.kind == "sparse" and phase.indexer_grad == "lm"
      loss = 0.0 if lm_only else phase.loss.indexer_weight * jnp.sum(kl)
      if phase.kind == "sparse":
        loss = loss + phase.loss.lm_weight * lm
    extra, stats, out["expert_load"] = moe.train_terms(
        aux, phase.loss.moe_balance_weight)
    out.update(stats)
    out["loss"] = loss + extra
    return out["loss"], out

  return loss_fn


def make_train_step(cfg: ExperimentConfig, phase: PhaseConfig, tx,
                    sched: optax.Schedule, mesh=None) -> Callable:
  """``step(state, frozen, batch) -> (state, metrics)`` jitted on ``mesh``
  (default: ``cfg.mesh`` over all devices) with the state donated."""
  loss_fn = make_loss_fn(cfg, phase)

  def step(state, frozen, batch):
    grads, out = jax.grad(loss_fn, has_aux=True)(state["trainable"], frozen,
                                                 batch)
    updates, opt = tx.update(grads, state["opt"], state["trainable"])
    trainable = moe.bias_update(
        optax.apply_updates(state["trainable"], updates),
        out.pop("expert_load", None), phase.loss.moe_bias_rate)
    out["grad_norm"] = optax.global_norm(grads)
    out["lr"] = sched(state["step"])
    return {"trainable": trainable, "opt": opt,
            "step": state["step"] + 1}, out

  mesh = S.make_mesh(cfg.mesh) if mesh is None else mesh
  state_sh, frozen_sh = phase_shardings(cfg, phase, mesh)
  rep = S.replicated(mesh)
  jitted = jax.jit(step, donate_argnums=(0,),
                   in_shardings=(state_sh, frozen_sh,
                                 data_sharding(cfg, mesh)),
                   out_shardings=(state_sh, rep))

  def on_mesh(*args):  # traced under the mesh (see sharding.batch_local)
    with jax.set_mesh(mesh):
      return jitted(*args)
  on_mesh.jitted, on_mesh.mesh = jitted, mesh  # to lower and inspect
  return on_mesh


def data_sharding(cfg: ExperimentConfig, mesh) -> jax.sharding.NamedSharding:
  """The batch's sharding; ConfigError if the batch does not divide over the
  mesh (or, with a ``sequence`` axis, into its zig-zag blocks)."""
  sharding = S.batch_sharding(mesh, cfg.data.batch_size, cfg.data.seq_len)
  n = mesh.shape.get(context.AXIS, 1)
  if n > 1:
    context.zigzag(cfg.data.seq_len, n)
  return sharding


def place_batch(batch: dict[str, np.ndarray],
                sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """A host batch on the mesh as the step reads it: with a ``sequence``
  axis of n > 1, each row in the zig-zag layout of context parallelism
  (``dsax.context``; the step's attention undoes it, the loss is a mean)."""
  n = sharding.mesh.shape.get(context.AXIS, 1)
  return S.global_batch(context.layout_batch(batch, n), sharding)


def flat_param_shardings(cfg: ExperimentConfig, mesh) -> dict[str, Any]:
  return flatten(S.param_shardings(cfg.model, mesh))


@functools.lru_cache(maxsize=16)  # asked by the state, the step and restores
def phase_shardings(cfg: ExperimentConfig, phase: PhaseConfig, mesh):
  """(state shardings, frozen-parameter shardings) of a phase, flat paths."""
  abstract = abstract_state(cfg, phase)
  flat_sh = flat_param_shardings(cfg, mesh)
  shapes = {k: v.shape
            for k, v in flatten(P.abstract_params(cfg.model)).items()}
  trainable = {k: flat_sh[k] for k in abstract["trainable"]}
  state = {"trainable": trainable,
           "opt": S.opt_shardings(abstract["opt"], {
               k: (shapes[k], v) for k, v in trainable.items()}, mesh),
           "step": S.replicated(mesh)}
  return state, {k: v for k, v in flat_sh.items() if k not in trainable}


def param_initializer(cfg: ExperimentConfig, mesh) -> Callable[[], Any]:
  """The jitted init of fresh parameters straight onto their shardings; it
  takes no argument (the key is made inside from ``cfg.seed``), so nothing
  moves between host and device: each device computes only its shards
  (partitionable threefry) and no host or device holds the whole model."""
  return jax.jit(
      lambda: P.init_params(cfg.model, jax.random.PRNGKey(cfg.seed)),
      out_shardings=S.param_shardings(cfg.model, mesh))


def init_params(cfg: ExperimentConfig, mesh) -> Any:
  """Fresh parameters on their shardings (``param_initializer``); equal bit
  for bit to the eager ``params.init_params`` on one device."""
  return param_initializer(cfg, mesh)()


def init_state(cfg: ExperimentConfig, phase: PhaseConfig, params: Any, mesh,
               state: Any = None):
  """(state, frozen, tx, sched) of a phase starting from ``params``, or
  continuing a restored ``state`` (already on its shardings)."""
  flat = flatten(params)
  labels = labels_for(phase, list(flat))
  tx, sched = optimizer(phase, labels)
  state_sh, frozen_sh = phase_shardings(cfg, phase, mesh)
  frozen = jax.device_put({k: flat[k] for k in frozen_sh}, frozen_sh)
  if state is None:
    trainable = jax.device_put({k: flat[k] for k in state_sh["trainable"]},
                               state_sh["trainable"])
    opt = jax.jit(tx.init, out_shardings=state_sh["opt"])(trainable)
    state = {"trainable": trainable, "opt": opt,
             "step": S.put_global(np.int32(0), state_sh["step"])}
  return state, frozen, tx, sched


# --------------------------------------------------------------- the loop


def _check_finite(phase: PhaseConfig, step: int, out: dict[str, Any],
                  kept: Callable[[], str]) -> dict[str, float]:
  vals = {k: float(v) for k, v in out.items()}
  if not np.isfinite(vals["loss"]):
    raise NonFiniteLoss(
        f"phase {phase.name!r} step {step}: loss is {vals['loss']}; stopped, "
        f"keeping {kept()}; lower {lr_keys(phase)} or check the data")
  return vals


def run_phase(cfg: ExperimentConfig, phase: PhaseConfig, params: Any,
              data_iter, ckpts: checkpoint.RunCheckpoints, meta: dict,
              writer, evaluate: Callable[[Any, str], dict] | None,
              start_step: int = 0, state: Any = None, mesh=None,
              sigs: multihost.Signals | None = None) -> Any:
  """Trains one phase from ``params`` (or a restored ``state``); returns the
  phase's final parameters. ``meta["global_base"]`` is the global step of
  the phase's step 0. A signal (``sigs``, else caught here) to any process
  saves the same step on every process and raises Interrupted."""
  mesh = S.make_mesh(cfg.mesh) if mesh is None else mesh
  state, frozen, tx, sched = init_state(cfg, phase, params, mesh, state)
  step_fn = make_train_step(cfg, phase, tx, sched, mesh)
  batch_sh = data_sharding(cfg, mesh)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  base = meta["global_base"]
  kept = functools.partial(ckpts.kept, meta["done"])  # for messages
  pending = None
  t_last = time.perf_counter()
  bar = tqdm.tqdm(total=phase.steps, initial=start_step, desc=phase.name,
                  dynamic_ncols=True, leave=True, disable=not S.is_primary())

  def emit(s, out):
    # Timed after the metrics arrive (_check_finite waits for step s), so
    # dt runs from the end of the previous step to the end of this one.
    nonlocal t_last
    vals = _check_finite(phase, s, out, kept)
    now = time.perf_counter()
    vals["tokens_per_s"] = tokens_per_step / max(now - t_last, 1e-9)
    t_last = now
    if s % cfg.log_every == 0 or s == phase.steps:
      writer.write(phase.name, base + s, vals)
    bar.set_postfix({k: f"{v:.3g}" for k, v in vals.items()
                     if k in ("loss", "indexer_kl", "lm_loss")})
    return vals

  def save(s):
    meta.update(phase_step=s)
    return ckpts.save(base + s, state, data_iter.get_state(), meta)

  last_vals: dict[str, float] = {}
  with contextlib.nullcontext(sigs) if sigs else multihost.Signals() as sigs:
    stop = sigs.vote(mesh)
    for s in range(start_step + 1, phase.steps + 1):
      batch = next(data_iter)  # multihost.TrainStream: global arrays
      if isinstance(batch["inputs"], np.ndarray):
        batch = place_batch(batch, batch_sh)
      state, out = step_fn(state, frozen, batch)
      if pending is not None:  # read the previous step's metrics now
        last_vals = emit(*pending)
      pending = (s, out)
      bar.update(1)
      if cfg.eval.every and evaluate is not None and s % cfg.eval.every == 0:
        # Every process joins the gather; process 0 alone evaluates.
        now_params = S.host_tree(
            unflatten({**frozen, **state["trainable"]}))
        if S.is_primary():
          ev = evaluate(now_params, phase_mode(cfg, phase))
          writer.write(phase.name, base + s, {f"eval_{k}": v
                                              for k, v in ev.items()})
      if stop.after_step():  # the same answer on every process
        last_vals = emit(*pending)
        saved = save(s)
        bar.close()
        if not saved:
          raise NonFiniteLoss(
              f"{sigs.name} at phase {phase.name!r} step {s}, whose state is "
              f"not finite: not saved, keeping {kept()}; lower "
              f"{lr_keys(phase)}")
        raise Interrupted(f"{sigs.name}: saved phase {phase.name!r} step {s} "
                          f"(checkpoint step {base + s}); rerun the same "
                          "command to resume")
      if cfg.save_every and s % cfg.save_every == 0 and s < phase.steps:
        last_vals = emit(*pending)
        pending = None
        save(s)
        t_last = time.perf_counter()  # the save is not the next step's time
    if pending is not None:
      last_vals = emit(*pending)
  bar.close()
  summary = ", ".join(f"{k} {v:.4g}" for k, v in last_vals.items()
                      if k in ("loss", "lm_loss", "indexer_kl", "grad_norm",
                               "tokens_per_s"))
  log.info("phase %s done: %d steps; last step: %s", phase.name, phase.steps,
           summary)
  return unflatten({**frozen, **state["trainable"]}), state


def abstract_state(cfg: ExperimentConfig, phase: PhaseConfig,
                   mesh=None) -> Any:
  """The phase's train state as ShapeDtypeStructs; with ``mesh``, each one
  carries its sharding (a restore target for orbax)."""
  flat = flatten(P.abstract_params(cfg.model))
  labels = labels_for(phase, list(flat))
  trainable = {k: v for k, v in flat.items() if k in labels}
  tx, _ = optimizer(phase, labels)
  state = {"trainable": trainable, "opt": jax.eval_shape(tx.init, trainable),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  if mesh is None:
    return state
  return S.with_shardings(state, phase_shardings(cfg, phase, mesh)[0])


def abstract_params(cfg: ExperimentConfig, mesh) -> Any:
  """The parameters as ShapeDtypeStructs carrying their shardings."""
  return S.with_shardings(P.abstract_params(cfg.model),
                          S.param_shardings(cfg.model, mesh))


def write_config(cfg: ExperimentConfig, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(dumps(cfg) + "\n")


def run(cfg: ExperimentConfig, workdir: str) -> dict:
  """Runs every phase (resuming from the latest checkpoint), then the held-out
  comparison and report (``evals.finish_run``); returns the summary. Compiled
  programs are cached in ``compile_cache_dir(workdir)`` (no recompiles).
  An expected stop raises, with a one-line message naming the cause and the
  remedy: NonFiniteLoss, Interrupted, CheckpointError, UnwritablePath (an
  OSError), dsax.config.DataError, ConfigError."""
  checkpoint.check_writable(workdir)
  with checkpoint.compilation_cache(checkpoint.compile_cache_dir(workdir)):
    return _run(cfg, workdir)


def _run(cfg: ExperimentConfig, workdir: str) -> dict:
  from dsax import data, heldout, metrics  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  primary = S.is_primary()
  if primary:
    metrics.setup_logging(workdir)
    write_config(cfg, workdir)
  else:
    metrics.setup_secondary_logging(jax.process_index())
  preflight(cfg)
  mesh = S.make_mesh(cfg.mesh)
  data_sharding(cfg, mesh)  # batch divisibility, before any data work
  log.info("run %s in %s; mesh %s", cfg.name, os.path.abspath(workdir),
           dict(mesh.shape))
  # Lists the documents; each process reads only its share of the text.
  tok, train_docs, val_docs = multihost.prepare(
      cfg.data, data.tokenizer_cache_dir(cfg.data, workdir))
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller "
                      f"than the tokenizer's {tok.vocab_size}")
  data_iter = multihost.TrainStream(cfg.data, tok, train_docs,
                                    data_sharding(cfg, mesh))
  # Process 0 alone evaluates; the others only join its parameter gather
  # (run_phase), so they never read the validation documents.
  evaluator = heldout.Evaluator(cfg, tok, val_docs) if primary else None
  quick = None
  if cfg.eval.every:
    quick = evaluator.quick if primary else lambda *_: {}
  ckpts = checkpoint.RunCheckpoints(workdir, cfg.keep_checkpoints)
  writer = metrics.MetricWriter(workdir, enabled=primary)
  abstract = abstract_params(cfg, mesh)
  meta: dict[str, Any] = {"done": [], "data_start": {}, "phase": None,
                          "phase_step": 0, "global_base": 0}
  resume_state, latest = None, ckpts.latest_step()
  if latest is not None:
    meta, data_state = ckpts.restore_meta(latest)
    data_iter.set_state(data_state)
    log.info("resuming from global step %d (phase %s step %d)", latest,
             meta["phase"], meta["phase_step"])
  params = None
  try:
    with multihost.Signals() as sigs:
      for phase in cfg.phases:
        if phase.name in meta["done"]:
          continue
        resuming = meta["phase"] == phase.name and latest is not None
        if resuming:
          resume_state = ckpts.restore_state(latest,
                                             abstract_state(cfg, phase, mesh))
          params = unflatten({**flatten(_phase_init(cfg, phase, meta, ckpts,
                                                    abstract, mesh=mesh)),
                              **resume_state["trainable"]})
        else:
          params = _phase_init(cfg, phase, meta, ckpts, abstract, params, mesh)
          if phase.data_from:
            data_iter.set_state(meta["data_start"][phase.data_from])
          meta["data_start"][phase.name] = data_iter.get_state()
          meta.update(phase=phase.name, phase_step=0)
        runner = run_phase  # a grpo phase: dsax.rl.trainer's loop
        if phase.kind == "grpo":
          from dsax.rl import trainer  # pylint: disable=import-outside-toplevel
          runner = functools.partial(trainer.run_phase, tok=tok)
        params, _ = runner(
            cfg, phase, params, data_iter, ckpts, meta, writer,
            quick,
            start_step=meta["phase_step"] if resuming else 0,
            state=resume_state if resuming else None, mesh=mesh, sigs=sigs)
        resume_state, latest = None, None
        _end_phase(phase, params, ckpts, meta, data_iter.get_state())
        if sigs.vote(mesh).now():  # every process, the same answer
          raise Interrupted(f"{sigs.name}: phase {phase.name!r} finished and "
                            f"saved (checkpoint step {ckpts.latest_step()}); "
                            "rerun the same command to resume")
  finally:
    writer.close()
    ckpts.close()
  if not primary:  # the end-of-run evaluation is local to process 0
    return {}
  from dsax import evals  # pylint: disable=import-outside-toplevel
  summary = evals.finish_run(cfg, workdir, tok, val_docs, evaluator)
  summary["wall_seconds"] = time.perf_counter() - t0
  heldout.write_summary(workdir, summary)
  return summary


def _end_phase(phase: PhaseConfig, params: Any,
               ckpts: checkpoint.RunCheckpoints, meta: dict,
               data_state: dict) -> None:
  """Writes phases/<name> and the checkpoint of the phase's end, unless a
  parameter is not finite: then nothing is written (NonFiniteLoss)."""
  bad, total = checkpoint.non_finite(params)
  if bad:
    raise NonFiniteLoss(
        f"phase {phase.name!r} ended with non-finite parameters ({len(bad)} "
        f"of {total} leaves); kept {ckpts.kept(meta['done'])}; lower "
        f"{lr_keys(phase, set(labels_for(phase, bad).values()) or None)}")
  ckpts.save_phase_params(phase.name, params)
  meta["done"].append(phase.name)
  meta["global_base"] += phase.steps
  meta.update(phase=None, phase_step=0)
  if phase.steps:
    ckpts.save(meta["global_base"], {"params": params}, data_state, meta)


def _phase_init(cfg: ExperimentConfig, phase: PhaseConfig, meta: dict,
                ckpts: checkpoint.RunCheckpoints, abstract: Any,
                current: Any = None, mesh=None) -> Any:
  """The parameters a phase starts from (see PhaseConfig.init_from), on
  ``abstract``'s shardings."""
  names = [p.name for p in cfg.phases]
  idx = names.index(phase.name)
  source = phase.init_from or (names[idx - 1] if idx else "")
  if not source:
    return init_params(cfg, S.make_mesh(cfg.mesh) if mesh is None else mesh)
  if source in names:
    if current is not None and source == names[idx - 1] and not phase.init_from:
      return current
    return checkpoint.load_params(ckpts.phase_params_path(source), abstract)
  return checkpoint.load_params(source, abstract)
