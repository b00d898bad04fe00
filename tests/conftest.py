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

# No implicit rank broadcasting anywhere in the model or the tests: a missing
# axis is an error, not a silent broadcast.
jax.config.update("jax_numpy_rank_promotion", "raise")

from configs.tiny import model_config  # noqa: E402
from dsax import params as P  # noqa: E402


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
