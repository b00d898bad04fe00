"""dsax.evals.rows: the columns of a comparison page against independent
references (closed-form intervals, numpy losses, a row's own forward)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import init, tiny
from dsax.evals import rows as R


def test_wilson_matches_the_closed_form_and_is_a_valid_interval():
  # 7/10 at 95%: the textbook Wilson interval (0.3968, 0.8922).
  lo, hi = R.wilson(7, 10)
  assert lo == pytest.approx(0.39677, abs=1e-4)
  assert hi == pytest.approx(0.89222, abs=1e-4)
  assert R.wilson(0, 20)[0] == 0.0 and 0.1 < R.wilson(0, 20)[1] < 0.2
  assert R.wilson(20, 20)[1] == 1.0 and 0.8 < R.wilson(20, 20)[0] < 0.9
  assert R.wilson(0, 0) == (0.0, 1.0)
  for h, n in ((1, 4), (3, 5), (19, 40)):
    lo, hi = R.wilson(h, n)
    assert lo < h / n < hi


def test_task_counts_and_totals():
  cell = lambda task, length, depth, hay=None: {
      "task": task, "length": length, "depth": depth, "haystack": hay}
  scored = [{"cell": cell("passkey", 1024, 0.0), "correct": True},
            {"cell": cell("passkey", 1024, 0.0), "correct": False},
            {"cell": cell("passkey", 1024, 0.5), "correct": True},
            {"cell": cell("passkey", 2048, 0.5), "correct": False},
            {"cell": cell("niah_single", 2048, 1.0, "natural"),
             "correct": True}]
  out = R.task_counts(scored)
  assert out["passkey@1024"] == {"0": [1, 2], "0.5": [1, 1]}
  assert out["passkey@2048"] == {"0.5": [0, 1]}
  assert out["niah_single/natural@2048"] == {"1": [1, 1]}
  assert R.totals(out["passkey@1024"]) == (2, 3)


def test_agreement_counts_weighted_positions_only():
  a = np.array([1, 2, 3, 4])
  b = np.array([1, 0, 3, 0])
  assert R.agreement(a, b, np.ones(4)) == 0.5
  assert R.agreement(a, b, np.array([1, 0, 1, 0])) == 1.0
  assert R.agreement(a, a, np.array([0, 0, 1, 1])) == 1.0


def test_rows_match_a_direct_forward_and_resume_from_the_cache(tmp_path):
  """Held-out loss and top-1 equal a direct forward; the by-position buckets
  average to the loss; a second call reads the cache (the row's loader is
  not called again); a changed row is recomputed."""
  import jax.numpy as jnp
  from dsax import model
  cfg = tiny(indexer=dataclasses.replace(tiny().indexer, topk=8))
  params = init(cfg)
  rng = np.random.default_rng(0)
  B, T = 2, 64
  inputs = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  targets = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  weights = np.ones((B, T), np.float32)
  weights[1, 40:] = 0.0
  batch = {"inputs": inputs, "targets": targets, "weights": weights,
           "segment_ids": np.ones((B, T), np.int32),
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32),
                                        (B, T)).copy()}
  rows = [R.Row("dense", "p"), R.Row("sparse", "p", "sparse", 8,
                                     recall=True)]
  calls = []

  def load(name):
    calls.append(name)
    return params

  kw = dict(load=load, model_cfg=cfg, texts={"code": [batch]}, examples=[],
            tokenizer=None, recall_batches=[batch],
            cache_dir=str(tmp_path / "page"))
  res = R.evaluate_rows(rows, **kw)
  for row in rows:
    from dsax.attention import AttentionMode
    mode = AttentionMode.of(cfg, row.kind,
                            topk=row.topk if row.kind == "sparse" else 0)
    logits, _ = model.forward(params, jnp.asarray(inputs), cfg,
                              jnp.asarray(batch["segment_ids"]), mode=mode)
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    want = (nll * weights).sum() / weights.sum()
    h = res[row.label]["heldout"]["code"]
    assert h["loss"] == pytest.approx(want, rel=1e-5)
    assert h["tokens"] == int(weights.sum())
    by = h["by_position"]
    avg = sum(l * n for l, n in zip(by["loss"], by["tokens"]) if n) / sum(
        by["tokens"])
    assert avg == pytest.approx(want, rel=1e-6)
    np.testing.assert_array_equal(res[row.label]["top1"]["code"],
                                  logits.argmax(-1).reshape(-1))
  rec = res["sparse"]["recall"]
  assert len(rec["recall"]) == cfg.n_layers
  assert all(0.0 <= r <= 1.0 + 1e-6 for r in rec["recall"])
  assert "recall" not in res["dense"]
  assert calls == ["p", "p"]
  again = R.evaluate_rows(rows, **kw)
  assert calls == ["p", "p"]
  for row in rows:
    assert again[row.label]["heldout"] == res[row.label]["heldout"]
    np.testing.assert_array_equal(again[row.label]["top1"]["code"],
                                  res[row.label]["top1"]["code"])
  changed = [R.Row("sparse", "p", "sparse", 16)]
  R.evaluate_rows(changed, **kw)
  assert calls == ["p", "p", "p"]
  with open(os.path.join(kw["cache_dir"], "sparse.json")) as f:
    assert json.load(f)["row"]["topk"] == 16
