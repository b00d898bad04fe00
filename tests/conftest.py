"""Shared test setup: CPU, f32, the tiny model."""

import dataclasses
import math
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.extend  # noqa: E402
import pytest  # noqa: E402

# Compiling dominates the suite on CPU (hundreds of small programs on tiny
# arrays): XLA's CPU backend at optimisation level 0 compiles them about 40%
# faster (the kernel tests and test_sharding's workers already use it); the
# results differ from level 3 only in rounding (about 1 ulp). The backend
# reads XLA_FLAGS once, when it starts: start it here, then restore the
# environment, so the subprocesses tests launch run as they always have.
# Set xla_backend_optimization_level in XLA_FLAGS to choose another level.
_XLA_FLAGS = os.environ.get("XLA_FLAGS")
if (os.environ["JAX_PLATFORMS"] == "cpu"
    and "xla_backend_optimization_level" not in (_XLA_FLAGS or "")):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [
      _XLA_FLAGS, "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true"]))
  try:
    jax.devices()
  finally:
    if _XLA_FLAGS is None:
      del os.environ["XLA_FLAGS"]
    else:
      os.environ["XLA_FLAGS"] = _XLA_FLAGS

# No implicit rank broadcasting anywhere in the model or the tests: a missing
# axis is an error, not a silent broadcast.
jax.config.update("jax_numpy_rank_promotion", "raise")

from configs.tiny import model_config  # noqa: E402
from dsax import model  # noqa: E402
from dsax import params as P  # noqa: E402

# model.forward called eagerly compiles its layer scan again on every call;
# jitted, it compiles once per (cfg, mode, shapes) for the whole session, so
# tests that run the same model share the program. Same signature.
forward = jax.jit(model.forward, static_argnums=2, static_argnames="mode")


@pytest.fixture(scope="session")
def tiny_cfg():
  return model_config()


def tiny(**kw):
  """The tiny config with field overrides (nested groups via dataclasses)."""
  return dataclasses.replace(model_config(), **kw)


def init(cfg, seed=0):
  return P.init_params(cfg, jax.random.PRNGKey(seed))


def all_avals(jaxpr):
  """Every output aval of a jaxpr, sub-jaxprs (scan, remat, custom VJPs)
  included: what a memory test searches for a tensor that is too big."""
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield v.aval
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from all_avals(sub)


def largest_size(jaxpr) -> int:
  """Elements of the largest array a jaxpr (and its sub-jaxprs) forms."""
  return max(int(math.prod(a.shape)) for a in all_avals(jaxpr)
             if hasattr(a, "shape"))
