"""Per-token log-probabilities of a rollout's completions under a policy's
parameters (pi_theta, or pi_ref with the frozen reference parameters), as
the GRPO switches say.

  logits     ``model.forward`` on ``tokens[:, :-1]``; the logits at
             P - 1 .. P + T - 2 score the T completion tokens.
  replay     (``GRPOConfig.index_replay``, sparse modes) the forward's mode
             has ``selection="given"`` and every layer attends to the key
             sets the rollout recorded (``Rollout.idx``, ``valid``); off, it
             re-runs the indexer's top-k. Other fields of ``mode`` (e.g.
             ``indexer_loss``, so the indexer trains on the replayed sets)
             pass through.
  keep mask  (``keep_sampling_mask``) log-softmax of z = logits /
             temperature over the recorded kept set K of each position
             (``sampling.kept_logprobs``, the sampler's own function); off,
             over all V tokens.
  routing    (``keep_routing``, MoE) the forward's MoE layers use the
             experts the rollout recorded (``Rollout.experts`` ->
             ``model.forward(experts_LBTK=)``; their weights still come
             from the current router); off, they re-route.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dsax import model
from dsax.attention import AttentionMode
from dsax.config import ModelConfig
from dsax.rl import sampling
from dsax.rl.grpo import GRPOConfig
from dsax.rl.rollout import Rollout


def routing_input(cfg: ModelConfig, gcfg: GRPOConfig,
                  ro: Rollout) -> dict[str, Any]:
  """Keyword arguments of ``model.forward`` that force the rollout's
  experts (keep routing): none without MoE or with the switch off."""
  if not (gcfg.keep_routing and cfg.moe.n_routed_experts):
    return {}
  if ro.experts is None:
    raise ValueError("GRPOConfig.keep_routing with a MoE model needs the "
                     "experts recorded at sampling (Rollout.experts is None)")
  return {"experts_LBTK": ro.experts}


def forward_mode(mode: AttentionMode, gcfg: GRPOConfig) -> AttentionMode:
  """The training forward's mode: ``mode`` with the recorded key sets
  (``selection="given"``) when replaying a sparse mode."""
  if mode.sparse and gcfg.index_replay:
    return dataclasses.replace(mode, selection="given")
  return mode


def completion_logprobs(params: dict[str, Any], ro: Rollout, cfg: ModelConfig,
                        gcfg: GRPOConfig, scfg: sampling.SamplingConfig,
                        mode: AttentionMode | None = None):
  """(logp_BT f32, LayerAux): log pi(completion token | context) for each
  of the T completion positions (module docstring), and the forward's aux
  (e.g. the indexer KL when ``mode.indexer_loss``)."""
  mode = AttentionMode.of(cfg) if mode is None else mode
  fmode = forward_mode(mode, gcfg)
  selection = None
  if fmode.selection == "given":
    if ro.idx is None:
      raise ValueError("index replay needs a rollout sampled with a sparse "
                       "mode (Rollout.idx is None)")
    selection = (ro.idx, ro.valid)
  logits_BSV, aux = model.forward(params, ro.tokens[:, :-1], cfg, mode=fmode,
                                  selection=selection,
                                  **routing_input(cfg, gcfg, ro))
  logits_BTV = logits_BSV[:, ro.prompt_len - 1:]
  return token_logprobs(logits_BTV, ro.completion, scfg,
                        ro.kept_bits if gcfg.keep_sampling_mask else None), aux


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array,
                   scfg: sampling.SamplingConfig,
                   kept_bits_BTW: jax.Array | None = None) -> jax.Array:
  """log softmax(logits / temperature) at the targets, over the kept set
  when ``kept_bits_BTW`` is given, else over all V; f32 [B, T]."""
  z_BTV = sampling.scaled(logits_BTV, scfg)
  if kept_bits_BTW is None:
    logp_BTV = jax.nn.log_softmax(z_BTV, axis=-1)
  else:
    mask_BTV = sampling.unpack(kept_bits_BTW, z_BTV.shape[-1])
    logp_BTV = sampling.kept_logprobs(z_BTV, mask_BTV)
  return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
