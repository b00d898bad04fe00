"""experiments/smollm2_dsa.py: the test-sized variant runs its phases (tiny
random GQA model, no download) and keeps the DSA invariants; launch.py loads
the config file by path."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "experiments", "smollm2_dsa.py")


def _experiment():
  spec = importlib.util.spec_from_file_location("smollm2_dsa", PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_launch_loads_the_config_file(capsys):
  import launch  # pylint: disable=import-outside-toplevel
  assert launch.main([PATH + ":test", "--dry-run",
                      "--set", "phases.sparse.steps=3"]) == 0
  cfg = json.loads(capsys.readouterr().out)
  assert [p["name"] for p in cfg["phases"]] == ["original", "warmup",
                                                "sparse", "dense"]
  assert cfg["phases"][2]["steps"] == 3
  assert cfg["model"]["attention_type"] == "gqa"
  assert launch.main([PATH + ":nope", "--dry-run"]) == 2
  assert "ARG must be" in capsys.readouterr().err


def test_full_configs_are_well_formed():
  exp = _experiment()
  for arg in (None, "cpu"):
    cfg = exp.get_config(arg)
    assert cfg.data.seq_len == 4096 and cfg.model.attention_type == "gqa"
    assert cfg.model.indexer.topk < cfg.data.seq_len
    assert cfg.data.tokenizer.startswith("file:")
    assert cfg.phases[0].init_from.endswith("params")
    assert (cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.d_model) == (
        9, 3, 576)


def test_test_variant_runs_and_keeps_the_invariants(tmp_path):
  from dsax import checkpoint, train
  from dsax import params as P
  from dsax.config import validate
  cfg = validate(_experiment().get_config("test"))
  summary = train.run(cfg, str(tmp_path))
  abstract = P.abstract_params(cfg.model)
  load = lambda name: train.flatten(checkpoint.load_params(
      str(tmp_path / "phases" / name), abstract))
  original, warm, sparse, dense = (load(n) for n in
                                   ("original", "warmup", "sparse", "dense"))
  indexer = [k for k in original if k.startswith("layers/indexer/")]
  assert indexer and len(indexer) < len(original)
  for k in original:
    same = np.array_equal(np.asarray(original[k]), np.asarray(warm[k]))
    # The warm-up trains the indexer and nothing else, bit for bit.
    assert same == (k not in indexer), k
    # The 0-step dense control is the original.
    np.testing.assert_array_equal(np.asarray(dense[k]),
                                  np.asarray(original[k]))
  assert not np.array_equal(np.asarray(sparse["embed"]),
                            np.asarray(warm["embed"]))
  for key in ("heldout_loss_base", "heldout_loss_sparse",
              "heldout_loss_dense", "sparse_vs_dense_loss", "warmup_kl_drop"):
    assert np.isfinite(summary[key]), key
  assert summary["heldout_loss_dense"] == summary["heldout_loss_base"]
