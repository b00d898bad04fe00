"""Issue 16's acceptance run: a DeepSeek-V2-Lite-shaped MoE model
(configs/v2_lite_cpu.py: 64 routed experts, 6 active, 2 shared, softmax
greedy routing, MLA without a query latent) through the indexer warm-up and
sparse training on 16 simulated CPU devices with data, fsdp, expert and
sequence all 2, against the same run on one device (the reference)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from test_sharding import ROOT, _spawn, _wait  # noqa: E402

from dsax import metrics  # noqa: E402


def _launch(workdir, arg, devices):
  name = "v2_lite_cpu" + (f":{arg}" if arg else "")
  return _spawn([os.path.join(ROOT, "launch.py"), name, "--workdir",
                 str(workdir)], devices=devices)


def test_v2_lite_shape_on_every_axis_matches_one_device(tmp_path):
  procs = {"mesh": _launch(tmp_path / "mesh", None, 16),
           "one": _launch(tmp_path / "one", "one", 1)}
  for p in procs.values():
    _wait(p, timeout=900)
  with open(tmp_path / "mesh" / "config.json") as f:
    mesh = json.load(f)["mesh"]
  assert all(mesh[a] == 2 for a in ("data", "fsdp", "expert", "sequence"))
  rows = {k: [r for r in metrics.read_metrics(str(tmp_path / k))
              if "loss" in r] for k in procs}
  got = {k: {(r["phase"], r["step"]): r for r in v} for k, v in rows.items()}
  assert sorted(got["mesh"]) == sorted(got["one"])
  assert {ph for ph, _ in got["mesh"]} == {"warmup", "sparse"}
  for key, ref in got["one"].items():
    for name in ("loss", "indexer_kl", "moe_maxvio"):
      if name in ref:
        np.testing.assert_allclose(got["mesh"][key][name], ref[name],
                                   rtol=2e-5, atol=1e-6, err_msg=f"{key} {name}")
  # The sparse phase trains the MoE layer: its load statistics are reported.
  assert any("moe_maxvio" in r for r in got["mesh"].values())
