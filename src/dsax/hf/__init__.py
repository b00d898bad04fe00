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

Errors. Whatever is wrong with a model file (unreadable, truncated, a
config.json without a field, a tensor missing, unexpected or of the wrong
shape, a type dsax does not read, values that are not finite) raises
``ModelFileError`` (a ValueError) whose message is one line naming the file,
then the tensor: ``PATH: tensor 'NAME': what is wrong``. Weights that hold
NaN or inf are refused unless ``allow_nonfinite=True``.
"""

from __future__ import annotations

import dataclasses
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


class ModelFileError(ValueError):
  """A model file dsax cannot import (see the module docstring). ``path``
  (the file or folder) and ``tensor`` are None where not known: the family
  modules' ``params_from_hf`` see only a dict, and the readers that call
  them add the file (``at``)."""

  def __init__(self, detail: str, path: str | None = None,
               tensor: str | None = None):
    self.detail = " ".join(str(detail).split())  # one line
    self.path, self.tensor = path, tensor
    where = ([path] if path else []) + (
        [f"tensor {tensor!r}"] if tensor else [])
    super().__init__(": ".join(where + [self.detail]))

  def at(self, path: str) -> "ModelFileError":
    """The same error, located in ``path``."""
    return ModelFileError(self.detail, path, self.tensor)


def check_finite(w: np.ndarray, path: str | None = None,
                 tensor: str | None = None) -> None:
  """ModelFileError when the floating-point array ``w`` holds NaN or inf."""
  if w.dtype.kind in "biu":
    return
  bad = w.size - int(np.count_nonzero(np.isfinite(w)))
  if bad:
    raise ModelFileError(
        f"{bad} of {w.size} values are not finite (NaN or inf); refused "
        "(allow_nonfinite=True imports them anyway)", path, tensor)


def family(model_type: str):
  """The dsax.hf module that reads ``model_type``."""
  if model_type not in FAMILIES:
    raise ModelFileError(f"model_type={model_type!r} is not supported; "
                         f"dsax.hf reads {sorted(FAMILIES)}")
  return importlib.import_module(f"dsax.hf.{FAMILIES[model_type]}")


def _read_json(file: str, what: str) -> Any:
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise ModelFileError(f"no such file ({what})", file) from None
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ModelFileError(f"not readable JSON ({e})", file) from None


def read_config(path: str) -> dict[str, Any]:
  """The folder's config.json (ModelFileError if absent or not a JSON
  object)."""
  if not os.path.isdir(path):
    raise ModelFileError("no such folder (a checkpoint folder holds "
                         "config.json and *.safetensors)", path)
  file = os.path.join(path, "config.json")
  hf = _read_json(file, "a Hugging Face checkpoint folder holds config.json")
  if not isinstance(hf, dict):
    raise ModelFileError("is not a JSON object", file)
  return hf


def safetensors_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = _read_json(index, "index")
    weight_map = (weight_map.get("weight_map")
                  if isinstance(weight_map, dict) else None)
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(v, str) for v in weight_map.values()):
      raise ModelFileError("has no weight_map of tensor -> file name", index)
    files = [os.path.join(path, n) for n in sorted(set(weight_map.values()))]
    for file in files:
      if not os.path.isfile(file):
        raise ModelFileError(f"lists {os.path.basename(file)}, which is "
                             "missing", index)
    return files
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise ModelFileError("holds no *.safetensors file", path)
  return files


def _header(filename: str) -> tuple[int, dict[str, Any]]:
  """(header length, header) of a safetensors file, read by hand."""
  with open(filename, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    return n, json.loads(f.read(n))


def _unreadable(filename: str, error: Exception) -> ModelFileError:
  """Why safe_open refused ``filename``; when it is truncated, where, and
  the first tensor whose data it does not hold."""
  if not os.path.exists(filename):
    return ModelFileError("no such file", filename)
  size = os.path.getsize(filename)
  try:
    with open(filename, "rb") as f:
      n = struct.unpack("<Q", f.read(8))[0]
    if 8 + n > size and n < 1 << 27:  # a plausible header, cut
      return ModelFileError(f"truncated inside its header ({n:,} bytes), "
                            f"the file has {size:,}", filename)
    _, header = _header(filename)
    data = size - 8 - n
    cut = sorted((int(v["data_offsets"][1]), name)
                 for name, v in header.items() if name != "__metadata__"
                 and int(v["data_offsets"][1]) > data)
  except (OSError, struct.error, ValueError, TypeError, KeyError,
          IndexError, AttributeError, OverflowError, MemoryError):
    cut = None
  if cut:
    end, name = cut[0]
    return ModelFileError(
        f"truncated: its data ends at byte {end:,} of the data section, "
        f"which holds {data:,} ({len(cut)} tensors cut)", filename, name)
  return ModelFileError(f"not a readable safetensors file ({error})",
                        filename)


def _raw_reader(filename: str):
  """Reads one tensor from its bytes (dtypes numpy lacks)."""
  n, header = _header(filename)
  data = np.memmap(filename, np.uint8, mode="r", offset=8 + n)

  def read(name: str) -> np.ndarray:
    info = header[name]
    start, end = info["data_offsets"]
    dtype = np.dtype(_RAW_DTYPES[info["dtype"]])
    return np.array(data[start:end]).view(dtype).reshape(info["shape"])

  return read


def read_safetensors(filenames: list[str], allow_nonfinite: bool = False,
                     where: dict[str, str] | None = None
                     ) -> dict[str, np.ndarray]:
  """name -> numpy array over all files; ``where`` (if given) receives
  name -> file. ModelFileError (naming file and tensor) for an unreadable
  or truncated file, a tensor in two files, NaN or inf values (unless
  ``allow_nonfinite``)."""
  from safetensors import safe_open
  out: dict[str, np.ndarray] = {}
  where = {} if where is None else where
  for filename in filenames:
    try:
      f = safe_open(filename, framework="np")
    except Exception as e:  # pylint: disable=broad-except
      # SafetensorError (no common base with OSError) or OSError.
      raise _unreadable(filename, e) from None
    raw = None
    with f:
      for name in f.keys():
        if name in where:
          raise ModelFileError(f"also in {where[name]}", filename, name)
        try:
          if f.get_slice(name).get_dtype() in _RAW_DTYPES:
            raw = raw or _raw_reader(filename)
            w = raw(name)
          else:
            w = f.get_tensor(name)
        except Exception as e:  # pylint: disable=broad-except
          raise ModelFileError(f"unreadable ({type(e).__name__}: {e})",
                               filename, name) from None
        if not allow_nonfinite:
          check_finite(w, filename, name)
        out[name], where[name] = w, filename
  return out


def _model_config(mod, hf: dict[str, Any], file: str):
  """``mod.config_from_hf`` with its errors located in ``file``."""
  try:
    return mod.config_from_hf(hf)
  except ModelFileError as e:
    raise e.at(file) from None
  except KeyError as e:
    raise ModelFileError(f"lacks {e.args[0]!r}", file) from None
  except (TypeError, ValueError) as e:  # ConfigError: an impossible value
    raise ModelFileError(str(e), file) from None


def load(path: str, dotted: dict[str, Any] | None = None,
         allow_nonfinite: bool = False, **overrides: Any):
  """(ModelConfig, params) of a local HF folder; ``overrides`` are
  ModelConfig fields (e.g. ``param_dtype="bfloat16"``), ``dotted`` strict
  dotted overrides (``{"indexer.topk": "512"}``) applied after them.
  Problems with the files raise ``ModelFileError``; weights with NaN or inf
  are refused unless ``allow_nonfinite``."""
  hf = read_config(path)
  file = os.path.join(path, "config.json")
  try:
    mod = family(hf.get("model_type"))
  except ModelFileError as e:
    raise e.at(file) from None
  cfg = _model_config(mod, hf, file)
  from dsax import config as C  # the caller's overrides: ConfigError
  if overrides:
    cfg = C.validate(dataclasses.replace(cfg, **overrides))
  if dotted:
    cfg = C.override(cfg, dotted)
  where: dict[str, str] = {}
  tensors = read_safetensors(safetensors_files(path), allow_nonfinite, where)
  kwargs = {}
  if FAMILIES[hf["model_type"]] == "deepseek":
    q = hf.get("quantization_config") or {}
    kwargs = {"rope_interleave": bool(hf.get("rope_interleave", True)),
              "fp8_block": tuple(q.get("weight_block_size", (128, 128)))}
  try:
    params = mod.params_from_hf(tensors, cfg, **kwargs)
  except ModelFileError as e:
    raise e.at(where.get(e.tensor, path)) from None
  return cfg, params


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
            dotted: dict[str, Any] | None = None,
            allow_nonfinite: bool = False):
  """An HF folder as a dsax model directory, the layout of
  ``dsax.hf.gguf.write_model_dir``: ``params/`` (``checkpoint.save_params``:
  what a phase's ``init_from`` loads), ``model_config.json`` (the dsax
  ModelConfig: ``read_converted``), ``hf_config.json`` and ``source.json``.
  ``dotted`` are strict overrides of the ModelConfig. Returns the config.
  Everything is read and checked (``load``) before anything is written."""
  cfg, params = load(hf_dir, dotted, allow_nonfinite)
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
