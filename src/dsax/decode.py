"""Latent-cache decoding: prefill, one-token steps in absorbed form, sampling.

The cache holds only ``[c_kv ; k_rope]`` per token and layer: C + R numbers,
against 2 * N * (H + R) (or N * (H + R + E)) for an expanded KV cache.

A step is the forward's layer for one token: ``model.attention_input``, the
family's ``project`` (its rows written into the cache at ``cache['length']``),
then either attention to every cached row s <= t (``masked_attention``,
absorbed form for MLA) or, with a sparse ``AttentionMode`` (DSA), the
indexer's top-k of the cached rows (``dsa.select_cached``: the new token's
indexer query against the cached indexer keys, J numbers per token and
layer) through the same ``sparse_attention`` as the forward, then
``model.finish_layer``. The selection and attention equal the sparse
forward's at position t.

GQA models (``cfg.attention_type="gqa"``) cache k and v per kv head instead
(2 G H numbers per token and layer, ``model.CACHE_NAMES``).

``prefill_recorded`` and ``decode_step_recorded`` also return a ``Record``
of what each layer chose (the DSA key sets), which a training forward
replays with ``AttentionMode(selection="given")`` (RL index replay,
dsax.rl).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dsax import dsa, model
from dsax.attention import AttentionMode
from dsax.config import ModelConfig


def _mode(cfg: ModelConfig, mode: AttentionMode | None) -> AttentionMode:
  mode = AttentionMode.of(cfg) if mode is None else mode
  if mode.selection != "indexer":
    raise ValueError(f"decoding selects with the indexer; got "
                     f"mode.selection={mode.selection!r}")
  return mode


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Record:
  """What a prefill (T = the prompt) or a decode step (T = 1) chose in every
  layer, for replay in a training forward: the DSA key sets
  (``model.forward(selection=(idx, valid))`` with ``mode.selection ==
  "given"``; None when dense; K = min(topk, keys the call saw): the prompt
  length for a prefill, the cache's max_len for a step) and the experts of
  the MoE layers (``model.forward(experts_LBTK=)``, keep routing; None
  without MoE)."""
  idx: jax.Array | None = None    # [L, B, T, K] int32
  valid: jax.Array | None = None  # [L, B, T, K] bool
  experts: jax.Array | None = None  # [L_moe, B, T, n_activated] int32


def prefill(params: dict[str, Any], tokens_BT: jax.Array, cfg: ModelConfig,
            max_len: int, mode: AttentionMode | None = None):
  """Runs the expanded forward on a prompt; returns (logits_BTV, cache).
  A sparse ``mode``: the DSA forward at ``mode.topk``, and the cache holds
  the indexer keys too."""
  logits_BTV, cache, _ = _prefill(params, tokens_BT, cfg, max_len, mode,
                                  record=False)
  return logits_BTV, cache


def prefill_recorded(params: dict[str, Any], tokens_BT: jax.Array,
                     cfg: ModelConfig, max_len: int,
                     mode: AttentionMode | None = None):
  """``prefill`` that also returns the ``Record`` of the prompt's key sets:
  (logits_BTV, cache, Record)."""
  return _prefill(params, tokens_BT, cfg, max_len, mode, record=True)


def _prefill(params, tokens_BT, cfg, max_len, mode, record):
  b, t = tokens_BT.shape
  if t > max_len:
    raise ValueError(f"prompt length {t} exceeds max_len {max_len}")
  mode = dataclasses.replace(_mode(cfg, mode), indexer_loss=False,
                             recall=False, indices=False, cache=True)
  mode = dataclasses.replace(mode, indices=record and mode.sparse,
                             experts=record)
  mode = dataclasses.replace(mode, indexer_keys=mode.sparse)
  logits_BTV, aux = model.forward(params, tokens_BT, cfg, mode=mode)
  rows = dict(zip(model.CACHE_NAMES[cfg.attention_type], aux.cache))
  if mode.sparse:
    rows["index_k"] = aux.index_k

  def pad(x_LBT_):  # [L, B, t, ...] -> [L, B, max_len, ...]
    return jnp.pad(x_LBT_, [(0, 0), (0, 0), (0, max_len - t)]
                   + [(0, 0)] * (x_LBT_.ndim - 3))

  cache = {n: pad(r.astype(jnp.dtype(cfg.compute_dtype)))
           for n, r in rows.items()}
  cache["length"] = jnp.int32(t)
  rec = Record(aux.idx, aux.valid, aux.experts) if record else Record()
  return logits_BTV, cache, rec


def decode_step(params: dict[str, Any], cache: dict[str, Any],
                tokens_B: jax.Array, cfg: ModelConfig,
                mode: AttentionMode | None = None):
  """Appends one token per row at position ``cache['length']``; returns
  (logits_BV, new cache). MLA attention is the absorbed (MQA) form; with a
  sparse ``mode`` over the indexer's top-k rows only."""
  logits_BV, new, _ = decode_step_recorded(params, cache, tokens_B, cfg, mode)
  return logits_BV, new


def decode_step_recorded(params: dict[str, Any], cache: dict[str, Any],
                         tokens_B: jax.Array, cfg: ModelConfig,
                         mode: AttentionMode | None = None):
  """``decode_step`` that also returns the ``Record`` of the step's key sets
  (T = 1): (logits_BV, new cache, Record)."""
  mode = _mode(cfg, mode)
  fam = dsa.family(cfg)
  pos = cache["length"]
  b = tokens_B.shape[0]
  names = model.CACHE_NAMES[cfg.attention_type]
  max_len = cache[names[0]].shape[2]
  x_B1D = model.embed(params, tokens_B[:, None], cfg)
  ang_B1R = fam.angles(jnp.full((b, 1), pos, jnp.int32), cfg)
  mask_B1S = jnp.broadcast_to((jnp.arange(max_len) <= pos)[None, None],
                              (b, 1, max_len))

  def write(row_BS_, new_B1_):
    start = (0, pos) + (0,) * (row_BS_.ndim - 2)
    return jax.lax.dynamic_update_slice(row_BS_, new_B1_.astype(row_BS_.dtype),
                                        start)

  def layer(x_B1D, xs):
    p, rows, index_k_BSJ = xs
    h_B1D = model.attention_input(p, x_B1D, cfg)
    proj = fam.project(p["attn"], h_B1D, ang_B1R, cfg)
    rows = tuple(write(r, new) for r, new in zip(rows, proj.rows))
    chosen = ()
    if mode.sparse:
      idx_B1K, valid_B1K, index_k_BSJ = dsa.select_cached(
          p["indexer"], h_B1D, proj.cq, index_k_BSJ, pos, mode.topk, cfg)
      o_B1NE, _ = fam.sparse_attention(p["attn"], proj, rows, idx_B1K,
                                       valid_B1K, cfg, mode.impl)
      chosen = (idx_B1K, valid_B1K)
    else:
      o_B1NE = fam.masked_attention(p["attn"], proj, rows, mask_B1S, cfg)
    x_B1D, moe_aux = model.finish_layer(p, x_B1D, o_B1NE, cfg)
    experts_B1K = None if moe_aux is None else moe_aux.experts
    return x_B1D, ((rows, index_k_BSJ, chosen), experts_B1K)

  index_k = cache["index_k"] if mode.sparse else jnp.zeros((cfg.n_layers, 0))
  rows = tuple(cache[n] for n in names)
  outs, experts_LB1K, start = [], None, 0
  for segment in model.layer_segments(params, cfg):  # dense-MLP, MoE layers
    n = jax.tree.leaves(segment)[0].shape[0]
    part = jax.tree.map(lambda a: a[start:start + n], (rows, index_k))
    x_B1D, (ys, seg_experts) = jax.lax.scan(layer, x_B1D, (segment,) + part)
    outs.append(ys)
    if seg_experts is not None:  # the one MoE segment: the last L_moe layers
      experts_LB1K = seg_experts
    start += n
  rows, index_k, chosen = jax.tree.map(
      lambda *a: jnp.concatenate(a, axis=0), *outs)
  logits_BV = model.unembed(params, x_B1D, cfg)[:, 0]
  new = dict(zip(names, rows), length=pos + 1)
  if mode.sparse:
    new["index_k"] = index_k
  return logits_BV, new, Record(*chosen, experts=experts_LB1K)


def sample(logits_BV: jax.Array, key: jax.Array,
           temperature: float = 0.0) -> jax.Array:
  """Greedy when temperature == 0, else a draw from softmax(logits / T)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV / temperature,
                                axis=-1).astype(jnp.int32)


def generate(params: dict[str, Any], prompt_BT: jax.Array, cfg: ModelConfig,
             steps: int, key: jax.Array | None = None,
             temperature: float = 0.0,
             mode: AttentionMode | None = None) -> jax.Array:
  """Prompt plus ``steps`` new tokens, [B, T + steps]; ``mode`` as in
  ``prefill`` (dense by default; sparse: DSA at ``mode.topk``)."""
  if key is None:
    key = jax.random.PRNGKey(0)
  mode = _mode(cfg, mode)
  logits_BTV, cache = prefill(params, prompt_BT, cfg,
                              prompt_BT.shape[1] + steps, mode)
  step = jax.jit(decode_step, static_argnums=(3, 4))
  tok_B = sample(logits_BTV[:, -1], key, temperature)
  out = [tok_B]
  for i in range(steps - 1):
    logits_BV, cache = step(params, cache, tok_B, cfg, mode)
    tok_B = sample(logits_BV, jax.random.fold_in(key, i + 1), temperature)
    out.append(tok_B)
  return jnp.concatenate([prompt_BT, jnp.stack(out, axis=1)], axis=1)
