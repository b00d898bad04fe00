"""The tiny DSA model with model.kernel_impl="pallas" (interpret mode on CPU)
equals kernel_impl="reference": logits, indexer KL and every parameter
gradient, in the sparse phase, the dense warm-up (attention and the fused
warm-up KL kernel on its lse) and plain dense pretraining."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init, tiny
from dsax import model
from dsax.attention import AttentionMode
from dsax.config import ConfigError, override

FAST = ({"xla_backend_optimization_level": 0}
        if jax.default_backend() == "cpu" else {})

TOKS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40)))
SEG = jnp.asarray([[0] * 15 + [1] * 25, [0] * 40])


def run(cfg, attention, indexer_loss):
  """(logits, per-layer indexer KL or None), gradients of LM + sum(KL)."""
  params = init(cfg)
  mode = AttentionMode.of(cfg, attention, indexer_loss=indexer_loss)

  def loss(p):
    logits, aux = model.forward(p, TOKS, cfg, SEG, mode=mode)
    lm = -jnp.mean(jax.nn.log_softmax(logits)[:, :-1, :]
                   * jax.nn.one_hot(TOKS[:, 1:], 256))
    kl = aux.indexer_kl
    return lm + (0.0 if kl is None else jnp.sum(kl)), (logits, kl)

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                            compiler_options=FAST)(params)
  return out, grads


def check_impls_agree(attention, indexer_loss=True, **cfg_kw):
  # topk 16 < T = 40: the sparse selection is sparse. Query chunks of 16:
  # the warm-up KL runs over three chunks, the last one partial.
  cfg = tiny(init_std=0.1, attn_q_chunk=16, **cfg_kw)
  (logits, kl), grads = run(
      override(cfg, {"kernel_impl": "pallas"}), attention, indexer_loss)
  (rlogits, rkl), rgrads = run(cfg, attention, indexer_loss)
  np.testing.assert_allclose(logits, rlogits, rtol=1e-5, atol=1e-5)
  assert (kl is None) == (rkl is None)
  if kl is not None:
    assert float(jnp.min(rkl)) > 0.01        # a real divergence, not ~0
    np.testing.assert_allclose(kl, rkl, rtol=1e-5, atol=1e-6)

  def check(path, g, r):
    scale = float(np.abs(np.asarray(r)).max()) + 1e-12
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(check, grads, rgrads)
  assert any(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(
      grads["layers"]["indexer"])) == (kl is not None)


def test_sparse_model_pallas_equals_reference():
  check_impls_agree("sparse")


def test_dense_warmup_pallas_equals_reference():
  """The dense path through mla_flash and the warm-up KL kernel."""
  check_impls_agree("dense")


def test_dense_pretrain_pallas_equals_reference():
  check_impls_agree("dense", indexer_loss=False)


def test_kernel_impl_is_validated():
  with pytest.raises(ConfigError, match="model.kernel_impl.*'triton'"):
    override(tiny(), {"kernel_impl": "triton"})
