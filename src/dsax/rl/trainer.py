"""The grpo phase kind: GRPO post-training on a verifiable task, run by
``dsax.train`` like any phase (``run_phase`` has train.run_phase's
signature, plus the tokenizer).

Step s of a phase (its ``rl`` group, config.RLConfig; maths: shared/RL.md):
  1. ``rl.prompts`` problems of ``rl.task`` (dsax.rl.rewards), drawn from a
     generator seeded by (run seed, global step): a resume redraws them;
  2. a rollout of ``rl.group_size`` samples per prompt with the current
     parameters (theta_old), recording the sampler's log-probs, kept sets,
     DSA key sets and MoE experts (dsax.rl.rollout);
  3. on the host: decode and score (rewards.score), then the group
     advantages (grpo.advantages);
  4. log pi_ref of the completions, once per batch, with the reference
     parameters;
  5. ``rl.epochs`` jitted updates of grpo.loss on
     policy.completion_logprobs (the state donated, as in dsax.train).

The reference parameters are the phase's starting parameters (``init_from``,
else the previous phase's): a copy kept outside the train state, with no
optimizer state, never donated, never updated and not checkpointed; a
resume reloads them from the same source (train._phase_init).

Metrics per step (JSONL, TensorBoard, progress bar): reward_mean,
reward_std, response_len (tokens, EOS included), loss, kl, clip_frac,
ratio, masked_frac (means over the step's updates), mismatch (the first
update's mean |log pi_old - log pi_theta|: the train/rollout mismatch),
grad_norm, lr (first update), samples_per_s; eval_reward: the held-out
reward (``rl.eval_prompts`` problems from a separate stream, answered
greedily) at the phase's start, every ``eval.every`` steps and at its end;
with ``rl.eval_samples`` = n > 0, also eval_reward_sampled: the mean reward
of n samples per held-out problem drawn as the rollouts are (temperature,
top-k, top-p), i.e. an estimate of the policy's expected reward, the
quantity GRPO raises, and eval_reward_sampled_se, its standard error (the
std of the per-problem means / sqrt(problems)). Its key is fixed
(``heldout_key``), so every evaluation of a phase draws with the same
seeds: before and after differ by the policy only.
The optimizer's schedule runs over steps x epochs updates.

Gaps: one process (the rollout and the updates are jitted without explicit
shardings; multi-process runs are untested); retrieval prompts are
left-padded to a multiple of 64 tokens to bound recompiles; the indexer is
not trained in a sparse grpo phase (unless ``trainable`` names it: it then
gets only the GRPO loss, through nothing but the sparse attention's values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from dsax import sharding as S
from dsax import multihost, train
from dsax.attention import AttentionMode
from dsax.config import ExperimentConfig, PhaseConfig
from dsax.rl import grpo, policy, rewards, sampling
from dsax.rl import rollout as R

log = logging.getLogger("dsax")

HELDOUT_STREAM = 1 << 30  # the held-out problems' seed, far from any step
SHOWN = ("reward_mean", "kl", "clip_frac", "response_len", "eval_reward",
         "eval_reward_sampled")
# train's loop helpers, so both loops stop, report and resume alike.
_check_finite, _phase_init = (  # pylint: disable=protected-access
    train._check_finite, train._phase_init)


def grpo_config(phase: PhaseConfig) -> grpo.GRPOConfig:
  r = phase.rl
  return grpo.GRPOConfig(
      group_size=r.group_size, clip_eps=r.clip_eps, kl_coef=r.kl_coef,
      std_normalise=r.std_normalise, adv_eps=r.adv_eps,
      unbiased_kl=r.unbiased_kl, seq_mask=r.seq_mask,
      seq_mask_delta=r.seq_mask_delta, keep_routing=r.keep_routing,
      keep_sampling_mask=r.keep_sampling_mask, index_replay=r.index_replay)


def sampling_config(phase: PhaseConfig) -> sampling.SamplingConfig:
  r = phase.rl
  return sampling.SamplingConfig(r.temperature, r.top_k, r.top_p)


def rollout_config(phase: PhaseConfig, tok, greedy: bool = False,
                   group_size: int | None = None) -> R.RolloutConfig:
  """Samples of a phase; ``greedy``: one greedy answer per prompt (the
  held-out reward); ``group_size``: samples per prompt (default
  ``rl.group_size``). EOS is the newline token (the reward reads the first
  line) when it is one token; padding is token 0."""
  r = phase.rl
  nl = tok.encode("\n")
  scfg = sampling.SamplingConfig(0.0) if greedy else sampling_config(phase)
  g = 1 if greedy else (r.group_size if group_size is None else group_size)
  return R.RolloutConfig(group_size=g,
                         max_new_tokens=r.max_new_tokens,
                         eos_id=nl[0] if len(nl) == 1 else -1, pad_id=0,
                         sampling=scfg)


def heldout_key(seed: int) -> jax.Array:
  """The sampling key of eval_reward_sampled: one per run seed, the same at
  every evaluation."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), HELDOUT_STREAM)


def sampled_reward(reward_B: np.ndarray, n: int) -> tuple[float, float]:
  """(mean, standard error) of rewards of ``n`` samples per problem, rows
  problem-major: the SE is the std of the per-problem means over
  sqrt(problems) (0 with one problem)."""
  return mean_se(np.asarray(reward_B, np.float64).reshape(-1, n).mean(axis=1))


def mean_se(per_O: np.ndarray) -> tuple[float, float]:
  """(mean, std / sqrt(O)) of per-problem values (SE 0 for one value)."""
  per_O = np.asarray(per_O, np.float64)
  se = per_O.std(ddof=1) / np.sqrt(len(per_O)) if len(per_O) > 1 else 0.0
  return float(per_O.mean()), float(se)


def attention_mode(cfg: ExperimentConfig, phase: PhaseConfig) -> AttentionMode:
  """Dense, or DSA at the phase's top-k (``rl.attention``)."""
  return AttentionMode.of(cfg.model, phase.rl.attention, topk=phase.topk)


def problems(phase: PhaseConfig, tok, rng: np.random.Generator,
             n: int) -> list[rewards.Problem]:
  r = phase.rl
  if r.task == "arithmetic":
    return [rewards.arithmetic(rng, r.digits, r.ops, r.reverse)
            for _ in range(n)]
  if r.task == "digit_max":
    return [rewards.digit_max(rng, r.digits) for _ in range(n)]
  count = lambda text: len(tok.encode(text))  # noqa: E731
  return [rewards.retrieval(rng, r.task, r.length, count) for _ in range(n)]


def prompt_tokens(phase: PhaseConfig, tok, probs) -> jax.Array:
  """int32 [O, P], left-padded with token 0 (retrieval: P a multiple of
  64, so prompts of varying length share few compiled programs)."""
  out_OT = rewards.batch_prompts([tok.encode(p.prompt) for p in probs], 0)
  if phase.rl.task not in rewards.GENERATED:
    pad = -out_OT.shape[1] % 64
    out_OT = np.pad(out_OT, ((0, 0), (pad, 0)))
  return jnp.asarray(out_OT)


def safe_decode(tok) -> Callable[[list], str]:
  """tok.decode that drops ids beyond the tokenizer's vocabulary (a model
  may have a larger one and sample them)."""
  return lambda ids: tok.decode([i for i in ids if i < tok.vocab_size])


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def ref_logprobs(ref_params, ro: R.Rollout, model_cfg, gcfg, scfg, mode):
  """log pi_ref of the completion tokens, f32 [B, T]."""
  return policy.completion_logprobs(ref_params, ro, model_cfg, gcfg, scfg,
                                    mode)[0]


def make_update(cfg: ExperimentConfig, phase: PhaseConfig, tx,
                sched: optax.Schedule) -> Callable:
  """``update(state, frozen, ro, adv_B, ref_logp_BT) -> (state, metrics)``,
  jitted, the state donated."""
  gcfg = grpo_config(phase)
  scfg = sampling_config(phase)
  mode = attention_mode(cfg, phase)

  def loss_fn(trainable, frozen, ro, adv_B, ref_logp_BT):
    params = train.unflatten({**frozen, **trainable})
    logp_BT, _ = policy.completion_logprobs(params, ro, cfg.model, gcfg, scfg,
                                            mode)
    return grpo.loss(logp_BT, ro.logp, ref_logp_BT, adv_B, ro.mask, gcfg)

  def update(state, frozen, ro, adv_B, ref_logp_BT):
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["trainable"], frozen, ro, adv_B, ref_logp_BT)
    updates, opt = tx.update(grads, state["opt"], state["trainable"])
    out = {**out, "loss": loss, "grad_norm": optax.global_norm(grads),
           "lr": sched(state["step"])}
    return {"trainable": optax.apply_updates(state["trainable"], updates),
            "opt": opt, "step": state["step"] + 1}, out

  return jax.jit(update, donate_argnums=(0,))


def reference_copy(ref: Any, trainable: dict[str, Any]) -> dict[str, Any]:
  """The reference parameters, flat, with the leaves of the trainable
  paths copied: the train state's buffers may alias them and are donated
  at every update."""
  flat = train.flatten(ref)
  return {k: (jnp.copy(v) if k in trainable else v) for k, v in flat.items()}


class Stepper:
  """One grpo step (module docstring): ``step(state, frozen, s)`` ->
  (state, metrics as floats); ``heldout(state, frozen)`` -> the held-out
  metrics (eval_reward, eval_reward_sampled and its _se)."""

  def __init__(self, cfg: ExperimentConfig, phase: PhaseConfig, tok,
               ref_flat: dict[str, Any]):
    self.cfg, self.phase, self.tok = cfg, phase, tok
    self.ref = train.unflatten(ref_flat)
    labels = train.labels_for(phase, list(ref_flat))
    tx, self.sched = train.optimizer(
        dataclasses.replace(phase, steps=phase.steps * phase.rl.epochs),
        labels)
    self.update = make_update(cfg, phase, tx, self.sched)
    self.gcfg, self.mode = grpo_config(phase), attention_mode(cfg, phase)
    self.rcfg = rollout_config(phase, tok)
    self.decode = safe_decode(tok)
    self.key = jax.random.PRNGKey(cfg.seed)
    self.heldout_problems = problems(
        phase, tok, np.random.default_rng([cfg.seed, HELDOUT_STREAM]),
        phase.rl.eval_prompts)

  def step(self, state, frozen, global_step: int):
    r, g = self.phase.rl, self.phase.rl.group_size
    t0 = time.perf_counter()
    probs = problems(self.phase, self.tok,
                     np.random.default_rng([self.cfg.seed, global_step]),
                     r.prompts)
    params = train.unflatten({**frozen, **state["trainable"]})
    ro = R.rollout(params, prompt_tokens(self.phase, self.tok, probs),
                   jax.random.fold_in(self.key, global_step), self.cfg.model,
                   self.rcfg, self.mode)
    reward_B = rewards.score(probs, np.asarray(ro.completion), g,
                             self.decode, self.rcfg.eos_id)
    adv_B = grpo.advantages(jnp.asarray(reward_B), g, r.std_normalise,
                            r.adv_eps)
    ref_logp_BT = ref_logprobs(self.ref, ro, self.cfg.model, self.gcfg,
                               self.rcfg.sampling, self.mode)
    outs = []
    for _ in range(r.epochs):
      state, out = self.update(state, frozen, ro, adv_B, ref_logp_BT)
      outs.append(out)
    outs = [{k: float(v) for k, v in o.items()} for o in outs]
    vals = {k: float(np.mean([o[k] for o in outs])) for k in outs[0]}
    vals.update(mismatch=outs[0]["mismatch"], lr=outs[0]["lr"],
                reward_mean=float(np.mean(reward_B)),
                reward_std=float(np.std(reward_B)),
                response_len=float(np.mean(np.asarray(ro.lengths))))
    vals["samples_per_s"] = len(reward_B) / max(time.perf_counter() - t0,
                                                1e-9)
    return state, vals

  def heldout(self, state, frozen) -> dict[str, float]:
    """eval_reward: the mean reward of greedy answers to the held-out
    problems; with ``rl.eval_samples`` = n, eval_reward_sampled (and _se):
    that of n samples each, drawn with ``heldout_key``."""
    probs, n = self.heldout_problems, self.phase.rl.eval_samples
    params = train.unflatten({**frozen, **state["trainable"]})
    prompts_OT = prompt_tokens(self.phase, self.tok, probs)
    rcfg = rollout_config(self.phase, self.tok, greedy=True)
    ro = R.rollout(params, prompts_OT, self.key, self.cfg.model, rcfg,
                   self.mode)
    out = {"eval_reward": float(np.mean(rewards.score(
        probs, np.asarray(ro.completion), 1, self.decode, rcfg.eos_id)))}
    if n:
      mean, se = mean_se(self.sampled_per_problem(params))
      out.update(eval_reward_sampled=mean, eval_reward_sampled_se=se)
    return out

  def sampled_per_problem(self, params) -> np.ndarray:
    """f64 [O]: the mean reward of ``rl.eval_samples`` samples of each
    held-out problem, drawn with ``heldout_key`` (eval_reward_sampled is
    their mean)."""
    probs, n = self.heldout_problems, self.phase.rl.eval_samples
    rcfg = rollout_config(self.phase, self.tok, group_size=n)
    ro = R.rollout(params, prompt_tokens(self.phase, self.tok, probs),
                   heldout_key(self.cfg.seed), self.cfg.model, rcfg,
                   self.mode)
    reward_B = rewards.score(probs, np.asarray(ro.completion), n,
                             self.decode, rcfg.eos_id)
    return np.asarray(reward_B, np.float64).reshape(-1, n).mean(axis=1)


def run_phase(cfg: ExperimentConfig, phase: PhaseConfig, params: Any,
              data_iter, ckpts, meta: dict, writer, evaluate=None,
              start_step: int = 0, state: Any = None, mesh=None,
              sigs=None, *, tok) -> Any:
  """Trains a grpo phase from ``params`` (or a restored ``state``) as
  train.run_phase does (checkpoints every ``save_every`` steps, signals,
  non-finite losses); the data stream is not read, only its state saved.
  ``evaluate`` (the held-out LM loss) is not used: eval_reward is."""
  del evaluate
  mesh = S.make_mesh(cfg.mesh) if mesh is None else mesh
  ref = params
  if state is not None:  # resuming: the reference from its source
    ref = _phase_init(cfg, phase, meta, ckpts,
                      train.abstract_params(cfg, mesh), mesh=mesh)
  state, frozen, _, _ = train.init_state(cfg, phase, params, mesh, state)
  stepper = Stepper(cfg, phase, tok, reference_copy(ref, state["trainable"]))
  base = meta["global_base"]
  kept = functools.partial(ckpts.kept, meta["done"])
  bar = tqdm.tqdm(total=phase.steps, initial=start_step, desc=phase.name,
                  dynamic_ncols=True, leave=True, disable=not S.is_primary())
  shown: dict[str, float] = {}

  def heldout(s) -> dict[str, float]:
    due = s in (0, phase.steps) or (cfg.eval.every and s % cfg.eval.every == 0)
    if not (due and phase.rl.eval_prompts and S.is_primary()):
      return {}
    return stepper.heldout(state, frozen)

  def save(s):
    meta.update(phase_step=s)
    return ckpts.save(base + s, state, data_iter.get_state(), meta)

  if start_step == 0 and (ev := heldout(0)):
    writer.write(phase.name, base, ev)
    shown.update(ev)
  vals: dict[str, float] = {}
  with contextlib.nullcontext(sigs) if sigs else multihost.Signals() as sigs:
    stop = sigs.vote(mesh)  # several processes: all stop at the same step
    for s in range(start_step + 1, phase.steps + 1):
      state, vals = stepper.step(state, frozen, base + s)
      vals = _check_finite(phase, s, vals, kept)
      ev = heldout(s)  # one row per step: read_metrics keeps the last
      if ev or s % cfg.log_every == 0 or s == phase.steps:
        writer.write(phase.name, base + s, {**vals, **ev})
      shown.update(vals, **ev)
      bar.update(1)
      bar.set_postfix({k: f"{shown[k]:.3g}" for k in SHOWN if k in shown})
      if stop.now():
        saved = save(s)
        bar.close()
        if not saved:
          raise train.NonFiniteLoss(
              f"{sigs.name} at phase {phase.name!r} step {s}, whose state "
              f"is not finite: not saved, keeping {kept()}; lower "
              f"{train.lr_keys(phase)}")
        raise train.Interrupted(
            f"{sigs.name}: saved phase {phase.name!r} step {s} (checkpoint "
            f"step {base + s}); rerun the same command to resume")
      if cfg.save_every and s % cfg.save_every == 0 and s < phase.steps:
        save(s)
  bar.close()
  log.info("phase %s done: %d steps; last step: %s", phase.name, phase.steps,
           ", ".join(f"{k} {vals[k]:.4g}" for k in SHOWN[:3] + ("mismatch",)
                     if k in vals))
  return train.unflatten({**frozen, **state["trainable"]}), state
