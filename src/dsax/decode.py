"""Latent-cache decoding: prefill, one-token steps in absorbed form, sampling.

The cache holds only ``[c_kv ; k_rope]`` per token and layer: C + R numbers,
against 2 * N * (H + R) (or N * (H + R + E)) for an expanded KV cache.

Sparse decoding (``attention="sparse"``, DSA) also caches the indexer key k_I
(J numbers per token and layer). A step scores the cache with the new token's
indexer query, I[s] = sum_i w[i] relu(q_I[i] . k_I[s]) for s <= t, keeps the
top-k, and attends only to those latent rows (``kernels.sparse_mla``): the
same selection and attention as the sparse forward at position t.

GQA models (``cfg.attention_type="gqa"``) cache k and v per kv head instead
(2 G H numbers per token and layer, ``model.CACHE_NAMES``) and attend to the
whole cache, or with DSA to the indexer's top-k rows of it
(``sparse_gqa_reference``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dsax import dsa, gqa, kernels, mla, model, moe
from dsax.config import ModelConfig
from dsax.kernels.reference import indexer_logits, sparse_gqa_reference


def init_cache(cfg: ModelConfig, batch: int, max_len: int,
               attention: str = "dense") -> dict[str, Any]:
  dt = jnp.dtype(cfg.compute_dtype)
  if cfg.attention_type == "gqa":
    row = (cfg.n_kv_heads, cfg.head_dim)
    cache = {n: jnp.zeros((cfg.n_layers, batch, max_len) + row, dt)
             for n in model.CACHE_NAMES["gqa"]}
  else:
    cache = {
        "kv": jnp.zeros((cfg.n_layers, batch, max_len, cfg.kv_lora_rank), dt),
        "k_rope": jnp.zeros(
            (cfg.n_layers, batch, max_len, cfg.qk_rope_head_dim), dt)}
  cache["length"] = jnp.zeros((), jnp.int32)
  if attention == "sparse":
    cache["index_k"] = jnp.zeros(
        (cfg.n_layers, batch, max_len, cfg.indexer.head_dim), dt)
  return cache


def prefill(params: dict[str, Any], tokens_BT: jax.Array, cfg: ModelConfig,
            max_len: int, attention: str = "dense", topk: int | None = None):
  """Runs the expanded forward on a prompt; returns (logits_BTV, cache).
  ``attention="sparse"``: the DSA forward at ``topk`` (None: the config's),
  and the cache holds the indexer keys too."""
  b, t = tokens_BT.shape
  if t > max_len:
    raise ValueError(f"prompt length {t} exceeds max_len {max_len}")
  opts = None
  if attention == "sparse":
    opts = dsa.DSAOptions(indexer_loss=False, topk=topk, return_keys=True)
  logits, aux = model.forward(params, tokens_BT, cfg, return_cache=True,
                              attention=attention, dsa_options=opts)
  names = model.CACHE_NAMES[cfg.attention_type] + (
      ("index_k",) if attention == "sparse" else ())

  def pad(x):  # [L, B, t, ...] -> [L, B, max_len, ...]
    return jnp.pad(x, [(0, 0), (0, 0), (0, max_len - t)]
                   + [(0, 0)] * (x.ndim - 3))

  cache = {n: pad(aux[n].astype(jnp.dtype(cfg.compute_dtype))) for n in names}
  cache["length"] = jnp.int32(t)
  return logits, cache


def sparse_select(p_indexer: dict[str, Any], h_B1D: jax.Array,
                  cq_B1Q: jax.Array | None, index_k_BSJ: jax.Array,
                  pos: jax.Array, topk: int, cfg: ModelConfig):
  """(idx_B1K, valid_B1K, k_new_B1J): the top-k cached keys s <= pos by the
  new token's indexer scores (ties to the lower index, invalid slots point at
  pos, as ``kernels.indexer_topk``), and its own indexer key."""
  b, max_len = index_k_BSJ.shape[:2]
  ang = dsa.indexer_angles(jnp.full((b, 1), pos, jnp.int32), cfg)
  q, k_new, w = dsa.indexer_project(p_indexer, h_B1D, cq_B1Q, ang, cfg)
  keys = jax.lax.dynamic_update_slice(
      index_k_BSJ, k_new.astype(index_k_BSJ.dtype), (0, pos, 0))
  visible = jnp.arange(max_len) <= pos
  scores = jnp.where(visible[None, None],
                     indexer_logits(q, keys, w), -jnp.inf)
  _, idx = jax.lax.top_k(scores, min(topk, max_len))
  valid = visible[idx]
  return jnp.where(valid, idx, pos).astype(jnp.int32), valid, keys


def gqa_step(p: dict[str, Any], h_B1D: jax.Array, ang: jax.Array,
             k_BSGH: jax.Array, v_BSGH: jax.Array, index_k_BSJ: jax.Array,
             pos: jax.Array, mask_B1S: jax.Array, sparse: bool, topk: int,
             cfg: ModelConfig):
  """One token of GQA against the layer's k/v cache (all rows s <= pos, or
  the indexer's top-k of them); returns (o_B1NH, k, v, index_k) updated."""
  q, k_new, v_new = gqa.project_qkv(p["attn"], h_B1D, ang, cfg)
  k = jax.lax.dynamic_update_slice(k_BSGH, k_new.astype(k_BSGH.dtype),
                                   (0, pos, 0, 0))
  v = jax.lax.dynamic_update_slice(v_BSGH, v_new.astype(v_BSGH.dtype),
                                   (0, pos, 0, 0))
  if not sparse:
    return gqa.masked_attention(q, k, v, mask_B1S, cfg), k, v, index_k_BSJ
  idx, valid, index_k = sparse_select(p["indexer"], h_B1D, None, index_k_BSJ,
                                      pos, topk, cfg)
  o, _ = sparse_gqa_reference(q, k, v, idx, valid, gqa.softmax_scale(cfg))
  return o, k, v, index_k


def decode_step(params: dict[str, Any], cache: dict[str, Any],
                tokens_B: jax.Array, cfg: ModelConfig,
                attention: str = "dense", topk: int | None = None):
  """Appends one token per row at position ``cache['length']``; returns
  (logits_BV, new cache). MLA attention is the absorbed (MQA) form; with
  ``attention="sparse"`` over the indexer's top-k rows only."""
  pos = cache["length"]
  sparse = attention == "sparse"
  topk = topk or cfg.indexer.topk
  b = tokens_B.shape[0]
  names = model.CACHE_NAMES[cfg.attention_type]
  max_len = cache[names[0]].shape[2]
  x = model.embed(params, tokens_B[:, None], cfg)
  ang = model.angles(jnp.full((b, 1), pos, jnp.int32), cfg)
  mask_B1S = jnp.broadcast_to((jnp.arange(max_len) <= pos)[None, None],
                              (b, 1, max_len))

  def layer(x, xs):
    p, kv_l, kr_l, ik_l = xs  # GQA: kv_l, kr_l hold k and v
    a = p["attn"]
    h = mla.rms_norm(x, p["attn_norm"], cfg.norm_eps)
    if cfg.attention_type == "gqa":
      o, kv_l, kr_l, ik_l = gqa_step(p, h, ang, kv_l, kr_l, ik_l, pos,
                                     mask_B1S, sparse, topk, cfg)
      return finish(x, o, p), (kv_l, kr_l, ik_l)
    q_nope, q_rope, cq = mla.project_q(a, h, ang, cfg)
    kv_new, kr_new = mla.project_kv(a, h, ang, cfg)
    kv_l = jax.lax.dynamic_update_slice(kv_l, kv_new.astype(kv_l.dtype),
                                        (0, pos, 0))
    kr_l = jax.lax.dynamic_update_slice(kr_l, kr_new.astype(kr_l.dtype),
                                        (0, pos, 0))
    if sparse:
      idx, valid, ik_l = sparse_select(p["indexer"], h, cq, ik_l, pos, topk,
                                       cfg)
      q_full = jnp.concatenate(
          [mla.absorb_query(q_nope, a["wkv_b"], cfg), q_rope], axis=-1)
      kv_full = jnp.concatenate([kv_l, kr_l.astype(kv_l.dtype)], axis=-1)
      o_lat, _ = kernels.sparse_mla(q_full, kv_full, idx, valid,
                                    mla.softmax_scale(cfg), cfg.kv_lora_rank,
                                    impl=cfg.kernel_impl)
      o = mla.expand_output(o_lat, a["wkv_b"], cfg)
    else:
      o = mla.absorbed_attention(q_nope, q_rope, kv_l, kr_l, a["wkv_b"],
                                 mask_B1S, cfg)
    return finish(x, o, p), (kv_l, kr_l, ik_l)

  def finish(x, o, p):
    x = x + mla.output_projection(o, p["attn"]["wo"]).astype(x.dtype)
    h = mla.rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    return x + moe.ffn(p["mlp"], h, cfg).astype(x.dtype)

  index_k = cache["index_k"] if sparse else jnp.zeros((cfg.n_layers, 0))
  rows = (cache[names[0]], cache[names[1]], index_k)
  outs, start = [], 0
  for segment in model.layer_segments(params, cfg):  # dense-MLP, MoE layers
    n = jax.tree.leaves(segment)[0].shape[0]
    x, ys = jax.lax.scan(layer, x, (segment,) + tuple(
        r[start:start + n] for r in rows))
    outs.append(ys)
    start += n
  kv, k_rope, index_k = (jnp.concatenate(parts, axis=0)
                         for parts in zip(*outs))
  logits = model.unembed(params, x, cfg)[:, 0]
  new = {names[0]: kv, names[1]: k_rope, "length": pos + 1}
  if sparse:
    new["index_k"] = index_k
  return logits, new


def sample(logits_BV: jax.Array, key: jax.Array,
           temperature: float = 0.0) -> jax.Array:
  """Greedy when temperature == 0, else a draw from softmax(logits / T)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV / temperature,
                                axis=-1).astype(jnp.int32)


def generate(params: dict[str, Any], prompt_BT: jax.Array, cfg: ModelConfig,
             steps: int, key: jax.Array | None = None,
             temperature: float = 0.0, attention: str = "dense",
             topk: int | None = None) -> jax.Array:
  """Prompt plus ``steps`` new tokens, [B, T + steps]; ``attention`` and
  ``topk`` as in ``prefill``."""
  if key is None:
    key = jax.random.PRNGKey(0)
  logits, cache = prefill(params, prompt_BT, cfg, prompt_BT.shape[1] + steps,
                          attention, topk)
  step = jax.jit(decode_step, static_argnums=(3, 4, 5))
  tok = sample(logits[:, -1], key, temperature)
  out = [tok]
  for i in range(steps - 1):
    logits_b, cache = step(params, cache, tok, cfg, attention, topk)
    tok = sample(logits_b, jax.random.fold_in(key, i + 1), temperature)
    out.append(tok)
  return jnp.concatenate([prompt_BT, jnp.stack(out, axis=1)], axis=1)
