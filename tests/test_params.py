"""Parameters declared once (dsax.params): shapes against hand-written tables
for each family, logical axes against the sharding table, init statistics,
dtypes and keys. tests/test_model.py checks count_tree == param_count and
that one key gives one init; this file checks what those do not."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init, tiny
from dsax import params as P
from dsax import sharding as S
from dsax.config import MeshConfig, MoEConfig

# The tiny config (configs/tiny.py): D 64, V 256, L 2, N 4, Q 32, C 32, H 16,
# R 8, E 16, F 128; indexer I 4, J 32. GQA below: G 2, head dim 16.
_MOE = dict(n_routed_experts=6, n_activated=2, d_expert=8, n_group=3,
            topk_group=2)

_COMMON = {
    "embed": (256, 64), "final_norm": (64,), "head": (64, 256),
    "layers/attn_norm": (2, 64), "layers/mlp_norm": (2, 64),
    "layers/indexer/wk": (2, 64, 32), "layers/indexer/k_norm_scale": (2, 32),
    "layers/indexer/k_norm_bias": (2, 32),
    "layers/indexer/weights_proj": (2, 64, 4),
}
_MLP = {"layers/mlp/w_gate": (2, 64, 128), "layers/mlp/w_up": (2, 64, 128),
        "layers/mlp/w_down": (2, 128, 64)}
_MLA_KV = {"layers/attn/wkv_a": (2, 64, 40),      # C + R
           "layers/attn/kv_norm": (2, 32),
           "layers/attn/wkv_b": (2, 32, 4, 32),   # C, N, H + E
           "layers/attn/wo": (2, 4, 16, 64)}      # N, E, D
_GQA = {"layers/attn/wq": (2, 64, 4, 16), "layers/attn/wk": (2, 64, 2, 16),
        "layers/attn/wv": (2, 64, 2, 16), "layers/attn/wo": (2, 4, 16, 64),
        "layers/indexer/wq_b": (2, 64, 4, 32)}    # the indexer reads h


def _moe_layers(n_moe, noaux):
  out = {"moe/router": (n_moe, 64, 6), "moe/w_gate": (n_moe, 6, 64, 8),
         "moe/w_up": (n_moe, 6, 64, 8), "moe/w_down": (n_moe, 6, 8, 64),
         "moe/shared/w_gate": (n_moe, 64, 8), "moe/shared/w_up": (n_moe, 64, 8),
         "moe/shared/w_down": (n_moe, 8, 64)}
  if noaux:
    out["moe/router_bias"] = (n_moe, 6)
  return out


# name -> (config overrides, expected {path: shape}); "moe" has three layers
# so that first_k_dense=1 leaves two MoE layers.
FAMILIES = {
    "mla": ({}, {
        **_COMMON, **_MLP, **_MLA_KV,
        "layers/attn/wq_a": (2, 64, 32), "layers/attn/q_norm": (2, 32),
        "layers/attn/wq_b": (2, 32, 4, 24),        # Q, N, H + R
        "layers/indexer/wq_b": (2, 32, 4, 32)}),   # the indexer reads c_q
    "mla_q0": ({"q_lora_rank": 0}, {
        **_COMMON, **_MLP, **_MLA_KV,
        "layers/attn/wq": (2, 64, 4, 24),
        "layers/indexer/wq_b": (2, 64, 4, 32)}),
    "gqa": ({"attention_type": "gqa"}, {**_COMMON, **_MLP, **_GQA}),
    "gqa_bias": ({"attention_type": "gqa", "qkv_bias": True}, {
        **_COMMON, **_MLP, **_GQA, "layers/attn/bq": (2, 4, 16),
        "layers/attn/bk": (2, 2, 16), "layers/attn/bv": (2, 2, 16)}),
    "moe": ({"n_layers": 3, "moe": MoEConfig(**_MOE, first_k_dense=1)}, {
        **{k: (3,) + v[1:] if k.startswith("layers/") else v
           for k, v in {**_COMMON, **_MLA_KV}.items()},
        "layers/attn/wq_a": (3, 64, 32), "layers/attn/q_norm": (3, 32),
        "layers/attn/wq_b": (3, 32, 4, 24),
        "layers/indexer/wq_b": (3, 32, 4, 32),
        "dense_mlp/w_gate": (1, 64, 128), "dense_mlp/w_up": (1, 64, 128),
        "dense_mlp/w_down": (1, 128, 64), **_moe_layers(2, False)}),
    # Two layers, as "mla": the arrays tests init it, and shared shapes
    # compile once.
    "moe_noaux_k0": ({"moe": MoEConfig(
        **_MOE, first_k_dense=0, topk_method="noaux_tc")}, {
            **_COMMON, **_MLA_KV,
            "layers/attn/wq_a": (2, 64, 32), "layers/attn/q_norm": (2, 32),
            "layers/attn/wq_b": (2, 32, 4, 24),
            "layers/indexer/wq_b": (2, 32, 4, 32), **_moe_layers(2, True)}),
}

# Declared initialisers, by leaf name.
ONES = {"attn_norm", "mlp_norm", "final_norm", "q_norm", "kv_norm",
        "k_norm_scale"}
ZEROS = {"k_norm_bias", "bq", "bk", "bv", "router_bias"}
OUT_PROJ = {"wo", "w_down"}   # init_std / sqrt(2 L) (GPT-2 residual scaling)
STD = 0.05   # not the default, so a leaf that ignores cfg.init_std shows
F32_ALWAYS = {"layers/indexer/weights_proj", "moe/router", "moe/router_bias"}


def _path(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat(tree):
  return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_axes(cfg):
  return {_path(p): a for p, a in jax.tree_util.tree_flatten_with_path(
      P.logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))[0]}


def _cfg(name, **kw):
  return tiny(**{**FAMILIES[name][0], "init_std": STD, **kw})


_CACHE = {}


def _arrays(name, seed=3, **kw):
  """Flat arrays of a family, built once per module (eager init compiles
  one op per new shape: the first model of a family is most of the time)."""
  key = (name, seed, tuple(sorted(kw.items())))
  if key not in _CACHE:
    _CACHE[key] = flat(init(_cfg(name, **kw), seed))
  return _CACHE[key]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_abstract_params_match_init_and_the_hand_written_shapes(name):
  cfg = _cfg(name)
  expected = FAMILIES[name][1]
  abstract = flat(P.abstract_params(cfg))
  # Shapes and dtypes of what init_params would build (traced, not run).
  concrete = flat(jax.eval_shape(lambda k: P.init_params(cfg, k),
                                 jax.random.PRNGKey(0)))
  assert {k: v.shape for k, v in abstract.items()} == expected
  assert {k: (v.shape, v.dtype) for k, v in concrete.items()} == {
      k: (v.shape, v.dtype) for k, v in abstract.items()}
  assert P.count_tree(P.abstract_params(cfg)) == sum(
      math.prod(s) for s in expected.values()) == P.param_count(cfg)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logical_axes_name_every_dim_consistently_and_have_rules(name):
  cfg = _cfg(name)
  abstract, axes = flat(P.abstract_params(cfg)), flat_axes(cfg)
  assert set(axes) == set(abstract)
  # The sizes each name may stand for (a name that meant an unrelated
  # width would shard it wrongly); a set where one name covers several.
  sizes = {"embed": {64}, "vocab": {256}, "heads": {4}, "kv_heads": {2},
           "head_dim": {16}, "q_lora": {32}, "kv_lora": {32},
           "kv_rope": {40}, "idx_heads": {4}, "idx_dim": {32}, "expert": {6},
           "v_dim": {16}, "qk_dim": {24, 32},         # H + R, H + E
           "mlp": {128, 8},                           # F, d_expert (= shared)
           "norm": {64, 32},                          # D, Q = C = J
           "layers": {cfg.n_layers, 1, 2}}            # L, k, L - k
  for path, names in axes.items():
    shape = abstract[path].shape
    assert len(names) == len(shape), (path, names, shape)
    assert set(names) <= set(S.RULES), (path, set(names) - set(S.RULES))
    stacked = path.split("/")[0] in ("layers", "moe", "dense_mlp")
    # Stacked leaves lead with "layers" and only they carry it, once.
    assert names.count("layers") == int(stacked), (path, names)
    if stacked:
      assert names[0] == "layers"
    for n, dim in zip(names, shape):
      assert dim in sizes[n], (path, n, dim)
  # Every leaf gets a sharding from the table (no KeyError) with one spec
  # entry per dim.
  mesh = S.make_mesh(MeshConfig())
  shardings = flat(S.param_shardings(cfg, mesh))
  assert set(shardings) == set(abstract)
  for path, sh in shardings.items():
    assert len(sh.spec) == len(abstract[path].shape), path


@pytest.mark.parametrize("name,kw", [
    ("mla", {}), ("mla", {"tie_embeddings": True}), ("gqa_bias", {}),
    ("moe_noaux_k0", {})])
def test_init_statistics_follow_the_declared_initialisers(name, kw):
  std, cfg = STD, _cfg(name, **kw)
  out_std = std / math.sqrt(2 * cfg.n_layers)
  params = {k: np.asarray(v, np.float64)
            for k, v in _arrays(name, **kw).items()}
  seen = set()
  for path, x in params.items():
    leaf = path.split("/")[-1]
    seen.add(leaf)
    if leaf in ONES:
      np.testing.assert_array_equal(x, np.ones_like(x), err_msg=path)
    elif leaf in ZEROS:
      np.testing.assert_array_equal(x, np.zeros_like(x), err_msg=path)
    else:
      if path == "embed":
        want = std if cfg.tie_embeddings else 1.0
      else:
        want = out_std if leaf in OUT_PROJ else std
      assert abs(x.std() / want - 1) < 0.15, (path, x.std(), want)
      assert abs(x.mean()) < 5 * want / math.sqrt(x.size), (path, x.mean())
  assert seen & ONES and seen & OUT_PROJ


@pytest.mark.parametrize("name", ["mla", "moe_noaux_k0"])
def test_every_random_leaf_and_layer_draws_its_own_values(name):
  params = _arrays(name)
  rand = {k: np.asarray(v).reshape(-1) for k, v in params.items()
          if k.split("/")[-1] not in ONES | ZEROS}
  heads = {k: tuple(v[:16]) for k, v in rand.items()}
  assert len(set(heads.values())) == len(heads), "two leaves share values"
  for path, x in params.items():
    if path.split("/")[0] in ("layers", "moe") and path in rand:
      x = np.asarray(x)
      for i in range(1, x.shape[0]):
        assert not np.array_equal(x[0], x[i]), (path, i)


@pytest.mark.parametrize("name", ["mla", "gqa_bias", "moe_noaux_k0"])
def test_bf16_params_keep_only_the_declared_f32_leaves(name):
  cfg = _cfg(name, param_dtype="bfloat16")
  abstract = flat(P.abstract_params(cfg))
  arrays = _arrays(name, param_dtype="bfloat16")
  for path, a in abstract.items():
    want = jnp.float32 if path in F32_ALWAYS else jnp.bfloat16
    assert a.dtype == want, (path, a.dtype)
    assert arrays[path].dtype == want, (path, arrays[path].dtype)
  # bf16 leaves are the f32 init rounded, not a different draw.
  f32 = _arrays(name)
  for path, x in arrays.items():
    np.testing.assert_array_equal(
        np.asarray(x, np.float32),
        np.asarray(f32[path].astype(x.dtype), np.float32), err_msg=path)


def test_every_random_leaf_changes_with_the_key():
  a, b = _arrays("moe_noaux_k0", 3), _arrays("moe_noaux_k0", 4)
  for path in a:
    same = np.array_equal(np.asarray(a[path]), np.asarray(b[path]))
    assert same == (path.split("/")[-1] in ONES | ZEROS), path


def test_init_specs_on_a_subtree_is_deterministic_and_typed():
  specs = P.indexer_specs(_cfg("mla"))
  key = jax.random.PRNGKey(1)
  x = P.init_specs(specs, key, "bfloat16")
  y = P.init_specs(specs, key, "bfloat16")
  z = P.init_specs(specs, jax.random.PRNGKey(2), "bfloat16")
  assert {k: v.shape for k, v in x.items()} == {
      "wq_b": (32, 4, 32), "wk": (64, 32), "k_norm_scale": (32,),
      "k_norm_bias": (32,), "weights_proj": (64, 4)}
  assert x["weights_proj"].dtype == jnp.float32
  assert x["wk"].dtype == jnp.bfloat16
  for k in x:
    np.testing.assert_array_equal(np.asarray(x[k], np.float32),
                                  np.asarray(y[k], np.float32))
  assert not np.array_equal(np.asarray(x["wk"], np.float32),
                            np.asarray(z["wk"], np.float32))

