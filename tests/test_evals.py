"""dsax.evals: teacher-forced scoring, eval sets, position metrics, report.

Scorer tests use fake logits functions (an oracle that knows the answers, a
uniform random one); the model tests use the tiny model with random params.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from conftest import init, tiny
from dsax import tasks
from dsax.evals import position, report, retrieval
from dsax.tokenizer import Tokenizer

TOK = Tokenizer("bytes")
V = 256


def small_set(seed=0, lengths=(300, 400), task_names=("passkey", "mqar"),
              depths=(0.0, 1.0), per_cell=2):
  return retrieval.build_eval_set(TOK, seed, lengths, depths, task_names,
                                  per_cell)


def oracle_fn(examples):
  """A fake model that has read every answer: at the last prompt position
  and along the answer it puts its mass on the next answer token. It finds
  its example by matching the row's prompt prefix."""
  enc = [retrieval.encode(ex, TOK) for ex in examples]

  def fn(tokens):
    b, t = tokens.shape
    logits = np.zeros((b, t, V), np.float32)
    for r in range(b):
      for e in enc:
        p = e.n_prompt
        if p <= t and np.array_equal(tokens[r, :p], e.ids[:p]):
          for j, tok in enumerate(e.ids[p:]):
            if p - 1 + j < t:
              logits[r, p - 1 + j, tok] = 10.0
          break
    return logits

  return fn


# ------------------------------------------------------------ eval sets


def test_same_seed_gives_identical_eval_set():
  a, b = small_set(seed=3), small_set(seed=3)
  assert [x.prompt for x in a] == [x.prompt for x in b]
  assert [x.answer for x in a] == [x.answer for x in b]
  assert [x.prompt for x in small_set(seed=4)] != [x.prompt for x in a]
  # A cell does not change when other cells are added.
  only = small_set(seed=3, lengths=(400,), task_names=("passkey",))
  assert [x.prompt for x in only] == [
      x.prompt for x in a if x.meta["cell"] == {**x.meta["cell"],
                                                "task": "passkey",
                                                "length": 400}]
  cells = {(x.meta["cell"]["task"], x.meta["cell"]["length"],
            x.meta["cell"]["depth"]) for x in a}
  assert ("passkey", 300, 0.0) in cells and ("mqar", 400, None) in cells
  for x in a:
    n = len(TOK.encode(x.prompt + x.answer))
    assert abs(n - x.meta["cell"]["length"]) <= tasks.tolerance(n)


def test_needle_tasks_on_both_haystacks():
  """RULER needle tasks come once per haystack (noise, natural text), passkey
  only on its Landmark filler, list tasks on none; the tables keep the
  haystacks apart, and an oracle scores every row."""
  ex = small_set(lengths=(700,), task_names=("passkey", "niah_single", "mqar"),
                 depths=(0.5,), per_cell=1)
  cells = [(e.task, e.meta["cell"]["haystack"]) for e in ex]
  assert cells == [("passkey", "noise"), ("niah_single", "noise"),
                   ("niah_single", "natural"), ("mqar", None)]
  noise, natural = ex[1], ex[2]
  assert natural.meta["haystack"] == "natural"
  # The natural filler is prose, not the Landmark sentences.
  assert "The grass is green" in noise.prompt
  assert "The grass is green" not in natural.prompt
  res = retrieval.score_examples(oracle_fn(ex), ex, TOK)
  tables = retrieval.accuracy_tables(res)
  assert set(tables["tasks"]) == {"passkey", "niah_single/noise",
                                  "niah_single/natural", "mqar"}
  assert all(v == 1.0 for row in tables["tasks"].values()
             for v in row.values())


def test_lengths_below_a_task_are_skipped():
  ex = retrieval.build_eval_set(TOK, 0, (100, 300), (0.5,), ("passkey",), 1)
  assert [x.meta["cell"]["length"] for x in ex] == [300]


# --------------------------------------------------------- teacher forcing


def test_oracle_scores_everything():
  ex = small_set()
  res = retrieval.score_examples(oracle_fn(ex), ex, TOK, batch_size=3)
  assert all(r["correct"] for r in res)
  assert all(r["token_acc"] == 1.0 for r in res)
  tables = retrieval.accuracy_tables(res)
  assert tables["passkey"] == {"300": {"0": 1.0, "1": 1.0},
                               "400": {"0": 1.0, "1": 1.0}}
  assert tables["tasks"]["mqar"] == {"300": 1.0, "400": 1.0}


def test_oracle_one_position_late_fails():
  """The oracle's logits shifted by one position score nothing: the scorer
  reads the right positions."""
  ex = small_set(task_names=("passkey",), lengths=(300,))
  fn = oracle_fn(ex)
  shifted = lambda tokens: np.roll(fn(tokens), 1, axis=1)
  res = retrieval.score_examples(shifted, ex, TOK)
  assert not any(r["correct"] for r in res)


def test_uniform_random_model_is_near_chance():
  ex = small_set()
  rng = np.random.default_rng(0)
  fn = lambda tokens: rng.normal(size=tokens.shape + (V,)).astype(np.float32)
  res = retrieval.score_examples(fn, ex, TOK)
  assert not any(r["correct"] for r in res)
  assert np.mean([r["token_acc"] for r in res]) < 0.05
  # Uniform logits: the answer log-prob is -A log V.
  flat = retrieval.score_examples(
      lambda t: np.zeros(t.shape + (V,), np.float32), ex[:2], TOK)
  for r in flat:
    assert r["logprob"] == pytest.approx(-r["n_answer"] * np.log(V), rel=1e-5)


def test_hand_made_teacher_forcing():
  enc = retrieval.Encoded(np.array([5, 6, 7, 8], np.int32), n_prompt=2)

  def fn(tokens):
    logits = np.zeros(tokens.shape + (10,), np.float32)
    logits[0, 1, 7] = 1.0   # predicts answer token 0 (7): right
    logits[0, 2, 3] = 1.0   # predicts answer token 1 (8): wrong
    return logits

  (r,) = retrieval.teacher_forced(fn, [enc], pad_to=4)
  assert r["correct"] is False and r["token_acc"] == 0.5
  lse = np.log(np.e + 9)
  assert r["logprob"] == pytest.approx((1 - lse) + (0 - lse), rel=1e-6)
  res = [{"cell": {"task": "passkey", "length": 300, "depth": 0.5},
          "correct": c, "token_acc": float(c)} for c in (True, False, False)]
  res.append({"cell": {"task": "mqar", "length": 300, "depth": None},
              "correct": True, "token_acc": 1.0})
  t = retrieval.accuracy_tables(res)
  assert t["passkey"] == {"300": {"0.5": pytest.approx(1 / 3)}}
  assert t["tasks"]["mqar"] == {"300": 1.0}


def test_greedy_by_forward_with_oracle():
  ex = retrieval.greedy_subset(small_set(), 3)
  assert {x.task for x in ex} == {"passkey", "mqar"}
  g = retrieval.greedy_scores(ex, TOK, logits_fn=oracle_fn(ex),
                              attention="sparse")
  assert [x["score"] for x in g] == [1.0] * 3
  assert g[0]["method"] == "forward-per-token"
  assert g[0]["prediction"] == ex[0].answer


# ------------------------------------------------------ position metrics


def test_loss_by_position_hand_made():
  batch = {"inputs": np.zeros((1, 8), np.int32),
           "positions": np.array([[0, 1, 2, 3, 0, 1, 2, 3]]),
           "weights": np.array([[1, 1, 1, 1, 1, 1, 1, 0]], np.float32)}
  nll = lambda b: np.arange(8, dtype=np.float32)[None]
  out = position.loss_by_position(nll, [batch], edges=[0, 2, 4])
  assert out["loss"] == [pytest.approx((0 + 1 + 4 + 5) / 4),
                         pytest.approx((2 + 3 + 6) / 3)]
  assert out["tokens"] == [4, 3]
  assert out["mean"] == pytest.approx(21 / 7)
  assert position.default_edges(100) == [0, 16, 32, 64, 100]
  assert position.mean_loss(nll, [batch]) == pytest.approx(3.0)


def test_random_recall_is_k_over_visible():
  pos = np.arange(8)[None]
  assert position.random_recall(pos, 2) == pytest.approx(
      np.mean([2 / n for n in range(3, 9)]))
  assert position.random_recall(pos, 8) == 1.0


def test_random_recall_matches_sampling():
  """k/n is the mean mass of k uniformly drawn keys under any attention."""
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(20) * 0.1)
  draws = [p[rng.choice(20, 5, replace=False)].sum() for _ in range(4000)]
  assert np.mean(draws) == pytest.approx(5 / 20, abs=0.02)


# ------------------------------------------------------- with the model


@pytest.fixture(scope="module")
def tiny_model():
  cfg = tiny()
  return cfg, init(cfg)


def test_model_dense_equals_sparse_when_k_covers(tiny_model):
  cfg, params = tiny_model
  ex = small_set(task_names=("passkey",), lengths=(300,), depths=(0.5,),
                 per_cell=2)
  dense = retrieval.score_examples(
      retrieval.model_logits_fn(params, cfg, "dense"), ex, TOK)
  sparse = retrieval.score_examples(
      retrieval.model_logits_fn(params, cfg, "sparse", topk=512), ex, TOK)
  for d, s in zip(dense, sparse):
    assert d["logprob"] == pytest.approx(s["logprob"], rel=1e-4, abs=1e-3)
  g = retrieval.greedy_scores(ex[:1], TOK, params=params, model_cfg=cfg)
  assert g[0]["method"] == "decode.generate"
  assert len(TOK.encode(g[0]["prediction"])) >= 1


def fake_run(tmp_path, name="run"):
  from configs import tiny_run
  from dsax import checkpoint, config as C
  from dsax import params as P
  d = str(tmp_path / name)
  cfg = tiny_run.get_config()
  cfg = dataclasses.replace(
      cfg, name=name, workdir=d,
      data=dataclasses.replace(cfg.data, max_docs=12, val_fraction=0.25,
                               batch_size=2))
  os.makedirs(d)
  with open(os.path.join(d, "config.json"), "w") as f:
    f.write(C.dumps(cfg))
  for i, ph in enumerate(cfg.phases):
    checkpoint.save_params(os.path.join(d, "phases", ph.name),
                           P.init_params(cfg.model, jax.random.PRNGKey(i)))
  return d


EVAL_KW = dict(ks=[16], lengths=[300], quick=True, tasks=("passkey",),
               per_cell=1, greedy_n=1, heldout_batches=1)


def test_run_eval_writes_report(tmp_path):
  from dsax import evals
  d = fake_run(tmp_path)
  res = evals.run_eval(d, **EVAL_KW)
  out = os.path.join(d, "eval")
  for name in ("results.json", "report.md", "loss_by_position.png",
               "loss_vs_length.png", "retrieval_passkey.png",
               "retrieval_tasks.png", "recall_by_layer.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert set(saved["modes"]) == {"base (pretrain) dense",
                                 "control (dense) dense",
                                 "sparse (sparse) k=16"}
  assert saved["modes"]["sparse (sparse) k=16"]["greedy"]["method"] == (
      "decode.generate")
  assert saved["modes"]["base (pretrain) dense"]["greedy"]["method"] == (
      "decode.generate")
  rec = saved["recall"]["warm-up (warmup) k=16"]
  assert len(rec["recall"]) == 2 and len(rec["recall_random"]) == 2
  # Random params attend almost uniformly: every set keeps about k/n.
  assert rec["recall"][0] == pytest.approx(rec["recall_random"][0], abs=0.05)
  assert set(res["modes"]) == set(saved["modes"])
  md = open(os.path.join(out, "report.md")).read()
  assert "Passkey accuracy" in md and "recall by layer" in md
  # The held-out comparison (what a run's summary.json holds) is in the report.
  assert "Held-out comparison" in md
  held = saved["heldout"]
  assert set(held["rows"]) == {"base (pretrain), dense",
                               "warm-up (warmup), dense",
                               "dense control (dense)",
                               "sparse (sparse), top-k"}
  assert held["summary"]["heldout_loss_sparse"] == pytest.approx(
      held["rows"]["sparse (sparse), top-k"]["loss"])
  assert held["summary"]["sparse_vs_dense_loss"] == pytest.approx(
      held["summary"]["heldout_loss_sparse"]
      / held["summary"]["heldout_loss_dense"] - 1)
  # compare: two runs' results in one table and plot.
  d2 = str(tmp_path / "run2")
  os.makedirs(os.path.join(d2, "eval"))
  saved["run"] = "run2"
  with open(os.path.join(d2, "eval", "results.json"), "w") as f:
    json.dump(saved, f)
  table, paths = report.compare([d, d2], str(tmp_path / "cmp"))
  assert "run / base (pretrain) dense" in table
  assert "run2 / sparse (sparse) k=16" in table
  assert all(os.path.getsize(p) > 0 for p in paths)


def test_heldout_numbers_match_the_evaluator(tiny_model):
  """Loss and mean recall from dsax.evals agree with dsax.heldout on the same
  batches (dense attention)."""
  from configs import tiny_run
  from dsax import data, heldout
  cfg = tiny_run.get_config()
  cfg = dataclasses.replace(
      cfg, model=tiny_model[0], data=dataclasses.replace(
          cfg.data, max_docs=12, val_fraction=0.25, batch_size=2),
      eval=dataclasses.replace(cfg.eval, batches=1, final_batches=1))
  tok, _, val = data.prepare(cfg.data, None)
  ev = heldout.Evaluator(cfg, tok, val)
  params = tiny_model[1]
  ref = ev.evaluate(params)
  batches = [{k: np.asarray(v) for k, v in b.items()} for b in ev.batches]
  k = cfg.model.indexer.topk
  loss = position.mean_loss(position.model_nll_fn(params, cfg.model), batches)
  assert loss == pytest.approx(ref["loss"], rel=1e-5)
  rec = position.recall_by_layer(params, cfg.model, batches, k)
  assert np.mean(rec["recall"]) == pytest.approx(ref["recall"], rel=1e-5)
  assert np.mean(rec["recall_oracle"]) == pytest.approx(ref["recall_oracle"],
                                                        rel=1e-5)
