"""Retrieval evals: teacher-forced scoring of ``dsax.tasks`` examples.

An example is encoded as ``ids = encode(prompt) + encode(answer)`` (prompt and
answer tokenised separately, so the answer's tokens do not depend on a merge
across the seam; with the bytes tokenizer this is the same as encoding the
concatenation). With P prompt tokens and A answer tokens, answer token j is
predicted by the logits at position P - 1 + j of one forward pass over
``ids[:-1]``:

  correct    every answer token is the argmax at its position (exact match)
  token_acc  the share of answer tokens that are the argmax
  logprob    sum of the answer tokens' log-probabilities

The scorer takes a ``LogitsFn``: ``fn(tokens_BT) -> logits_BTV`` (numpy in, an
array out), so a fake "model" can stand in for the real one in tests.
Examples are sorted by length and batched; a batch is right-padded with token 0
up to a multiple of ``pad_to`` (causal models: padding after a position does not
change its logits), so few shapes are compiled.

Greedy check (``greedy_scores``): the answer generated token by token and scored
with ``dsax.tasks.score``. A model uses ``dsax.decode.generate`` (latent cache,
absorbed form; sparse attention also caches the indexer keys and attends to the
top-k rows per step); a bare ``LogitsFn`` (a test's fake model) re-runs the
full forward once per generated token.

Eval sets (``build_eval_set``): every cell (task, length, depth) draws from its
own generator seeded with ``(seed, task index, length, depth index)``, so the same
seed gives byte-identical prompts, and a cell does not change when others are
added or dropped. Lengths below a task's shortest example are skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from dsax import tasks, tasks_needles

LogitsFn = Callable[[np.ndarray], Any]

PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue",
               "niah_multiquery", "variable_tracking", "cwe", "fwe")
# Tasks with a filler around their needles (noise or natural-text haystack).
NEEDLE_TASKS = frozenset(tasks_needles.LAYOUTS)


@dataclasses.dataclass(frozen=True)
class Encoded:
  ids: np.ndarray       # prompt + answer tokens, int32
  n_prompt: int

  @property
  def n_answer(self) -> int:
    return len(self.ids) - self.n_prompt


def encode(example: tasks.Example, tokenizer) -> Encoded:
  p = np.asarray(tokenizer.encode_array(example.prompt), np.int32)
  a = np.asarray(tokenizer.encode_array(example.answer), np.int32)
  if len(p) == 0 or len(a) == 0:
    raise ValueError(f"{example.task}: empty prompt or answer after encoding")
  return Encoded(np.concatenate([p, a]), len(p))


# ------------------------------------------------------------- eval sets


def build_eval_set(tokenizer, seed: int, lengths: Sequence[int],
                   depths: Sequence[float] = PASSKEY_DEPTHS,
                   task_names: Sequence[str] = ("passkey",) + RULER_TASKS
                   + ("mqar",), per_cell: int = 4,
                   haystacks: Sequence[str] = tasks.HAYSTACKS
                   ) -> list[tasks.Example]:
  """Passkey on lengths x depths (its Landmark filler); every other task per
  length (depth drawn), the needle tasks once per haystack in ``haystacks``.

  ``meta["cell"]`` = {"task", "length", "depth", "haystack"} (depth None off
  the grid; haystack None for the list tasks, which are their own haystack).
  """
  def count(text: str) -> int:
    return len(tokenizer.encode_array(text))

  out = []
  for ti, task in enumerate(task_names):
    shortest = tasks.min_tokens(task, count)
    cell_depths = depths if task == "passkey" else (None,)
    stacks = (("noise",) if task == "passkey" or task not in NEEDLE_TASKS
              else tuple(haystacks))
    for length in lengths:
      if length < shortest + tasks.tolerance(length):
        continue
      for hi, stack in enumerate(stacks):
        hay = stack if task in NEEDLE_TASKS else None
        for di, depth in enumerate(cell_depths):
          rng = np.random.default_rng([seed, ti, int(length), di, hi])
          for _ in range(per_cell):
            ex = tasks.generate(task, rng, int(length), count, stack, depth)
            ex.meta["cell"] = {"task": task, "length": int(length),
                               "depth": depth, "haystack": hay}
            out.append(ex)
  return out


def table_name(cell: dict) -> str:
  """A task's row in the accuracy tables: ``niah_single/natural`` for a
  needle task on a named haystack, else the task (passkey: its own filler)."""
  hay = cell.get("haystack")
  if hay is None or cell["task"] == "passkey":
    return cell["task"]
  return f"{cell['task']}/{hay}"


# ------------------------------------------------------- teacher forcing


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
  order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def teacher_forced(logits_fn: LogitsFn, encoded: Sequence[Encoded],
                   batch_size: int = 8, pad_to: int = 64) -> list[dict]:
  """Per example: correct, token_acc, logprob, n_answer (in input order).
  Only [B, T] per-position results leave the device (``_target_stats``),
  not the [B, T, V] logits."""
  results: list[dict] = [{} for _ in encoded]
  for group in _batches([len(e.ids) for e in encoded], batch_size):
    t = max(len(encoded[i].ids) - 1 for i in group)
    t = -(-t // pad_to) * pad_to
    tokens = np.zeros((len(group), t), np.int32)
    targets = np.zeros((len(group), t), np.int32)
    for r, i in enumerate(group):
      ids = encoded[i].ids
      tokens[r, :len(ids) - 1] = ids[:-1]
      targets[r, :len(ids) - 1] = ids[1:]
    hit_BT, logp_BT = (np.asarray(a) for a in
                       _target_stats(logits_fn(tokens), targets))
    for r, i in enumerate(group):
      e = encoded[i]
      pos = np.arange(e.n_prompt - 1, len(e.ids) - 1)
      hit = hit_BT[r, pos]
      results[i] = {"correct": bool(hit.all()), "token_acc": float(hit.mean()),
                    "logprob": float(logp_BT[r, pos].astype(np.float64).sum()),
                    "n_answer": int(len(pos))}
  return results


def _target_stats(logits_BTV, targets_BT):
  """(argmax == target, log p(target)) per position, [B, T] each, computed
  where the logits are (jitted once per shape)."""
  global _TARGET_STATS  # pylint: disable=global-statement
  if _TARGET_STATS is None:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    def stats(logits_BTV, targets_BT):
      logits_BTV = logits_BTV.astype(jnp.float32)
      logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
      logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None],
                                    axis=-1)[..., 0]
      return jnp.argmax(logits_BTV, -1) == targets_BT, logp_BT
    _TARGET_STATS = jax.jit(stats)
  return _TARGET_STATS(logits_BTV, targets_BT)


_TARGET_STATS = None


def score_examples(logits_fn: LogitsFn, examples: Sequence[tasks.Example],
                   tokenizer, batch_size: int = 8,
                   pad_to: int = 64) -> list[dict]:
  """``teacher_forced`` on examples, each result with its ``cell``."""
  encoded = [encode(ex, tokenizer) for ex in examples]
  res = teacher_forced(logits_fn, encoded, batch_size, pad_to)
  for ex, r, e in zip(examples, res, encoded):
    r.update(cell=ex.meta.get("cell", {"task": ex.task,
                                       "length": len(e.ids), "depth": None,
                                       "haystack": ex.meta.get("haystack")}),
             n_tokens=int(len(e.ids)))
  return res


def accuracy_tables(results: Sequence[dict]) -> dict[str, Any]:
  """``passkey``: {length: {depth: acc}}; ``tasks``: {task: {length: acc}}
  with needle tasks split by haystack (``table_name``); also ``token_acc``
  per task and length. Keys are strings (JSON)."""
  cells: dict[tuple, list[dict]] = {}
  for r in results:
    c = r["cell"]
    cells.setdefault((table_name(c), c["length"], c["depth"]), []).append(r)
  passkey: dict[str, dict[str, float]] = {}
  per_task: dict[str, dict[str, list]] = {}
  token: dict[str, dict[str, list]] = {}
  for (task, length, depth), rs in sorted(
      cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0.0)):
    acc = [float(r["correct"]) for r in rs]
    if task == "passkey" and depth is not None:
      passkey.setdefault(str(length), {})[f"{depth:g}"] = float(np.mean(acc))
    per_task.setdefault(task, {}).setdefault(str(length), []).extend(acc)
    token.setdefault(task, {}).setdefault(str(length), []).extend(
        r["token_acc"] for r in rs)
  mean = lambda d: {t: {l: float(np.mean(v)) for l, v in x.items()}
                    for t, x in d.items()}
  return {"passkey": passkey, "tasks": mean(per_task),
          "token_acc": mean(token)}


# ------------------------------------------------------------ the model


def model_logits_fn(params, model_cfg, attention: str = "dense",
                    topk: int | None = None,
                    selection: str = "indexer") -> LogitsFn:
  """A jitted ``tokens_BT -> logits_BTV`` of ``dsax.model.forward``; sparse
  attention at ``topk`` (None: the config's), keys by ``selection``
  ("indexer", "local" or "oracle")."""
  from dsax.attention import AttentionMode  # pylint: disable=import-outside-toplevel
  mode = AttentionMode.of(model_cfg, attention,
                          topk=topk if attention == "sparse" else 0,
                          selection=selection)
  key = (model_cfg, mode)
  if key not in _JITTED:
    import jax  # pylint: disable=import-outside-toplevel
    from dsax import model  # pylint: disable=import-outside-toplevel

    def f(p, tokens_BT):
      return model.forward(p, tokens_BT, model_cfg, mode=mode)[0]

    _JITTED[key] = jax.jit(f)
  f = _JITTED[key]
  return lambda tokens: f(params, tokens)


# One compiled forward per (config, attention, k), shared by parameter sets.
_JITTED: dict[tuple, Any] = {}


def greedy_subset(examples: Sequence[tasks.Example],
                  n: int) -> list[tasks.Example]:
  """Up to n examples, taken round-robin over the tasks (first ones first)."""
  by_task: dict[str, list] = {}
  for ex in examples:
    by_task.setdefault(ex.task, []).append(ex)
  out, i = [], 0
  while len(out) < n and any(i < len(v) for v in by_task.values()):
    out += [v[i] for v in by_task.values() if i < len(v)][:n - len(out)]
    i += 1
  return out


def _generate_by_forward(logits_fn: LogitsFn, ids: np.ndarray,
                         steps: int, pad_to: int = 64) -> np.ndarray:
  """Greedy tokens from re-running a full forward per token."""
  t = -(-(len(ids) + steps) // pad_to) * pad_to
  buf = np.zeros((1, t), np.int32)
  buf[0, :len(ids)] = ids
  n = len(ids)
  out = []
  for _ in range(steps):
    logits = np.asarray(logits_fn(buf))
    tok = int(np.argmax(logits[0, n - 1]))
    out.append(tok)
    buf[0, n] = tok
    n += 1
  return np.asarray(out, np.int32)


def greedy_scores(examples: Sequence[tasks.Example], tokenizer, *,
                  logits_fn: LogitsFn | None = None, params=None,
                  model_cfg=None, attention: str = "dense",
                  topk: int | None = None,
                  extra_tokens: int = 0,
                  selection: str = "indexer") -> list[dict]:
  """Greedy answers (as many tokens as the reference, plus ``extra_tokens``)
  scored with ``tasks.score``. With params (and no logits_fn):
  ``decode.generate`` (sparse at ``topk``); otherwise, and for a sparse
  baseline ``selection`` ("local", "oracle": decoding selects with the
  indexer), a full forward per generated token."""
  if (params is not None and logits_fn is None and attention == "sparse"
      and selection != "indexer"):
    logits_fn = model_logits_fn(params, model_cfg, attention, topk, selection)
  out = []
  for ex in examples:
    e = encode(ex, tokenizer)
    steps = e.n_answer + extra_tokens
    prompt = e.ids[:e.n_prompt]
    if params is not None and logits_fn is None:
      import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
      from dsax import decode  # pylint: disable=import-outside-toplevel
      from dsax.attention import AttentionMode  # pylint: disable=import-outside-toplevel
      mode = AttentionMode.of(model_cfg, attention,
                              topk=topk if attention == "sparse" else 0)
      full = decode.generate(params, jnp.asarray(prompt[None]), model_cfg,
                             steps, mode=mode)
      gen = np.asarray(full)[0, len(prompt):]
      method = "decode.generate"
    else:
      method = "forward-per-token"
      gen = _generate_by_forward(logits_fn, prompt, steps)
    text = tokenizer.decode(gen)
    out.append({"cell": ex.meta.get("cell"), "prediction": text,
                "score": float(tasks.score(ex, text)),
                "method": method})
  return out
