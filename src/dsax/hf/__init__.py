"""Hugging Face checkpoints <-> dsax models, with numpy and safetensors (no
torch at run time).

  cfg, params = dsax.hf.load(HF_DIR)          # config.json + *.safetensors
  dsax.hf.save(cfg, params, OUT_DIR)          # config.json + model.safetensors

``config.json``'s ``model_type`` picks the family module, each with the same
interface: ``config_from_hf(hf_config, **overrides) -> ModelConfig``,
``params_from_hf(tensors, cfg) -> params`` and ``to_hf(cfg, params) ->
(hf_config, tensors)``:

  deepseek_v2, deepseek_v3, deepseek_v32   dsax.hf.deepseek (MLA, MoE, indexer)
  llama, qwen2, mistral                    dsax.hf.llama (GQA)

Safetensors: a single file or shards listed by ``model.safetensors.index.json``
(else every ``*.safetensors`` in the folder). Tensors numpy understands come
from ``safe_open(framework="np")``; BF16 and FP8 (which it does not) are read
from their raw bytes as ml_dtypes arrays.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

FAMILIES = {"deepseek_v2": "deepseek", "deepseek_v3": "deepseek",
            "deepseek_v32": "deepseek", "llama": "llama", "qwen2": "llama",
            "mistral": "llama"}

_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
               "F8_E5M2": ml_dtypes.float8_e5m2}


def family(model_type: str):
  """The dsax.hf module that reads ``model_type``."""
  if model_type not in FAMILIES:
    raise ValueError(f"model_type={model_type!r} is not supported; dsax.hf "
                     f"reads {sorted(FAMILIES)}")
  return importlib.import_module(f"dsax.hf.{FAMILIES[model_type]}")


def read_config(path: str) -> dict[str, Any]:
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    return json.load(f)


def safetensors_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, n) for n in names]
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors in {path}")
  return files


def _raw_reader(filename: str):
  """Reads one tensor from its bytes (dtypes numpy lacks)."""
  with open(filename, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
  data = np.memmap(filename, np.uint8, mode="r", offset=8 + n)

  def read(name: str) -> np.ndarray:
    info = header[name]
    start, end = info["data_offsets"]
    dtype = np.dtype(_RAW_DTYPES[info["dtype"]])
    return np.array(data[start:end]).view(dtype).reshape(info["shape"])

  return read


def read_safetensors(filenames: list[str]) -> dict[str, np.ndarray]:
  """name -> numpy array over all files."""
  from safetensors import safe_open
  out = {}
  for filename in filenames:
    raw = None
    with safe_open(filename, framework="np") as f:
      for name in f.keys():
        if f.get_slice(name).get_dtype() in _RAW_DTYPES:
          raw = raw or _raw_reader(filename)
          out[name] = raw(name)
        else:
          out[name] = f.get_tensor(name)
  return out


def load(path: str, dotted: dict[str, Any] | None = None, **overrides: Any):
  """(ModelConfig, params) of a local HF folder; ``overrides`` are
  ModelConfig fields (e.g. ``param_dtype="bfloat16"``), ``dotted`` strict
  dotted overrides (``{"indexer.topk": "512"}``) applied after them."""
  hf = read_config(path)
  mod = family(hf.get("model_type"))
  cfg = mod.config_from_hf(hf, **overrides)
  if dotted:
    from dsax import config as C
    cfg = C.override(cfg, dotted)
  tensors = read_safetensors(safetensors_files(path))
  kwargs = {}
  if FAMILIES[hf["model_type"]] == "deepseek":
    q = hf.get("quantization_config") or {}
    kwargs = {"rope_interleave": bool(hf.get("rope_interleave", True)),
              "fp8_block": tuple(q.get("weight_block_size", (128, 128)))}
  return cfg, mod.params_from_hf(tensors, cfg, **kwargs)


def save(model_config, params: Any, path: str, **kwargs: Any) -> None:
  """Writes config.json and model.safetensors (HF layout) to ``path``;
  ``kwargs`` go to the family's ``to_hf`` (deepseek: model_type,
  rope_interleave; llama: indexer)."""
  from safetensors.numpy import save_file
  name = "llama" if model_config.attention_type == "gqa" else "deepseek"
  mod = importlib.import_module(f"dsax.hf.{name}")
  hf, tensors = mod.to_hf(model_config, params, **kwargs)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2)
  save_file(tensors, os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})


def convert(hf_dir: str, out_dir: str,
            dotted: dict[str, Any] | None = None):
  """An HF folder as a dsax model directory, the layout of
  ``dsax.hf.gguf.write_model_dir``: ``params/`` (``checkpoint.save_params``:
  what a phase's ``init_from`` loads), ``model_config.json`` (the dsax
  ModelConfig: ``read_converted``), ``hf_config.json`` and ``source.json``.
  ``dotted`` are strict overrides of the ModelConfig. Returns the config."""
  cfg, params = load(hf_dir, dotted)
  write_model_dir(out_dir, cfg, params, read_config(hf_dir),
                  {"hf_dir": os.path.abspath(hf_dir)})
  return cfg


def write_model_dir(out_dir: str, cfg, params, hf_config: dict,
                    source: dict) -> None:
  """``params/``, ``model_config.json``, ``hf_config.json`` and
  ``source.json`` of a model directory (``convert``, ``gguf``)."""
  import jax
  import jax.numpy as jnp
  from dsax import checkpoint
  from dsax import config as C
  os.makedirs(out_dir, exist_ok=True)
  checkpoint.save_params(os.path.join(out_dir, "params"),
                         jax.tree.map(jnp.asarray, params))
  files = {"model_config.json": C.to_dict(cfg), "hf_config.json": hf_config,
           "source.json": source}
  for name, obj in files.items():
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2)


def read_converted(out_dir: str):
  """The ModelConfig of a model directory (``convert``): in a config file,
  ``model=dsax.hf.read_converted(DIR)`` with a phase's
  ``init_from=DIR/params``."""
  from dsax.config import ModelConfig, from_dict
  with open(os.path.join(out_dir, "model_config.json"), encoding="utf-8") as f:
    return from_dict(ModelConfig, json.load(f))
