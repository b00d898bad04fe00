"""DeepSeek checkpoints: logits parity with transformers (V2-Lite, V3 with
YaRN and half-split rope rows, V3.2 on the sparse path), FP8 dequantisation,
the exact import -> export round trip and ``launch.py convert``."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dsax import checkpoint, hf, model  # noqa: E402
from dsax import params as P  # noqa: E402
from dsax.attention import AttentionMode  # noqa: E402
from dsax.hf import deepseek  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48,
            moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, n_shared_experts=1, n_routed_experts=8,
            routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=4,
            topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
            initializer_range=0.1)  # torch's 0.02 gives near-constant logits
CASES = {
    # V2-Lite: no q-latent; softmax router, group-limited greedy.
    "v2": ("DeepseekV2", dict(q_lora_rank=None, n_shared_experts=2,
                              topk_method="group_limited_greedy")),
    "v3": ("DeepseekV3", {}),
    # Half-split rope rows (permuted on import) under YaRN.
    "v3_yarn_half": ("DeepseekV3", dict(
        rope_interleave=False, max_position_embeddings=64,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=16,
                             mscale=0.707, mscale_all_dim=0.707))),
    # 16 indexer heads: with few, relu leaves exact ties at 0 in the top-k.
    "v32": ("DeepseekV32", dict(index_topk=8, index_head_dim=16,
                                index_n_heads=16)),
}


def _build(case, path, seed=0):
  """A random tiny HF model in f32, saved to ``path``; norms, the indexer's
  LayerNorm bias and the router's correction bias made non-trivial."""
  prefix, kw = CASES[case]
  torch.manual_seed(seed)
  cfg = getattr(transformers, prefix + "Config")(**{**BASE, **kw})
  m = getattr(transformers, prefix + "ForCausalLM")(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.copy_((0.0 if name.endswith("bias") else 1.0)
                + 0.2 * torch.randn_like(p))
    for name, b in m.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn_like(b))
  m.save_pretrained(path)
  return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """case -> (folder, HF model), built once."""
  root = tmp_path_factory.mktemp("hf")
  return {c: (str(root / c), _build(c, str(root / c))) for c in CASES}


def _tokens(t):
  return torch.randint(0, 64, (2, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", ["v2", "v3", "v3_yarn_half"])
def test_logits_match_transformers(saved, case):
  path, m = saved[case]
  toks = _tokens(12)
  with torch.no_grad():
    ref = m(toks).logits.numpy()
  cfg, params = hf.load(path)
  assert cfg.moe.n_routed_experts == 8 and cfg.moe.first_k_dense == 1
  logits, _ = model.forward(params, jnp.asarray(toks.numpy()), cfg)
  diff = float(np.abs(np.asarray(logits) - ref).max())
  print(f"{case}: max |logits| {np.abs(ref).max():.3f}, max abs diff {diff:.2e}")
  assert np.abs(ref).max() > 1.0 and diff <= 1e-4


def test_v32_sparse_logits_and_selection_match_transformers(saved):
  """T = 40 > index_topk = 8: transformers' prefill masks all but the
  indexer's top-k keys; dsax runs its sparse path. Same selected sets per
  query and layer, same logits, and the dense logits differ (so the sparse
  path is what is compared)."""
  # (transformers 5.24 prefill: eager/sdpa attention with the non-selected
  # keys masked, no Hadamard, no FP8; see dsax.hf.deepseek.)
  path, m = saved["v32"]
  toks = _tokens(40)
  caught = []
  hooks = [layer.self_attn.indexer.register_forward_hook(
      lambda mod, args, out: caught.append(out.numpy()))
      for layer in m.model.layers]
  with torch.no_grad():
    ref = m(toks).logits.numpy()
  for h in hooks:
    h.remove()
  cfg, params = hf.load(path)
  assert (cfg.indexer.n_heads, cfg.indexer.head_dim, cfg.indexer.topk,
          cfg.indexer.rope_dim) == (16, 16, 8, 8)
  x = jnp.asarray(toks.numpy())
  logits, aux = model.forward(
      params, x, cfg, mode=AttentionMode.of(cfg, "sparse", indices=True))
  idx, valid = np.asarray(aux.idx), np.asarray(aux.valid)
  for layer, hf_idx in enumerate(caught):
    for b in range(2):
      for t in range(40):
        ours = set(idx[layer, b, t][valid[layer, b, t]].tolist())
        assert ours == {s for s in hf_idx[b, t].tolist() if s <= t}, (
            layer, b, t)
  diff = float(np.abs(np.asarray(logits) - ref).max())
  dense, _ = model.forward(params, x, cfg)
  print(f"v32 sparse: max abs diff {diff:.2e}; dense vs HF "
        f"{np.abs(np.asarray(dense) - ref).max():.2e}")
  assert diff <= 1e-4
  assert np.abs(np.asarray(dense) - ref).max() > 1e-2


def _quantise(w, block):
  """e4m3 blocks with one f32 scale each (scale_inv = amax / 448)."""
  rows, cols = w.shape
  q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
  s = np.empty((-(-rows // block), -(-cols // block)), np.float32)
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
      s[i, j] = max(np.abs(blk).max(), 1e-12) / 448.0
      q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (
          blk / s[i, j]).astype(ml_dtypes.float8_e4m3fn)
  return q, s


def test_fp8_block_weights_dequantise(saved, tmp_path):
  """Every linear weight of the V3 checkpoint as e4m3 blocks of 16 (ragged
  at 24 and 48) with weight_scale_inv, read through the safetensors raw-byte
  path: within e4m3 rounding (2**-4 relative, 2**-9 scale absolute) of the
  f32 weights. (Logits are not compared: a rounded router flips experts.)"""
  from safetensors.numpy import save_file
  src, _ = saved["v3"]
  tensors = hf.read_safetensors(hf.safetensors_files(src))
  quant, n_fp8 = {}, 0
  for name, w in tensors.items():
    if w.ndim == 2 and "embed" not in name and "lm_head" not in name \
        and ".gate.weight" not in name:
      quant[name], quant[name + "_scale_inv"] = _quantise(w, 16)
      n_fp8 += 1
    else:
      quant[name] = w
  save_file(quant, str(tmp_path / "model.safetensors"))
  config = hf.read_config(src)
  config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                   "weight_block_size": [16, 16]}
  (tmp_path / "config.json").write_text(json.dumps(config))
  back = hf.read_safetensors(hf.safetensors_files(str(tmp_path)))
  assert back["model.layers.0.self_attn.q_a_proj.weight"].dtype == (
      ml_dtypes.float8_e4m3fn) and n_fp8 > 20
  deq = deepseek.dequantize_fp8(back, (16, 16))
  for name in quant:
    if name.endswith("_scale_inv"):
      w, s = tensors[name[:-10]], quant[name]
      bound = 2.0 ** -4 * np.abs(w) + 2.0 ** -9 * np.repeat(
          np.repeat(s, 16, 0), 16, 1)[:w.shape[0], :w.shape[1]] + 1e-12
      assert np.all(np.abs(deq[name[:-10]] - w) <= bound), name
  # load() takes the block size from quantization_config.
  _, params = hf.load(str(tmp_path))
  name = "model.layers.2.mlp.experts.3.down_proj.weight"
  np.testing.assert_array_equal(params["moe"]["w_down"][1, 3], deq[name].T)
  assert not np.array_equal(deq[name], tensors[name])


@pytest.mark.parametrize("case,kwargs", [
    ("v2", {}), ("v3_yarn_half", {"model_type": "deepseek_v3",
                                  "rope_interleave": False}), ("v32", {})])
def test_import_export_round_trip_is_exact(saved, tmp_path, case, kwargs):
  path, m = saved[case]
  cfg, params = hf.load(path)
  hf.save(cfg, params, str(tmp_path), **kwargs)
  a = hf.read_safetensors(hf.safetensors_files(path))
  b = hf.read_safetensors(hf.safetensors_files(str(tmp_path)))
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert deepseek.config_from_hf(hf.read_config(str(tmp_path))) == cfg
  if case == "v32":  # transformers reads the export to the same logits
    again = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path)).eval()
    toks = _tokens(12)
    with torch.no_grad():
      np.testing.assert_allclose(again(toks).logits.numpy(),
                                 m(toks).logits.numpy(), atol=1e-6)


def test_yarn_attention_factor_is_refused():
  config = dict(BASE, model_type="deepseek_v3", rope_parameters=dict(
      rope_type="yarn", rope_theta=1e4, factor=4.0,
      original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=0.707))
  with pytest.raises(ValueError, match="attention_factor"):
    deepseek.config_from_hf(config)


def test_launch_convert_writes_an_init_from_checkpoint(saved, tmp_path):
  sys.path.insert(0, ROOT)
  import launch  # pylint: disable=import-outside-toplevel
  src, _ = saved["v3"]
  out = str(tmp_path / "ckpt")
  assert launch.main(["convert", src, out,
                      "--set", "model.param_dtype=bfloat16"]) == 0
  cfg = hf.read_converted(out)
  assert cfg.param_dtype == "bfloat16" and cfg.moe.n_routed_experts == 8
  # What train._phase_init does with init_from=out.
  params = checkpoint.load_params(os.path.join(out, "params"),
                                  P.abstract_params(cfg))
  ref_cfg, ref = hf.load(src, param_dtype="bfloat16")
  assert ref_cfg == cfg
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_damaged_deepseek_files_are_named(saved, tmp_path):
  """config.json without a field, an FP8 weight whose scale_inv has the
  wrong shape or is missing, a non-finite scale, an MoE expert missing: one
  ModelFileError line naming the file and the tensor."""
  from safetensors.numpy import save_file
  src, _ = saved["v3"]
  tensors = hf.read_safetensors(hf.safetensors_files(src))
  config = hf.read_config(src)

  def write(name, tensors, **conf):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**config, **conf}))
    save_file(tensors, str(path / "model.safetensors"))
    return str(path), str(path / "model.safetensors")

  def fails(path, *parts):
    with pytest.raises(hf.ModelFileError) as e:
      hf.load(path)
    msg = str(e.value)
    assert "\n" not in msg and all(p in msg for p in parts), (parts, msg)

  path, _ = write("noconf", tensors)
  conf = dict(config)
  del conf["kv_lora_rank"]
  (tmp_path / "noconf" / "config.json").write_text(json.dumps(conf))
  fails(path, os.path.join(path, "config.json"), "lacks 'kv_lora_rank'")
  name = "model.layers.1.self_attn.q_a_proj.weight"
  q, s = _quantise(tensors[name], 16)
  fp8 = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                 "weight_block_size": [16, 16]}}
  path, file = write("scale", dict(tensors, **{
      name: q, name + "_scale_inv": s[:, :1].copy()}), **fp8)
  fails(path, file, repr(name + "_scale_inv"), str(s[:, :1].shape),
        str(s.shape))
  path, file = write("noscale", dict(tensors, **{name: q}), **fp8)
  fails(path, file, repr(name), "float8_e4m3fn without")
  bad = s.copy()
  bad[0, 0] = np.inf
  path, file = write("inf", dict(tensors, **{
      name: q, name + "_scale_inv": bad}), **fp8)
  fails(path, file, repr(name + "_scale_inv"), "1 of", "not finite")
  gone = "model.layers.2.mlp.experts.5.up_proj.weight"
  path, _ = write("gone", {k: v for k, v in tensors.items() if k != gone})
  fails(path, path, "missing 1 tensors", gone)
