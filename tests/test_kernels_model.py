"""The tiny DSA model with impl="pallas" (interpret mode on CPU) equals
impl="reference": logits, indexer KL and every parameter gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import init, tiny
from dsax import model
from dsax.dsa import DSAOptions

FAST = ({"xla_backend_optimization_level": 0}
        if jax.default_backend() == "cpu" else {})


def test_sparse_model_pallas_equals_reference():
  cfg = tiny(init_std=0.1)          # topk 16 < T: the selection is sparse
  params = init(cfg)
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40)))
  seg = jnp.asarray([[0] * 15 + [1] * 25, [0] * 40])

  def run(impl):
    def loss(p):
      logits, aux = model.forward(p, toks, cfg, seg, attention="sparse",
                                  dsa_options=DSAOptions(impl=impl))
      lm = -jnp.mean(jax.nn.log_softmax(logits)[:, :-1, :]
                     * jax.nn.one_hot(toks[:, 1:], 256))
      return lm + jnp.sum(aux["indexer_kl"]), (logits, aux["indexer_kl"])

    return jax.jit(jax.value_and_grad(loss, has_aux=True),
                   compiler_options=FAST)(params)

  (_, (logits, kl)), grads = run("pallas")
  (_, (rlogits, rkl)), rgrads = run("reference")
  np.testing.assert_allclose(logits, rlogits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(kl, rkl, rtol=1e-5, atol=1e-6)

  def check(path, g, r):
    scale = float(np.abs(np.asarray(r)).max()) + 1e-12
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(check, grads, rgrads)
