"""Decoding (dsax.decode): the latent-cache step equals the expanded forward
(dense and DSA, MLA with and without a q-latent, YaRN, MoE), the cache holds
only what it should, the decode selection is the forward's, and sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import forward, init, tiny
from dsax import decode, dsa, model
from dsax.attention import AttentionMode
from dsax.config import MoEConfig, RopeScaling
from dsax.kernels import reference
from test_model import _MOE


# Each branch once: the q-latent and its absence, YaRN off and on (they
# touch different parts of the step: the query projection; the angles and
# the softmax scale).
@pytest.mark.parametrize("q_lora_rank,yarn", [(32, False), (0, True)])
def test_absorbed_decode_matches_expanded_forward(q_lora_rank, yarn):
  # YaRN with original length 8 < sequence length 24 so the frequency
  # correction and mscale are both active.
  cfg = tiny(q_lora_rank=q_lora_rank, init_std=0.1, attn_q_chunk=8,
             rope_scaling=RopeScaling(enabled=yarn, factor=4.0,
                                      original_max_position=8))
  params = init(cfg)
  toks = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.vocab_size)
  logits, _ = forward(params, toks, cfg)
  assert float(jnp.std(logits)) > 0.1  # a non-trivial model
  prompt = 5
  first, cache = decode.prefill(params, toks[:, :prompt], cfg, 24)
  steps = [first]
  step = jax.jit(decode.decode_step, static_argnums=3)
  for t in range(prompt, 24):
    out, cache = step(params, cache, toks[:, t], cfg)
    steps.append(out[:, None])
  dec = jnp.concatenate(steps, axis=1)
  np.testing.assert_array_less(np.abs(np.asarray(dec - logits)).max(), 1e-4)
  # The cache holds only C + R numbers per token and layer.
  assert cache["kv"].shape[-1] + cache["k_rope"].shape[-1] == (
      cfg.kv_lora_rank + cfg.qk_rope_head_dim)


@pytest.mark.parametrize("first_k_dense", [1, 0])
def test_decode_with_moe_matches_forward(first_k_dense):
  """Decode scans the dense-MLP and MoE layer runs like the forward."""
  cfg = tiny(n_layers=3, init_std=0.1, moe=MoEConfig(
      **_MOE, first_k_dense=first_k_dense))
  params = init(cfg)
  toks = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
  logits, _ = forward(params, toks, cfg)
  first, cache = decode.prefill(params, toks[:, :5], cfg, 12)
  step = jax.jit(decode.decode_step, static_argnums=3)
  outs = [first]
  for t in range(5, 12):
    out, cache = step(params, cache, toks[:, t], cfg)
    outs.append(out[:, None])
  dec = jnp.concatenate(outs, axis=1)
  np.testing.assert_array_less(np.abs(np.asarray(dec - logits)).max(), 1e-4)


def _decode_all(params, toks, cfg, prompt, mode=None):
  """Logits of a prefill of ``prompt`` tokens then one step per token."""
  first, cache = decode.prefill(params, toks[:, :prompt], cfg, toks.shape[1],
                                mode)
  step = jax.jit(decode.decode_step, static_argnums=(3, 4))
  outs = [first]
  for t in range(prompt, toks.shape[1]):
    out, cache = step(params, cache, toks[:, t], cfg, mode)
    outs.append(out[:, None])
  return jnp.concatenate(outs, axis=1), cache


def test_sparse_decode_at_k_covering_the_cache_is_dense_decode():
  """With k >= every position, the top-k keeps every cached row: sparse
  decoding (through kernels.sparse_mla) equals the dense absorbed step."""
  cfg = tiny(init_std=0.1)
  cfg = dataclasses.replace(cfg, indexer=dataclasses.replace(cfg.indexer,
                                                             topk=16))
  params = init(cfg)
  toks = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, 256)
  dense, _ = _decode_all(params, toks, cfg, 4)
  sparse, cache = _decode_all(params, toks, cfg, 4,
                              AttentionMode.of(cfg, "sparse"))
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=0)
  assert "index_k" in cache and int(cache["length"]) == 16


def test_decode_selection_is_the_forward_selection():
  """dsa.select_cached at position t picks the same key set as the sparse
  forward's indexer top-k at t (the indices, as sets, in every layer)."""
  cfg = tiny(init_std=0.1, attn_q_chunk=8)
  cfg = dataclasses.replace(cfg, indexer=dataclasses.replace(
      cfg.indexer, topk=5, q_chunk=8))
  params = init(cfg)
  t_len = 20
  toks = jax.random.randint(jax.random.PRNGKey(5), (2, t_len), 0, 256)
  mode = AttentionMode.of(cfg, "sparse", indices=True, indexer_keys=True)
  _, aux = forward(params, toks, cfg, mode=mode)
  # Layer 0's input is the embedding, so its indexer inputs are known here.
  p0 = jax.tree.map(lambda x: x[0], params["layers"])

  @jax.jit
  def indexer_inputs(params, toks):
    h = model.attention_input(p0, model.embed(params, toks, cfg), cfg)
    cq = dsa.family(cfg).project(p0["attn"], h, dsa.family(cfg).angles(
        model.default_positions(toks), cfg), cfg).cq
    return h, cq

  @jax.jit
  def select(h, cq, keys, t):  # one program for every position t
    at_t = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
    return dsa.select_cached(p0["indexer"], at_t(h), at_t(cq), keys, t,
                             cfg.indexer.topk, cfg)

  h, cq = indexer_inputs(params, toks)
  keys = jnp.zeros_like(aux.index_k[0])
  for t in range(t_len):
    idx, valid, keys = select(h, cq, keys, jnp.int32(t))
    for b in range(2):
      ours = set(np.asarray(idx[b, 0])[np.asarray(valid[b, 0])].tolist())
      fwd = aux.idx[0, b, t][aux.valid[0, b, t]]
      assert ours == set(np.asarray(fwd).tolist()), (b, t)
      assert max(ours) <= t and len(ours) == min(5, t + 1)
  np.testing.assert_allclose(keys, aux.index_k[0], atol=1e-5)


def test_select_topk_semantics():
  """Ties go to the lower index; fewer visible keys than k leaves invalid
  slots that point at the query itself."""
  scores = jnp.asarray([[[1.0, 1.0, 3.0, 0.0], [2.0, 5.0, 5.0, 9.0]]])
  mask = jnp.asarray([[[True, True, False, False], [True, True, True, True]]])
  idx, valid = reference.select_topk(scores, mask, 3, jnp.asarray([1, 3]))
  np.testing.assert_array_equal(idx[0, 0], [0, 1, 1])
  np.testing.assert_array_equal(valid[0, 0], [True, True, False])
  np.testing.assert_array_equal(idx[0, 1], [3, 1, 2])
  assert bool(valid[0, 1].all()) and idx.dtype == jnp.int32


def test_sampling_and_generate():
  cfg = tiny(init_std=0.1)
  params = init(cfg)
  logits = jnp.asarray([[0.0, 3.0, 1.0], [2.0, -1.0, 0.0]])
  np.testing.assert_array_equal(decode.sample(logits, None), [1, 0])
  key = jax.random.PRNGKey(7)
  # 400 draws, each with its own key, in one vmapped program.
  draws = np.asarray(jax.vmap(lambda i: decode.sample(
      logits, jax.random.fold_in(key, i), temperature=1.0))(jnp.arange(400)))
  # Frequencies of a softmax draw: token 1 of row 0 has p = 0.84.
  assert abs((draws[:, 0] == 1).mean() - 0.844) < 0.06
  prompt = jax.random.randint(jax.random.PRNGKey(8), (2, 4), 0, 256)
  a = decode.generate(params, prompt, cfg, 5, key, temperature=1.0)
  b = decode.generate(params, prompt, cfg, 5, key, temperature=1.0)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[:, :4], prompt)


def test_decode_refuses_what_it_cannot_do():
  cfg = tiny()
  params = init(cfg)
  toks = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="exceeds max_len 4"):
    decode.prefill(params, toks, cfg, 4)
  with pytest.raises(ValueError, match="selection='given'"):
    decode.prefill(params, toks, cfg, 8, AttentionMode.of(
        cfg, "sparse", selection="given"))
