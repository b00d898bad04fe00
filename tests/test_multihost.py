"""Several processes: one stop decision, per-process data, sharded init.

The two-process case runs launch.py twice in two local processes (one CPU
device each, a localhost coordinator; tests/test_sharding.py's helpers): a
SIGTERM to process 1 only must stop both after the same step, saved once
with both data streams, both exiting with the interrupt code (0); the rerun
resumes and finishes. Its losses, steps 1..N across the two launches, are
compared with one device running the same steps on the global batches built
here from the two per-process streams (the reference for "two processes
match one" and for "the resume continues the same stream"). The sharded
init runs on 8 simulated devices in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import jax
import numpy as np
import pytest

from dsax import data, documents, metrics, multihost, train
from dsax import params as P
from dsax import sharding as S
from dsax.config import ConfigError, DataConfig, MeshConfig
from dsax.tokenizer import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sharding import (FAST, LOSS_ATOL, LOSS_RTOL, ROOT,  # noqa: E402
                           _config, _free_port, _spawn)
from test_data import corpus, reads  # noqa: E402,F401  (a fixture)

# --------------------------------------------------------- per-process data


class CountingTokenizer(Tokenizer):
  """Bytes, recording every text it encodes."""

  def __init__(self):
    super().__init__("bytes")
    self.seen: list[str] = []

  def encode_array(self, text):
    self.seen.append(text)
    return super().encode_array(text)


def _letters(n):
  return [chr(ord("A") + k) * (7 + 5 * k) for k in range(n)]


def test_each_share_tokenises_only_its_documents_and_resumes():
  cfg = DataConfig(seq_len=16, batch_size=4, seed=3)
  docs = _letters(9)
  streams = {}
  for g in range(2):
    tok = CountingTokenizer()
    it = data.make_train_iterator(cfg, tok, docs, share=(g, 2))
    batches = [next(it) for _ in range(12)]  # several epochs of the share
    assert set(tok.seen) == set(docs[g::2]), g
    letters = {int(x) for b in batches for x in b["inputs"][b["weights"] > 0]}
    assert letters == {ord(d[0]) for d in docs[g::2]}, g
    assert batches[0]["inputs"].shape == (2, 16)
    streams[g] = (it, batches)
  # Resume: a fresh iterator of the share continues from a saved state.
  for g, (it, _) in streams.items():
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(5)]
    fresh = data.make_train_iterator(cfg, Tokenizer("bytes"), docs, (g, 2))
    fresh.set_state(state)
    for w in want:
      got = next(fresh)
      for k in w:
        np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  # The two shares shuffle independently, and one share is the plain stream.
  one = next(data.make_train_iterator(cfg, Tokenizer("bytes"), docs, (0, 1)))
  plain = next(data.make_train_iterator(cfg, Tokenizer("bytes"), docs))
  np.testing.assert_array_equal(one["inputs"], plain["inputs"])
  with pytest.raises(ConfigError, match="batch_size=4 cannot be shared by 3"):
    data.make_train_iterator(cfg, Tokenizer("bytes"), docs, (0, 3))
  with pytest.raises(data.DataError, match="process group 1"):
    data.make_train_iterator(cfg, Tokenizer("bytes"), docs[:1], (1, 2))


def test_one_process_stream_is_the_plain_stream_with_its_state():
  cfg = _config().data
  mesh = S.make_mesh(MeshConfig(), jax.devices()[:1])
  sharding = S.batch_sharding(mesh, cfg.batch_size, cfg.seq_len)
  docs = _letters(6)
  stream = multihost.TrainStream(cfg, Tokenizer("bytes"), docs, sharding)
  assert (stream.group, stream.groups) == (0, 1)
  plain = data.make_train_iterator(cfg, Tokenizer("bytes"), docs)
  for _ in range(2):
    got, want = next(stream), next(plain)
    np.testing.assert_array_equal(np.asarray(got["targets"]), want["targets"])
  assert stream.get_state() == plain.get_state()
  with pytest.raises(ConfigError, match="split over 2 process group"):
    stream.set_state({"groups": 2, "streams": [plain.get_state()] * 2})


def test_each_share_reads_only_its_files(tmp_path, reads):
  """In one process, share=(g, 2): listing, splitting and the tokenizer
  read nothing; group g's stream reads its train files alone (each once),
  the held-out batches the validation files alone."""
  cfg = DataConfig(source="files", paths=corpus(tmp_path), seq_len=32,
                   batch_size=4, val_fraction=0.25, seed=5)
  tok, train, val = data.prepare(cfg, None)
  assert reads == []
  for g in range(2):
    it = data.make_train_iterator(cfg, tok, train, share=(g, 2))
    for _ in range(200):  # several epochs of the share
      next(it)
    share = [p for p in train.paths()[g::2] if p]
    assert sorted(reads) == sorted(share), g
    reads.clear()
  # Two batches need only two of the three validation files; all of them,
  # every file.
  data.heldout_batches(cfg, tok, val, 2)
  assert len(reads) == 2 and set(reads) < set(val.paths())
  reads.clear()
  data.heldout_batches(cfg, tok, val, 100)
  assert sorted(reads) == sorted(p for p in val.paths() if p)


def worker_reads(out_dir, port, pid, corpus_glob):
  """One of two processes: multihost.prepare with a BPE tokenizer, this
  process's stream for 30 batches and, on process 0, the held-out batches,
  recording the files read (documents.read_text) after each; writes
  reads<pid>.json."""
  import logging  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, force=True)
  S.init_distributed(f"localhost:{port}", 2, int(pid))
  seen = []
  real = documents.read_text
  documents.read_text = lambda path: seen.append(path) or real(path)
  cfg = _reads_config(corpus_glob)
  tok, train_docs, val = multihost.prepare(cfg, None)
  out = {"prepare": list(seen), "train": train_docs.paths(),
         "val": val.paths(), "tokenizer": tok.to_json()}
  del seen[:]
  mesh = S.make_mesh(MeshConfig(data=2))
  stream = multihost.TrainStream(
      cfg, tok, train_docs, S.batch_sharding(mesh, cfg.batch_size,
                                             cfg.seq_len))
  first = next(stream)
  out["first_inputs"] = np.asarray(
      first["inputs"].addressable_shards[0].data).tolist()
  for _ in range(29):
    next(stream)
  out["stream"] = list(seen)
  del seen[:]
  if jax.process_index() == 0:
    data.heldout_batches(cfg, tok, val, 100)  # runs out: every file
  out["heldout"] = list(seen)
  try:  # process 0 fails to build one: each process raises, none waits
    multihost.shared_tokenizer(cfg, [""], None)
  except Exception as e:  # pylint: disable=broad-except
    out["failure"] = f"{type(e).__name__}: {e}"
  with open(os.path.join(out_dir, f"reads{pid}.json"), "w") as f:
    json.dump(out, f)


def _reads_config(corpus_glob):
  return DataConfig(source="files", paths=tuple(corpus_glob.split(",")),
                    tokenizer="bpe", bpe_vocab_size=300, seq_len=32,
                    batch_size=4, val_fraction=0.25, seed=5)


def test_two_processes_read_only_their_share(tmp_path, reads):
  """Two local processes: process 1 reads no text to prepare (process 0
  reads the BPE sample, trains and sends the tokenizer: the same as one
  process trains) and then only its share of the train files; process 0
  its share and the validation files."""
  paths = ",".join(corpus(tmp_path))
  port = _free_port()
  procs = [_spawn([os.path.abspath(__file__), "reads", str(tmp_path),
                   str(port), str(p), paths]) for p in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[1][1][-3000:]
  r = []
  for p in range(2):
    with open(tmp_path / f"reads{p}.json") as f:
      r.append(json.load(f))
  # One process, in this one: the same split, sample and tokenizer.
  cfg = _reads_config(paths)
  tok, train_docs, val = data.prepare(cfg, None)
  sample = list(reads)
  assert sample and r[0]["prepare"] == sample and r[1]["prepare"] == []
  assert r[0]["tokenizer"] == r[1]["tokenizer"] == tok.to_json()
  assert r[0]["train"] == r[1]["train"] == train_docs.paths()
  assert r[0]["val"] == r[1]["val"] == val.paths()
  for g in range(2):
    share = {p for p in train_docs.paths()[g::2] if p}
    assert set(r[g]["stream"]) == share, g
    assert len(r[g]["stream"]) == len(share), g  # each file read once
    want = next(data.make_train_iterator(cfg, tok, train_docs, (g, 2)))
    np.testing.assert_array_equal(r[g]["first_inputs"], want["inputs"])
  assert sorted(r[0]["heldout"]) == sorted(p for p in val.paths() if p)
  assert r[1]["heldout"] == []
  assert r[0]["failure"] == ("ValueError: cannot train a BPE tokenizer: the "
                             "train documents are empty")
  assert r[1]["failure"].startswith("DataError: process 0 could not build")
  # The JSONL lines are read in full by both, and each says so.
  assert all("holds 4 documents read in full" in err for _, err in outs)
  assert "BPE tokenizer: received from process 0" in outs[1][1]


class _Device:
  def __init__(self, process):
    self.process_index = process


class _Sharding:
  """What process_share reads of a NamedSharding: device -> index."""
  spec = "fake"

  def __init__(self, blocks):  # [(process, rows, cols)], one per device
    self.map = {_Device(p): (slice(*r), slice(*c)) for p, r, c in blocks}

  def devices_indices_map(self, shape):
    del shape
    return self.map


def test_process_share_groups_the_processes_by_rows(monkeypatch):
  # Four processes, rows over two pairs, positions split within each pair
  # (mesh.sequence across processes): two groups, each process its columns.
  seq = _Sharding([(0, (0, 4), (0, 8)), (1, (0, 4), (8, 16)),
                   (2, (4, 8), (0, 8)), (3, (4, 8), (8, 16))])
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  group, groups, group_of, block = multihost.process_share(seq, (8, 16))
  assert (group, groups, group_of) == (0, 2, [0, 0, 1, 1])
  assert block == (slice(0, 4), slice(8, 16))
  monkeypatch.setattr(jax, "process_index", lambda: 2)
  assert multihost.process_share(seq, (8, 16))[0] == 1
  # Two processes that both hold every row (replicated over tensor): one
  # group, the single stream.
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  rep = _Sharding([(0, (0, 8), (0, 16)), (1, (0, 8), (0, 16))])
  assert multihost.process_share(rep, (8, 16))[:3] == (0, 1, [0, 0])
  # Rows 0:2 and 4:6 on process 0: not one block.
  with pytest.raises(ConfigError, match="process 0's devices hold a batch "
                     "block that is not one rectangle"):
    multihost.process_share(_Sharding([
        (0, (0, 2), (0, 16)), (1, (2, 4), (0, 16)),
        (0, (4, 6), (0, 16)), (1, (6, 8), (0, 16))]), (8, 16))
  with pytest.raises(ConfigError, match="overlap or differ in size"):
    multihost.process_share(_Sharding([
        (0, (0, 6), (0, 16)), (1, (6, 8), (0, 16))]), (8, 16))


# ----------------------------------------------------- init on its shardings


def worker_init(out_dir):
  """On 8 simulated devices: train.init_params under a transfer guard that
  refuses every host<->device copy, its compiled program, and the eager
  one-device init with the same key; writes init.json."""
  cfg = _config()
  mesh = S.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  with jax.transfer_guard("disallow_explicit"):
    params = train.init_params(cfg, mesh)
  compiled = train.param_initializer(cfg, mesh).lower().compile()
  text, mem = compiled.as_text(), compiled.memory_analysis()
  eager = train.flatten(P.init_params(cfg.model, jax.random.PRNGKey(cfg.seed)))
  flat = train.flatten(params)
  want = train.flatten(S.param_shardings(cfg.model, mesh))
  out = {
      "shardings_match": all(flat[k].sharding == want[k] for k in want),
      "sharded_leaves": sum(not v.sharding.is_fully_replicated
                            for v in flat.values()),
      "shards_are_shard_shaped": all(
          s.data.shape == v.sharding.shard_shape(v.shape)
          for v in flat.values() for s in v.addressable_shards),
      "equal_to_eager": [k for k in eager
                         if not np.array_equal(np.asarray(flat[k]), eager[k])],
      "collectives": sum(text.count(op) for op in (
          " all-gather(", " all-reduce(", " collective-permute(",
          " all-to-all(", " reduce-scatter(")),
      "argument_bytes": mem.argument_size_in_bytes,
      "output_bytes": mem.output_size_in_bytes,
      "shard_bytes": sum(int(np.prod(v.sharding.shard_shape(v.shape)))
                         * v.dtype.itemsize for v in flat.values()),
      "full_bytes": sum(v.nbytes for v in eager.values()),
  }
  with open(os.path.join(out_dir, "init.json"), "w") as f:
    json.dump(out, f)


def test_params_are_initialised_under_jit_on_their_shardings(tmp_path):
  proc = _spawn([os.path.abspath(__file__), "init", str(tmp_path)], devices=8)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  with open(tmp_path / "init.json") as f:
    r = json.load(f)
  assert r["shardings_match"] and r["shards_are_shard_shaped"], r
  assert r["sharded_leaves"] >= 10, r
  # Bit for bit the eager init of one device with the same key.
  assert r["equal_to_eager"] == [], r
  # The program takes nothing from the host (the key is made inside), needs
  # no collective, and each device's output is its shards alone (a little
  # alignment aside), about a third of the model here.
  assert r["argument_bytes"] == 0 and r["collectives"] == 0, r
  assert r["shard_bytes"] <= r["output_bytes"] <= r["shard_bytes"] + 1024, r
  assert r["output_bytes"] < r["full_bytes"] / 2, r


# ------------------------------------------------------- SIGTERM, 2 processes


N_STEPS = 60


def _launch_both(workdir, sets):
  args = [os.path.join(ROOT, "launch.py"), "tiny_run"]
  for item in sets:
    args += ["--set", item]
  args += ["--workdir", str(workdir)]
  port = _free_port()
  return [_spawn(args + ["--coordinator", f"localhost:{port}",
                         "--num-processes", "2", "--process-id", "0"]),
          # The second process reads the same settings from the environment.
          _spawn(args, env={"DSAX_COORDINATOR": f"localhost:{port}",
                            "DSAX_NUM_PROCESSES": "2",
                            "DSAX_PROCESS_ID": "1"})]


def _reference_losses(cfg, n):
  """One device, pretraining steps on the global batches that the two
  processes' streams make (rows of process 0, then of process 1)."""
  tok, train_docs, _ = data.prepare(cfg.data, None)
  its = [data.make_train_iterator(cfg.data, tok, train_docs, (g, 2))
         for g in range(2)]
  mesh = S.make_mesh(MeshConfig(), jax.devices()[:1])
  phase = cfg.phases[0]
  state, frozen, tx, sched = train.init_state(
      cfg, phase, train.init_params(cfg, mesh), mesh)
  step = train.make_train_step(cfg, phase, tx, sched, mesh)
  losses = []
  for _ in range(n):
    parts = [next(it) for it in its]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, out = step(state, frozen, S.global_batch(
        batch, train.data_sharding(cfg, mesh)))
    losses.append(float(out["loss"]))
  return losses


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  sets = FAST + [f"phases.pretrain.steps={N_STEPS}", "phases.warmup.steps=0",
                 "phases.sparse.steps=0", "phases.dense.steps=0"]
  workdir = tmp_path / "run"
  t0 = time.perf_counter()
  procs = _launch_both(workdir, sets)
  # Process 0 writes a metrics row per step, one step late: once it has
  # written two, the steps are running; then signal process 1 alone.
  path = workdir / "metrics.jsonl"
  while not (path.exists() and len(path.read_text().splitlines()) >= 2):
    assert all(p.poll() is None for p in procs), procs[0].stderr.read()
    assert time.perf_counter() - t0 < 300
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300) for p in procs]
  first = time.perf_counter() - t0
  errs = [e for _, e in outs]
  assert [p.returncode for p in procs] == [0, 0], errs[1][-3000:]
  saved = [re.findall(r"saved phase 'pretrain' step (\d+) \(checkpoint "
                      r"step (\d+)\)", e) for e in errs]
  assert saved[0] and saved[0] == saved[1], errs
  step = int(saved[0][0][0])
  assert "SIGTERM" in errs[1] and "a signal to another process" in errs[0]
  assert 2 <= step < N_STEPS
  ckpt = workdir / "ckpt"
  assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [step]
  with open(ckpt / str(step) / "data" / "metadata") as f:
    data_state = json.load(f)
  assert data_state["groups"] == 2 and len(data_state["streams"]) == 2
  # Each stream has cut 4 rows (8 / 2 processes) per step taken.
  assert [st["row"] for st in data_state["streams"]] == [4 * step] * 2
  # Each process read only its share of the train documents.
  shares = [re.search(r"process (\d) reads train documents i % 2 == (\d) "
                      r"\((\d+) of (\d+)\)", e) for e in errs]
  assert all(shares), errs
  assert [m.group(1) for m in shares] == ["0", "1"]
  assert [m.group(2) for m in shares] == ["0", "1"]
  n = int(shares[0].group(4))
  assert [int(m.group(3)) for m in shares] == [(n + 1) // 2, n // 2]
  # The rerun resumes from that step on both and runs the phase to its end.
  procs = _launch_both(workdir, sets)
  outs = [p.communicate(timeout=300) for p in procs]
  errs = [e for _, e in outs]
  assert [p.returncode for p in procs] == [0, 0], errs[1][-3000:]
  assert all(f"resuming from global step {step}" in e for e in errs), errs
  assert "[process 1]" in errs[1] and "mesh {'data': 2" in errs[1]
  # Each process reports the same last loss.
  done = [re.search(rf"phase pretrain done: {N_STEPS} steps;.* loss "
                    r"([-+.e0-9]+),", e) for e in errs]
  assert all(done), errs[1][-2000:]
  assert done[0].group(1) == done[1].group(1)
  rows = sorted((r["step"], r["loss"]) for r in
                metrics.read_metrics(str(workdir)) if "loss" in r)
  assert [s for s, _ in rows] == list(range(1, N_STEPS + 1))
  wall = time.perf_counter() - t0
  ref = _reference_losses(_config(sets), N_STEPS)
  np.testing.assert_allclose([l for _, l in rows], ref, rtol=LOSS_RTOL,
                             atol=LOSS_ATOL)
  print(f"stopped both at step {step}; first launch {first:.1f} s, both "
        f"launches {wall:.1f} s")


if __name__ == "__main__":
  if sys.argv[1] == "init":
    worker_init(*sys.argv[2:])
  elif sys.argv[1] == "reads":
    worker_reads(*sys.argv[2:])
