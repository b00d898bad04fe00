"""Rollouts: G samples per prompt from the latent-cache decode, with what a
GRPO step needs to score them as they were sampled.

``rollout(params, prompts_OT, key, cfg, rcfg, mode)`` prefills each of the O
prompts once (``decode.prefill_recorded``), repeats its cache G times, then
samples (``sampling.sample``) and steps (``decode.decode_step_recorded``)
until every row has emitted ``eos_id`` or ``max_new_tokens`` are out; a row
that has finished is fed ``pad_id``. Everything runs in one jitted
``while_loop`` (no host round trip per token). Rows are prompt-major: row
o * G + y is sample y of prompt o. Prompts of one call share a length P
(left-pad at the text or token level: ``rewards.batch_prompts``).

Per generated token (T = ``max_new_tokens`` positions) a ``Rollout`` holds
the sampler's log-probability and the kept set K (packed bits and count).
For a sparse ``mode`` it also holds the key sets of every layer at every
input position of the training forward, t = 0 .. P + T - 2 (the prompt's
from the prefill, the rest from the decode steps): that forward reads
``tokens[:, :-1]`` and its logits at P - 1 .. P + T - 2 score the
completion. Input positions the loop never reached (every row finished
early) hold a placeholder set (the query alone), so the replayed forward
stays finite there; they are masked out of the loss.

With MoE, the experts each MoE layer chose at every input position are
recorded the same way (``Rollout.experts``, placeholder: experts 0 .. K-1),
for keep routing (``model.forward(experts_LBTK=)``).

Axes beyond DESIGN's key: O prompts (B = O * G rows), W packed mask
words. P is the prompt length (a number, not an axis).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from dsax import decode
from dsax.attention import AttentionMode
from dsax.config import ModelConfig
from dsax.rl import sampling


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How rollouts are drawn (hashable: a static argument)."""
  group_size: int = 4          # G samples per prompt
  max_new_tokens: int = 16     # length cap
  eos_id: int = -1             # -1: no EOS, stop at the cap only
  pad_id: int = 0              # fed (and stored) after a row's EOS
  sampling: sampling.SamplingConfig = sampling.SamplingConfig()

  def __post_init__(self):
    if self.group_size < 1:
      raise ValueError(f"RolloutConfig.group_size must be >= 1, got "
                       f"{self.group_size}")
    if self.max_new_tokens < 1:
      raise ValueError(f"RolloutConfig.max_new_tokens must be >= 1, got "
                       f"{self.max_new_tokens}")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "mask", "logp", "kept_bits",
                                "kept_count", "idx", "valid", "experts"],
                   meta_fields=["prompt_len"])
@dataclasses.dataclass(frozen=True)
class Rollout:
  """B = O * G sampled sequences and their records.

  tokens      [B, P + T] int32  prompt then completion (pad_id after EOS)
  mask        [B, T] bool       generated tokens, EOS included
  logp        [B, T] f32        log pi_old: the sampler's, renormalised
                                over the kept set
  kept_bits   [B, T, W] uint32  the kept set K per token (sampling.unpack)
  kept_count  [B, T] int32      |K|
  idx, valid  [L, B, P+T-1, K]  the DSA key sets of every layer at every
                                input position (None when dense)
  experts     [L_moe, B, P+T-1, n_activated] int32: the experts of each
              MoE layer at every input position (None without MoE)
  prompt_len  P (static)
  """
  tokens: jax.Array
  mask: jax.Array
  logp: jax.Array
  kept_bits: jax.Array
  kept_count: jax.Array
  idx: jax.Array | None
  valid: jax.Array | None
  experts: jax.Array | None
  prompt_len: int

  @property
  def completion(self) -> jax.Array:
    return self.tokens[:, self.prompt_len:]

  @property
  def lengths(self) -> jax.Array:
    return jnp.sum(self.mask, axis=-1)


def placeholder_selection(n_layers: int, b: int, t: int, k: int):
  """Key sets that select only the query itself: (idx_LBTK, valid_LBTK),
  slot 0 valid, the others invalid (pointing at the query too)."""
  idx_LBTK = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None],
                              (n_layers, b, t, k))
  valid_LBTK = jnp.broadcast_to(jnp.arange(k) == 0, (n_layers, b, t, k))
  return idx_LBTK, valid_LBTK


def _widen(idx_LBTK, valid_LBTK, k: int, start: int):
  """Pads the slot axis to k with invalid slots that point at the query
  (its position = start + t), as ``select_topk`` lays them out."""
  pad = k - idx_LBTK.shape[-1]
  if pad == 0:
    return idx_LBTK, valid_LBTK
  q_T = start + jnp.arange(idx_LBTK.shape[2], dtype=jnp.int32)
  fill = jnp.broadcast_to(q_T[:, None], idx_LBTK.shape[:3] + (pad,))
  return (jnp.concatenate([idx_LBTK, fill], -1),
          jnp.concatenate([valid_LBTK, jnp.zeros(fill.shape, bool)], -1))


def rollout(params: dict[str, Any], prompts_OT: jax.Array, key: jax.Array,
            cfg: ModelConfig, rcfg: RolloutConfig,
            mode: AttentionMode | None = None) -> Rollout:
  """G samples for each of the O prompts (module docstring); ``mode`` as in
  ``decode.prefill`` (dense by default; sparse: DSA at ``mode.topk``)."""
  mode = AttentionMode.of(cfg) if mode is None else mode
  return _rollout(params, prompts_OT, key, cfg, rcfg, mode)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _rollout(params, prompts_OT, key, cfg, rcfg, mode) -> Rollout:
  o, p = prompts_OT.shape
  g, n = rcfg.group_size, rcfg.max_new_tokens
  b = o * g
  t_in = p + n - 1  # the training forward's input positions
  scfg = rcfg.sampling
  logits_OTV, cache, rec = decode.prefill_recorded(
      params, prompts_OT, cfg, t_in, mode)
  cache = {name: (a if name == "length" else jnp.repeat(a, g, axis=1))
           for name, a in cache.items()}
  first = sampling.sample(jnp.repeat(logits_OTV[:, -1], g, axis=0),
                          jax.random.fold_in(key, 0), scfg)
  w = first.bits.shape[-1]
  done_B = first.token == rcfg.eos_id
  tokens_BT = jnp.full((b, n), rcfg.pad_id, jnp.int32).at[:, 0].set(
      first.token)
  mask_BT = jnp.zeros((b, n), bool).at[:, 0].set(True)
  logp_BT = jnp.zeros((b, n), jnp.float32).at[:, 0].set(first.logp)
  bits_BTW = jnp.zeros((b, n, w), jnp.uint32).at[:, 0].set(first.bits)
  count_BT = jnp.zeros((b, n), jnp.int32).at[:, 0].set(first.count)
  # The key sets and the experts live in tuples, empty when not recorded,
  # so the loop state has one structure for every model.
  sel, routed = (), ()
  n_moe = (cfg.n_layers - cfg.moe.first_k_dense if cfg.moe.n_routed_experts
           else 0)
  if n_moe:
    n_act = cfg.moe.n_activated
    experts_LBTK = jnp.broadcast_to(jnp.arange(n_act, dtype=jnp.int32),
                                    (n_moe, b, t_in, n_act))
    routed = (experts_LBTK.at[:, :, :p].set(
        jnp.repeat(rec.experts, g, axis=1)),)
  if mode.sparse:
    kk = min(mode.topk, t_in)
    idx_LBTK, valid_LBTK = placeholder_selection(cfg.n_layers, b, t_in, kk)
    pidx_LOTK, pvalid_LOTK = _widen(rec.idx, rec.valid, kk, 0)
    rep = functools.partial(jnp.repeat, repeats=g, axis=1)
    idx_LBTK = idx_LBTK.at[:, :, :p].set(rep(pidx_LOTK))
    valid_LBTK = valid_LBTK.at[:, :, :p].set(rep(pvalid_LOTK))
    sel = (idx_LBTK, valid_LBTK)
  state = (jnp.int32(1), cache, done_B, tokens_BT, mask_BT, logp_BT,
           bits_BTW, count_BT, sel, routed)

  def cond(state):
    i, done_B = state[0], state[2]
    return (i < n) & ~jnp.all(done_B)

  def body(state):
    (i, cache, done_B, tokens_BT, mask_BT, logp_BT, bits_BTW, count_BT, sel,
     routed) = state
    fed_B = tokens_BT[:, i - 1]  # pad_id once a row is done
    logits_BV, cache, rec = decode.decode_step_recorded(params, cache, fed_B,
                                                        cfg, mode)
    d = sampling.sample(logits_BV, jax.random.fold_in(key, i), scfg)
    live_B = ~done_B
    tok_B = jnp.where(live_B, d.token, rcfg.pad_id)
    tokens_BT = tokens_BT.at[:, i].set(tok_B)
    mask_BT = mask_BT.at[:, i].set(live_B)
    logp_BT = logp_BT.at[:, i].set(jnp.where(live_B, d.logp, 0.0))
    bits_BTW = bits_BTW.at[:, i].set(d.bits)
    count_BT = count_BT.at[:, i].set(d.count)
    pos = p + i - 1  # the input position this step read

    def put(buf_LBT_, new_LB1_):
      return jax.lax.dynamic_update_index_in_dim(buf_LBT_, new_LB1_[:, :, 0],
                                                 pos, 2)

    if mode.sparse:
      sel = (put(sel[0], rec.idx), put(sel[1], rec.valid))
    if n_moe:
      routed = (put(routed[0], rec.experts),)
    done_B = done_B | (tok_B == rcfg.eos_id)
    return (i + 1, cache, done_B, tokens_BT, mask_BT, logp_BT, bits_BTW,
            count_BT, sel, routed)

  state = jax.lax.while_loop(cond, body, state)
  _, _, _, tokens_BT, mask_BT, logp_BT, bits_BTW, count_BT, sel, routed = (
      state)
  idx, valid = sel if mode.sparse else (None, None)
  return Rollout(
      tokens=jnp.concatenate([jnp.repeat(prompts_OT, g, axis=0), tokens_BT],
                             axis=1),
      mask=mask_BT, logp=logp_BT, kept_bits=bits_BTW, kept_count=count_BT,
      idx=idx, valid=valid, experts=routed[0] if n_moe else None,
      prompt_len=p)
