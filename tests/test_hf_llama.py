"""dsax.hf.llama against transformers: tiny random Llama (GQA, tied and
untied), Qwen2 (q/k/v biases) and Mistral in f32 give the same logits after
import; export round-trips the tensors exactly and loads into transformers;
the imported model's sparse attention at k >= T is its dense attention."""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dsax import hf, model  # noqa: E402
from dsax.attention import AttentionMode  # noqa: E402
from dsax.hf import llama as L  # noqa: E402

T = 20
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                {"sliding_window": None}),
}


def hf_model(kind, tied, seed=0):
  """A tiny random transformers model: N = 4 query heads over G = 2 kv
  heads, every weight and bias drawn N(0, 0.2), norm weights 1 + N(0, 0.2)."""
  conf_cls, model_cls, extra = FAMILIES[kind]
  conf = getattr(transformers, conf_cls)(
      vocab_size=96, hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=16, rope_theta=1000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=tied, **extra)
  torch.manual_seed(seed)
  m = getattr(transformers, model_cls)(conf).float().eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      p.normal_(1.0 if "norm" in name else 0.0, 0.2)
  return m


def state_dict(m):
  return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def hf_logits(m, toks):
  with torch.no_grad():
    return m(torch.tensor(np.asarray(toks))).logits.numpy()


TOKS = np.random.RandomState(0).randint(0, 96, (2, T))
CASES = [("llama", False), ("llama", True), ("qwen2", False),
         ("mistral", False)]


@pytest.mark.parametrize("kind,tied", CASES)
def test_logits_match_transformers_and_export_round_trips(kind, tied):
  m = hf_model(kind, tied)
  sd = state_dict(m)
  # attn_q_chunk 8: the dense attention runs in three query chunks.
  cfg = L.config_from_hf(m.config.to_dict(), attn_q_chunk=8)
  assert (cfg.n_kv_heads, cfg.head_dim, cfg.qkv_bias, cfg.tie_embeddings) == (
      2, 16, kind == "qwen2", tied)
  params = L.params_from_hf(sd, cfg)
  ref = hf_logits(m, TOKS)
  logits, _ = model.forward(params, jnp.asarray(TOKS), cfg)
  diff = float(np.abs(np.asarray(logits) - ref).max())
  print(f"{kind} tied={tied}: max |logit diff| {diff:.2e}, "
        f"max |logit| {np.abs(ref).max():.2f}")
  assert np.abs(ref).std() > 0.5  # a non-trivial model
  assert diff <= 1e-4

  # Export: the same names (tied: no lm_head) and bit-identical arrays ...
  hf_cfg, tensors = L.to_hf(cfg, params, indexer=False)
  assert set(tensors) == set(sd) - ({"lm_head.weight"} if tied else set())
  for name, w in tensors.items():
    assert w.dtype == np.float32 and np.array_equal(w, sd[name]), name
  # ... that transformers loads into a model built from the exported config.
  conf_cls, model_cls, _ = FAMILIES[hf_cfg["model_type"]]
  m2 = getattr(transformers, model_cls)(
      getattr(transformers, conf_cls)(**hf_cfg)).eval()
  res = m2.load_state_dict({k: torch.from_numpy(v) for k, v in
                            tensors.items()}, strict=False)
  assert not res.unexpected_keys and set(res.missing_keys) <= {
      "lm_head.weight"}
  np.testing.assert_allclose(hf_logits(m2, TOKS), ref, atol=1e-6)


def test_llama3_rope_scaling_matches_transformers():
  """Llama 3.1 RoPE scaling, with an original context of 64 so that the
  head_dim-16 frequencies fall in all three bands (scaled, blended, kept)."""
  from dsax import rope
  scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  conf = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=16, rms_norm_eps=1e-5,
      rope_parameters={"rope_theta": 1000.0, **scaling})
  torch.manual_seed(0)
  m = transformers.LlamaForCausalLM(conf).float().eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      p.normal_(1.0 if "norm" in name else 0.0, 0.2)
  cfg = L.config_from_hf(m.config.to_dict())
  rs = cfg.rope_scaling
  assert rs.enabled and rs.kind == "llama3"
  f0 = rope.inv_frequencies(16, 1000.0)
  f = rope.inv_frequencies(16, 1000.0, rs)
  wavelen = 2 * np.pi / f0
  kept, scaled = wavelen < 64 / 4.0, wavelen > 64 / 1.0
  assert kept.any() and scaled.any() and (~kept & ~scaled).any()
  np.testing.assert_allclose(f[kept], f0[kept], rtol=1e-6)
  np.testing.assert_allclose(f[scaled], f0[scaled] / 4.0, rtol=1e-6)
  logits, _ = model.forward(L.params_from_hf(state_dict(m), cfg),
                            jnp.asarray(TOKS), cfg)
  ref = hf_logits(m, TOKS)
  assert float(np.abs(np.asarray(logits) - ref).max()) <= 1e-4
  # Unscaled RoPE gives other logits: the test sees the scaling.
  plain = dataclasses.replace(cfg, rope_scaling=dataclasses.replace(
      rs, enabled=False))
  logits0, _ = model.forward(L.params_from_hf(state_dict(m), plain),
                             jnp.asarray(TOKS), plain)
  assert float(np.abs(np.asarray(logits0) - ref).max()) > 1e-2
  assert L.hf_config_from(cfg)["rope_scaling"] == scaling


def test_indexer_round_trips_and_sparse_at_full_k_is_dense():
  m = hf_model("qwen2", tied=True)
  cfg = L.config_from_hf(m.config.to_dict(), attn_q_chunk=8)
  cfg = dataclasses.replace(cfg, indexer=dataclasses.replace(
      cfg.indexer, topk=T, q_chunk=8))
  params = L.params_from_hf(state_dict(m), cfg)
  ix = params["layers"]["indexer"]
  assert ix["wq_b"].shape == (2, 64, cfg.indexer.n_heads, cfg.indexer.head_dim)
  assert float(jnp.abs(ix["wq_b"]).max()) > 0  # freshly initialised
  # With the indexer exported, an import restores every array exactly.
  _, tensors = L.to_hf(cfg, params)
  back = L.params_from_hf(tensors, cfg)
  flat, flat2 = dict(_flat(params)), dict(_flat(back))
  assert flat.keys() == flat2.keys()
  for k in flat:
    np.testing.assert_array_equal(flat[k], flat2[k], err_msg=k)
  # Sparse attention over every visible key is dense attention.
  dense, _ = model.forward(params, jnp.asarray(TOKS), cfg)
  sparse, _ = model.forward(params, jnp.asarray(TOKS), cfg,
                            mode=AttentionMode.of(cfg, "sparse"))
  np.testing.assert_allclose(sparse, dense, atol=2e-5, rtol=0)
  np.testing.assert_allclose(sparse, hf_logits(m, TOKS), atol=1e-4, rtol=0)


def _flat(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", np.asarray(v)


def test_hf_load_and_save_folders(tmp_path):
  """dsax.hf.load reads a transformers save_pretrained folder (config.json
  with rope_parameters, safetensors); dsax.hf.save writes one it reads."""
  m = hf_model("llama", tied=False, seed=1)
  m.save_pretrained(tmp_path / "hf")
  cfg, params = hf.load(str(tmp_path / "hf"))
  logits, _ = model.forward(params, jnp.asarray(TOKS), cfg)
  np.testing.assert_allclose(logits, hf_logits(m, TOKS), atol=1e-4, rtol=0)
  hf.save(cfg, params, str(tmp_path / "out"))
  cfg2, params2 = hf.load(str(tmp_path / "out"))
  assert cfg2 == cfg
  flat, flat2 = dict(_flat(params)), dict(_flat(params2))
  assert flat.keys() == flat2.keys()
  for k in flat:
    np.testing.assert_array_equal(flat[k], flat2[k], err_msg=k)


def test_unsupported_configs_and_tensors_are_named():
  m = hf_model("llama", tied=False)
  conf = m.config.to_dict()
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    L.config_from_hf(dict(conf, rope_parameters={
        "rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}))
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    L.config_from_hf(dict(conf, model_type="gpt2"))
  with pytest.raises(ValueError, match="sliding_window=4096"):
    L.config_from_hf(dict(conf, model_type="mistral", sliding_window=4096))
  cfg = L.config_from_hf(conf)
  sd = state_dict(m)
  bad = dict(sd, **{"model.layers.1.self_attn.k_proj.weight": np.zeros(
      (64, 64), np.float32)})
  with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj.*"
                     r"\(64, 64\).*\(32, 64\)"):
    L.params_from_hf(bad, cfg)
  del sd["model.norm.weight"]
  with pytest.raises(ValueError, match="missing.*model.norm.weight"):
    L.params_from_hf(sd, cfg)


# ----------------------------------------------------- damaged model files


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
  """A tiny Llama saved by transformers (config.json, model.safetensors)."""
  path = tmp_path_factory.mktemp("llama") / "hf"
  hf_model("llama", tied=False, seed=2).save_pretrained(path)
  return str(path)


def _copy(src, dst, config=None, tensors=None):
  """A copy of the checkpoint folder ``src`` with config.json entries
  replaced (None deletes) and tensors replaced (None deletes)."""
  import json
  from safetensors.numpy import save_file
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    conf = json.load(f)
  for k, v in (config or {}).items():
    if v is None:
      conf.pop(k, None)
    else:
      conf[k] = v
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(conf, f)
  sd = hf.read_safetensors([os.path.join(src, "model.safetensors")])
  for k, v in (tensors or {}).items():
    if v is None:
      sd.pop(k)
    else:
      sd[k] = v
  save_file(sd, os.path.join(dst, "model.safetensors"))
  return dst


def _one_line(e, *parts):
  msg = str(e.value)
  assert "\n" not in msg and isinstance(e.value, ValueError), msg
  for part in parts:
    assert part in msg, (part, msg)
  return msg


def test_damaged_safetensors_name_the_file_and_tensor(saved_llama, tmp_path):
  """Truncated (in the data: the first tensor cut is named; in the
  header), garbage, empty: one ModelFileError line naming the file."""
  import json
  import shutil
  import struct
  dst = str(tmp_path / "cut")
  shutil.copytree(saved_llama, dst)
  file = os.path.join(dst, "model.safetensors")
  raw = open(file, "rb").read()
  n = struct.unpack("<Q", raw[:8])[0]
  header = json.loads(raw[8:8 + n])
  starts = sorted((v["data_offsets"][0], k) for k, v in header.items()
                  if k != "__metadata__")
  start, name = starts[len(starts) // 2]
  with open(file, "wb") as f:
    f.write(raw[:8 + n + start + 10])
  with pytest.raises(hf.ModelFileError) as e:
    hf.load(dst)
  _one_line(e, file, repr(name), "truncated")
  for cut, what in ((8 + n - 3, "header"), (5, ""), (0, "")):
    with open(file, "wb") as f:
      f.write(raw[:cut])
    with pytest.raises(hf.ModelFileError) as e:
      hf.load(dst)
    _one_line(e, file, what)
  with open(file, "wb") as f:
    f.write(np.random.default_rng(0).bytes(len(raw)))
  with pytest.raises(hf.ModelFileError) as e:
    hf.load(dst)
  _one_line(e, file, "safetensors")


def test_config_json_without_a_field_is_named(saved_llama, tmp_path):
  cfg_file = os.path.join(str(tmp_path / "a"), "config.json")
  _copy(saved_llama, str(tmp_path / "a"), config={"hidden_size": None})
  with pytest.raises(hf.ModelFileError) as e:
    hf.load(str(tmp_path / "a"))
  _one_line(e, cfg_file, "lacks 'hidden_size'")
  _copy(saved_llama, str(tmp_path / "a"), config={"num_hidden_layers": "two"})
  with pytest.raises(hf.ModelFileError) as e:
    hf.load(str(tmp_path / "a"))
  _one_line(e, cfg_file, "num_hidden_layers='two'")
  with open(cfg_file, "w") as f:
    f.write("{not json")
  with pytest.raises(hf.ModelFileError) as e:
    hf.load(str(tmp_path / "a"))
  _one_line(e, cfg_file)
  with pytest.raises(hf.ModelFileError) as e:
    hf.load(str(tmp_path / "absent"))
  _one_line(e, "absent", "config.json")


def test_missing_and_misshapen_tensors_name_the_file(saved_llama, tmp_path):
  dst = _copy(saved_llama, str(tmp_path / "a"),
              tensors={"model.norm.weight": None})
  with pytest.raises(hf.ModelFileError) as e:
    hf.load(dst)
  _one_line(e, dst, "missing", "model.norm.weight")
  # A shard index naming a file that is not there.
  index = os.path.join(dst, "model.safetensors.index.json")
  with open(index, "w") as f:
    f.write('{"weight_map": {"model.norm.weight": "model-2.safetensors"}}')
  with pytest.raises(hf.ModelFileError) as e:
    hf.load(dst)
  _one_line(e, index, "model-2.safetensors", "missing")
  name = "model.layers.1.self_attn.k_proj.weight"
  dst = _copy(saved_llama, str(tmp_path / "b"),
              tensors={name: np.zeros((64, 64), np.float32)})
  with pytest.raises(hf.ModelFileError) as e:
    hf.load(dst)
  _one_line(e, os.path.join(dst, "model.safetensors"), repr(name),
            "(64, 64)", "(32, 64)")


def test_nonfinite_weights_are_refused_unless_allowed(saved_llama, tmp_path):
  name = "model.layers.0.mlp.up_proj.weight"
  sd = hf.read_safetensors([os.path.join(saved_llama, "model.safetensors")])
  w = sd[name].copy()
  w[0, :2], w[3, 5] = np.nan, np.inf
  dst = _copy(saved_llama, str(tmp_path / "a"), tensors={name: w})
  with pytest.raises(hf.ModelFileError) as e:
    hf.load(dst)
  _one_line(e, os.path.join(dst, "model.safetensors"), repr(name),
            f"3 of {w.size}", "allow_nonfinite")
  out = str(tmp_path / "out")
  with pytest.raises(hf.ModelFileError, match="not finite"):
    hf.convert(dst, out)
  assert not os.path.exists(out)
  cfg, params = hf.load(dst, allow_nonfinite=True)
  assert int(np.isnan(params["layers"]["mlp"]["w_up"]).sum()) == 2
  assert hf.convert(dst, out, allow_nonfinite=True) == cfg
