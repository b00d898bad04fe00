"""experiments/smollm2_dsa.py: the test-sized variant runs its phases (tiny
random GQA model, no download) and keeps the DSA invariants; launch.py loads
the config file by path."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

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
                                                "sparse", "sparse_lm", "dense"]
  assert cfg["phases"][2]["steps"] == 3
  assert cfg["model"]["attention_type"] == "gqa"
  assert launch.main([PATH + ":nope", "--dry-run"]) == 2
  assert "ARG must be" in capsys.readouterr().err


def test_full_configs_are_well_formed():
  exp = _experiment()
  for arg, seq_len in ((None, 4096), ("cpu", 2048)):
    cfg = exp.get_config(arg)
    assert cfg.data.seq_len == seq_len and cfg.model.attention_type == "gqa"
    assert cfg.model.indexer.topk < cfg.data.seq_len
    assert cfg.data.tokenizer.startswith("file:")
    assert cfg.phases[0].init_from.endswith("params")
    assert (cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.d_model) == (
        9, 3, 576)
  cpu = exp.get_config("cpu")
  assert cpu.data.seq_len // cpu.model.indexer.topk == 16
  by = {p.name: p for p in cpu.phases}
  # The router-style run and the dense control: the sparse phase's data
  # and steps.
  assert by["sparse_lm"].indexer_grad == "lm"
  assert by["sparse_lm"].init_from == "warmup"
  assert by["sparse"].indexer_grad == "kl"
  for name in ("sparse_lm", "dense"):
    assert by[name].data_from == "sparse"
    assert by[name].steps == by["sparse"].steps


def test_test_variant_runs_keeps_the_invariants_and_writes_the_page(
    tmp_path):
  """The one command (training, the rows' evaluation, the page) on the tiny
  model; then a rerun resumes: nothing is trained or evaluated again."""
  from dsax import checkpoint, train
  from dsax import params as P
  exp = _experiment()
  run, out = tmp_path / "run", tmp_path / "out"
  argv = ["--variant", "test", "--workdir", str(run), "--out", str(out)]
  assert exp.main(argv) == 0
  cfg = exp.get_config("test")
  abstract = P.abstract_params(cfg.model)
  load = lambda name: train.flatten(checkpoint.load_params(
      str(run / "phases" / name), abstract))
  original, warm, sparse, lm, dense = (
      load(n) for n in ("original", "warmup", "sparse", "sparse_lm", "dense"))
  indexer = [k for k in original if k.startswith("layers/indexer/")]
  assert indexer and len(indexer) < len(original)
  for k in original:
    same = np.array_equal(np.asarray(original[k]), np.asarray(warm[k]))
    # The warm-up trains the indexer and nothing else, bit for bit.
    assert same == (k not in indexer), k
  for trained in (sparse, lm, dense):
    assert not np.array_equal(np.asarray(trained["embed"]),
                              np.asarray(warm["embed"]))
  # The router-style phase trains its indexer by the LM loss alone: it moves,
  # and differently from the KL-trained one.
  k0 = indexer[0]
  assert not np.array_equal(np.asarray(lm[k0]), np.asarray(warm[k0]))
  assert not np.array_equal(np.asarray(lm[k0]), np.asarray(sparse[k0]))
  page = (out / "smollm2_dsa_test.md").read_text()
  for row in ("dense original", "sparse, fresh indexer",
              "sparse after warm-up", "sparse after sparse training (KL)",
              "sparse after sparse training (LM gate)", "dense control",
              "local window + 4 sinks", "oracle top-k"):
    assert f"| {row} |" in page, row
  for col in ("stdlib loss", "top-1 agree", "passkey 512",
              "needle (natural) 512", "NLL ratio", "recall"):
    assert col in page, col
  assert "Mean per window of steps: 1-1 " in page
  for png in ("training", "position", "recall"):
    assert (out / f"smollm2_dsa_test_{png}.png").stat().st_size > 1000
  # The dense original agrees with itself on every token.
  assert "| dense original | " in page and "| 1.000 |" in page
  # The passkey-selection diagnostic runs on the same run directory.
  sys.path.insert(0, ROOT)
  from experiments import passkey_selection
  rows = passkey_selection.measure(str(run), "warmup", [512], (1.0,))
  assert rows and rows[0]["tokens"] > 0
  for r in rows:
    assert len(r["indexer"]) == len(r["oracle"]) == cfg.model.n_layers
    assert all(0 <= c <= r["tokens"] for c in r["indexer"] + r["oracle"])
  cached = sorted(os.listdir(run / "page"))
  stamp = {f: os.path.getmtime(run / "page" / f) for f in cached}
  assert exp.main(argv) == 0
  assert sorted(os.listdir(run / "page")) == cached
  assert all(os.path.getmtime(run / "page" / f) == t
             for f, t in stamp.items())
