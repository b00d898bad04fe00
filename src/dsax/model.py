"""The decoder: embedding, L x (RMSNorm -> MLA or GQA -> RMSNorm -> SwiGLU
or DeepSeekMoE), head.

``forward(params, tokens_BT, cfg, segment_ids_BT=None, mode=...) ->
(logits_BTV, LayerAux)`` is causal and never attends across packed-document
boundaries (segment ids); ``mode`` (``dsax.attention.AttentionMode``) says
dense or sparse and what to report. A layer is ``attention_input`` (RMSNorm),
the family's ``project`` (MLA or GQA, ``dsa.family``), ``dsa.attend`` and
``finish_layer``; the decode step (dsax.decode) uses the same pieces.
Layers are stacked on a leading axis and scanned (with MoE, in two runs: the
first k dense-MLP layers, then the MoE layers; see ``layer_segments``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from dsax import context, dsa, mla, moe
from dsax import expert_parallel as EP
from dsax.attention import AttentionMode
from dsax.config import ModelConfig

# What a decode cache holds per token and layer, by cfg.attention_type.
CACHE_NAMES = {"mla": ("kv", "k_rope"), "gqa": ("k", "v")}


swiglu = moe.swiglu


def layer_segments(params: dict[str, Any], cfg: ModelConfig) -> list[Any]:
  """Runs of layers that scan with one parameter structure, in order; each
  layer's feed-forward is under "mlp" (see dsax.moe.ffn). Without MoE: all
  of ``params["layers"]``. With MoE: the first k layers with
  ``params["dense_mlp"]``, then the other L - k with ``params["moe"]``."""
  layers = params["layers"]
  if not cfg.moe.n_routed_experts:
    return [layers]
  k = cfg.moe.first_k_dense
  head = jax.tree.map(lambda a: a[:k], layers)
  tail = jax.tree.map(lambda a: a[k:], layers)
  segments = [dict(head, mlp=params["dense_mlp"])] if k else []
  return segments + [dict(tail, mlp=params["moe"])]


def embed(params: dict[str, Any], tokens_BT: jax.Array,
          cfg: ModelConfig) -> jax.Array:
  return EP.lookup_table(params["embed"])[tokens_BT].astype(
      jnp.dtype(cfg.compute_dtype))


def final_hidden(params: dict[str, Any], x_BTD: jax.Array,
                 cfg: ModelConfig) -> jax.Array:
  """The final RMSNorm: the hidden state h_BTD the output head reads."""
  return mla.rms_norm(x_BTD, params["final_norm"], cfg.norm_eps)


def head_weights(params: dict[str, Any], cfg: ModelConfig) -> jax.Array:
  """The output head w_DV: the embedding transposed when tied."""
  return params["embed"].T if cfg.tie_embeddings else params["head"]


def head_logits(h_BTD: jax.Array, w_DV: jax.Array,
                cfg: ModelConfig) -> jax.Array:
  """logits_BTV = h_BTD @ w_DV, inputs in compute_dtype, f32 out."""
  cdt = jnp.dtype(cfg.compute_dtype)
  return jnp.einsum("btd,dv->btv", h_BTD.astype(cdt), w_DV.astype(cdt),
                    preferred_element_type=jnp.float32)


def unembed(params: dict[str, Any], x_BTD: jax.Array,
            cfg: ModelConfig) -> jax.Array:
  return head_logits(final_hidden(params, x_BTD, cfg),
                     head_weights(params, cfg), cfg)


def default_positions(tokens_BT: jax.Array) -> jax.Array:
  b, t = tokens_BT.shape
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def attention_input(p: dict[str, Any], x_BTD: jax.Array,
                    cfg: ModelConfig) -> jax.Array:
  """The normalised hidden state h_BTD that the attention and indexer read."""
  return mla.rms_norm(x_BTD, p["attn_norm"], cfg.norm_eps)


def finish_layer(p: dict[str, Any], x_BTD: jax.Array, o_BTNE: jax.Array,
                 cfg: ModelConfig, experts_BTK: jax.Array | None = None,
                 mask_BT: jax.Array | None = None
                 ) -> tuple[jax.Array, moe.MoEAux | None]:
  """The rest of a layer after the core attention: output projection,
  residual, RMSNorm, feed-forward (SwiGLU or MoE), residual. Shared by the
  forward and the decode step. Returns (x_BTD, the MoE layer's MoEAux or
  None); ``experts_BTK`` forces an MoE layer's experts, ``mask_BT`` marks
  the tokens its load statistics count (dsax.moe.ffn)."""
  x_BTD = x_BTD + mla.output_projection(o_BTNE, p["attn"]["wo"]).astype(
      x_BTD.dtype)
  h_BTD = mla.rms_norm(x_BTD, p["mlp_norm"], cfg.norm_eps)
  y_BTD, moe_aux = moe.ffn(p["mlp"], h_BTD, cfg, experts_BTK, mask_BT)
  return x_BTD + y_BTD.astype(x_BTD.dtype), moe_aux


def forward(params: dict[str, Any], tokens_BT: jax.Array, cfg: ModelConfig,
            segment_ids_BT: jax.Array | None = None, *,
            mode: AttentionMode | None = None,
            positions_BT: jax.Array | None = None,
            embeddings_BTD: jax.Array | None = None,
            selection: tuple[jax.Array, jax.Array] | None = None,
            experts_LBTK: jax.Array | None = None, head: bool = True,
            context_parallel: bool = False):
  """Logits and aux: ``(logits_BTV, LayerAux)``; with ``head=False``,
  ``(h_BTD, LayerAux)``: the final-normed hidden state (``final_hidden``)
  instead of the logits (dsax.lm_loss forms them chunk by chunk).

  ``mode`` (default ``AttentionMode.of(cfg)``: dense, nothing extra) says
  how every layer attends and what it reports; ``LayerAux``'s fields are
  stacked on a leading L axis (per-layer scalars [L], per-token arrays
  [L, B, ...]); with ``mode.cache`` its ``cache`` holds the rows a decode
  cache keeps (``CACHE_NAMES``). ``selection = (idx_LBTK, valid_LBTK)``
  gives every layer's key sets when ``mode.selection == "given"`` (replay).
  ``embeddings_BTD`` replaces the token embedding (for gradient tests).
  With MoE, ``LayerAux.expert_load`` [L_moe, X] and ``balance_loss``
  [L_moe] (and ``experts`` [L_moe, B, T, K] with ``mode.experts``) cover
  the L_moe = L - first_k_dense MoE layers, counting the tokens of segment
  id > 0 when ``segment_ids_BT`` is given (dsax.data: 0 is padding);
  ``experts_LBTK`` forces those layers' experts (keep routing: the ones a
  sampler recorded), their weights still from the current router.
  ``context_parallel``: the rows are in the zig-zag layout of the traced
  mesh's ``sequence`` axis (``dsax.context.layout_batch``) and every layer
  attends per shard with the latent keys all-gathered (``context.attend``;
  without a mesh or with one shard, the plain forward).
  """
  mode = AttentionMode.of(cfg) if mode is None else mode
  if (selection is None) != (mode.selection != "given"):
    raise ValueError("forward: selection (idx_LBTK, valid_LBTK) is given "
                     "exactly when mode.selection == 'given', got "
                     f"selection={'set' if selection is not None else None} "
                     f"with mode.selection={mode.selection!r}")
  n_moe = (cfg.n_layers - cfg.moe.first_k_dense if cfg.moe.n_routed_experts
           else 0)
  if experts_LBTK is not None and experts_LBTK.shape[:2] != (
      n_moe, tokens_BT.shape[0]):
    raise ValueError(f"forward: experts_LBTK has shape {experts_LBTK.shape}; "
                     f"want [L_moe={n_moe}, B={tokens_BT.shape[0]}, T, K] "
                     "(the MoE layers only)")
  if positions_BT is None:
    positions_BT = default_positions(tokens_BT)
  mask_BT = None if segment_ids_BT is None else segment_ids_BT > 0
  fam = dsa.family(cfg)
  x_BTD = (embed(params, tokens_BT, cfg) if embeddings_BTD is None
           else embeddings_BTD)
  ang_BTR = fam.angles(positions_BT, cfg)
  ang_i_BTR = (dsa.indexer_angles(positions_BT, cfg) if mode.uses_indexer
               else None)
  attend = dsa.attend
  if context_parallel and context.shards() > 1:
    attend = functools.partial(
        context.attend,
        key_segment_ids_BS=context.key_segments(segment_ids_BT))

  def layer(x_BTD, xs):
    p, given, experts_BTK = xs
    h_BTD = attention_input(p, x_BTD, cfg)
    proj = fam.project(p["attn"], h_BTD, ang_BTR, cfg)
    o_BTNE, aux = attend(p, h_BTD, proj, mode, cfg, segment_ids_BT,
                         ang_i_BTR, given)
    x_BTD, moe_aux = finish_layer(p, x_BTD, o_BTNE, cfg, experts_BTK,
                                  mask_BT)
    return x_BTD, (aux, moe_aux)

  if cfg.remat:
    layer = jax.checkpoint(layer)
  auxes, moe_aux, start = [], None, 0
  for segment in layer_segments(params, cfg):
    n = jax.tree.leaves(segment)[0].shape[0]
    given = (None if selection is None
             else jax.tree.map(lambda a: a[start:start + n], selection))
    forced = experts_LBTK if "router" in segment["mlp"] else None
    x_BTD, (aux, seg_moe) = jax.lax.scan(
        layer, x_BTD, (segment, given, forced),
        unroll=min(cfg.scan_unroll, n))
    auxes.append(aux)
    moe_aux = seg_moe if seg_moe is not None else moe_aux
    start += n
  aux = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *auxes)
  if moe_aux is not None:  # one MoE segment: the last L_moe layers
    aux = dataclasses.replace(
        aux, expert_load=moe_aux.load, balance_loss=moe_aux.balance,
        experts=moe_aux.experts if mode.experts else None)
  if not head:
    return final_hidden(params, x_BTD, cfg), aux
  return unembed(params, x_BTD, cfg), aux


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Next-token negative log-likelihood per position, f32 [B, T]."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def lm_loss(logits_BTV: jax.Array, targets_BT: jax.Array,
            weights_BT: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross entropy over weighted positions (f32)."""
  return mean_nll(token_nll(logits_BTV, targets_BT), weights_BT)


def mean_nll(nll_BT: jax.Array, weights_BT: jax.Array | None = None
             ) -> jax.Array:
  """sum_t w_t nll_t / max(sum_t w_t, 1); the plain mean without weights."""
  if weights_BT is None:
    return nll_BT.mean()
  w_BT = weights_BT.astype(jnp.float32)
  return (nll_BT * w_BT).sum() / jnp.maximum(w_BT.sum(), 1.0)
