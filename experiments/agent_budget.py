"""Context policies under a token budget on a multi-turn tool task, for a
dense model and its DSA version (issue 15 item 5), on a CPU.

Task (dsax.rl.agent): an episode asks TURNS questions, one per user turn,
over one key-value store; each answer is the end of a pointer chain of
HOPS ``get(key)`` calls (SmolLM2 chat format, tool calls as JSON, a short
reasoning before each call and before the answer, opening with the key or
value just read). Keys are ``k0``..``k9``, final values one upper-case
letter (``A.UPPER``), reachable only through tool results: every
character the model must copy is of a kind the template never writes.

Model: a byte-level MLA model (vocab 256 + 2 chat tokens) supervised on the
scripted solver's traces: every user turn's sample as the model sees it
under each policy (rule 1, every reasoning kept, earlier tool history
discarded), loss on the generated tokens only, samples packed into rows.
Training runs in stages:

  copy     COPY_STEPS on short windows (one generated message with only
           the message before it as context), loss on the copied
           characters only (``copy_mask``): forms the copy heads, which
           SFT on whole traces alone does not (its loss sat at the copy
           characters' chance level for 900 steps)
  sft      SFT_STEPS on whole traces, half the samples cut to windows
           (``short``), the copied characters weighted COPY_WEIGHT
  warmup   DSA indexer warm-up (indexer KL, dense attention, the rest
           frozen)
  sparse   top-TOPK attention, LM loss (as sft) + indexer KL

Evaluation: greedy rollouts (dsax.rl.agent.AgentSampler, the latent-cache
decode, sparse for DSA) on held-out episodes under three context policies
and each budget (prompt + reply <= budget tokens):

  keep_all        every reasoning kept; a prompt over the budget fails
  drop_reasoning  V3.2's rule 1; over the budget fails
  discard_tools   rule 1, and over the budget all tool history is dropped

The same rollouts with the scripted solver forced in place of the model
(``oracle``: ``AgentSampler.run(force=agent.oracle)``) show what each
policy allows a perfect solver within the budget. Reported per model,
policy and budget: accuracy (exact-match answers over
all questions), the mean peak context, generated and fed tokens per
episode, and why episodes stopped; a table and a PNG in
docs/results/agent_budget.md.

  python experiments/agent_budget.py --workdir work/agent_budget \
      --png docs/results/agent_budget.png        # the page's table
  python experiments/agent_budget.py --workdir work/agent_budget \
      --eval-only                    # re-evaluate the saved parameters
  python experiments/agent_budget.py --quick      # the smoke test's size

Logged every 25 steps: the LM loss and its parts on the key characters,
the value characters and the template (nats per token).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dsax import model, params as P  # noqa: E402
from dsax import train as train_lib  # noqa: E402
from dsax.attention import AttentionMode  # noqa: E402
from dsax.chat import Chat, SmolLM2, is_tool_history, user_turns  # noqa: E402
from dsax.config import IndexerConfig, ModelConfig  # noqa: E402
from dsax.rl import agent as A  # noqa: E402
from dsax.rl import sampling  # noqa: E402
from dsax.tokenizer import Tokenizer  # noqa: E402

TURNS, HOPS = 3, 2
TOPK = 64
REPLY = 128           # reply room: a call with its reasoning is 117 tokens
# Task: keys k0..k9 and one-letter values (upper case, no 'A'), so that
# every copy the model makes is one character of a kind the template never
# writes (module docstring).
TASK = dict(n_keys=10, value_len=1, letters=A.UPPER)
FULL = dict(d_model=96, row_len=1024, batch=4, copy_steps=300, sft_steps=900,
            warmup_steps=200, sparse_steps=300, short=0.5, copy_weight=5.0,
            episodes=16, budgets=(640, 1024), seed=0, **TASK)
QUICK = dict(d_model=32, row_len=1024, batch=2, copy_steps=2, sft_steps=3,
             warmup_steps=2, sparse_steps=2, short=0.5, copy_weight=5.0,
             episodes=2, budgets=(640,), seed=0, **TASK)


def chats():
  chat = Chat(SmolLM2(), base=Tokenizer("bytes"))
  return chat, Chat(SmolLM2(keep_reasoning=True), tokenizer=chat.tok)


def model_config(d_model: int, vocab: int, rope: int = 8,
                 layers: int = 2) -> ModelConfig:
  return ModelConfig(
      vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=4,
      q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
      qk_rope_head_dim=rope, v_head_dim=16, d_ff=4 * d_model, attn_q_chunk=64,
      indexer=IndexerConfig(n_heads=4, head_dim=32, rope_dim=16, topk=TOPK,
                            q_chunk=32))


# ---------------------------------------------------------------- SFT data


def views(chat, keep, ep):
  """(ids, mask) samples of one trace: each user turn as the model sees it
  under rule 1, with every reasoning kept, and with the earlier turns' tool
  history discarded."""
  conv = A.trace(ep)
  out = [(s.ids_T, s.mask_T) for s in chat.turn_samples(conv)]
  out += [(s.ids_T, s.mask_T) for s in keep.turn_samples(conv)[1:]]
  for start, end in user_turns(conv)[1:]:
    short = [m for i, m in enumerate(conv[:end])
             if i >= start or not is_tool_history(m)]
    s = chat.turn_samples(short)[-1]
    out.append((s.ids_T, s.mask_T))
  return out


def runs(mask) -> list[np.ndarray]:
  """The generated messages: runs of consecutive positions of ``mask``."""
  gen = np.flatnonzero(mask)
  return np.split(gen, np.flatnonzero(np.diff(gen) > 1) + 1)


def copy_mask(ids, mask):
  """The generated positions that copy from the context: (keys, values),
  the key's characters after its ``k`` (in reasoning and calls), and the
  final value (at the start of the reasoning before the answer, and the
  answer); the rest is template."""
  ids, mask = np.asarray(ids), np.asarray(mask, bool)
  keys, values = np.zeros(len(ids), bool), np.zeros(len(ids), bool)
  text = "".join(chr(i) if i < 128 else "\x00" for i in ids)
  for m in re.finditer(r"(?<=[^a-z]k)[0-9]+", text):
    keys[m.start():m.end()] = True
  for run in runs(mask):
    msg = text[run[0]:run[-1] + 1] if len(run) else ""
    if "<tool_call>" in msg or "</think>\n\n" not in msg:
      continue
    a = run[0] + msg.rindex("</think>\n\n") + len("</think>\n\n")
    values[a:run[-1]] = True   # the end token is template
    m = re.search(r"<think>\n(\S+) ", msg)
    if m:
      values[run[0] + m.start(1):run[0] + m.end(1)] = True
  return keys & mask, values & mask


def window(ids, mask, start_id, rng):
  """A short sample cut from (ids, mask): one generated message picked at
  random, with only the message before it (a user message or a tool
  result) as its context."""
  ids, mask = np.asarray(ids), np.asarray(mask, bool)
  messages = runs(mask)
  run = messages[rng.integers(len(messages))]
  opens = np.flatnonzero(ids[:run[0]] == start_id)
  a = opens[-2] if len(opens) > 1 else 0
  m = np.zeros(run[-1] + 1 - a, bool)
  m[run[0] - a:] = True
  return ids[a:run[-1] + 1], m


def rows(chat, keep, rng, n_rows: int, row_len: int, task=None,
         short: float = 0.0):
  """Samples packed into rows: inputs, targets, weights (generated targets),
  keys and values (the generated targets copied from the context:
  ``copy_mask``'s key characters and final-value characters),
  segment ids, positions; samples longer than a row are skipped."""
  arr = {k: np.zeros((n_rows, row_len), np.int32)
         for k in ("inputs", "targets", "segment_ids", "positions")}
  arr["weights"] = np.zeros((n_rows, row_len), np.float32)
  arr["keys"] = np.zeros((n_rows, row_len), np.float32)
  arr["values"] = np.zeros((n_rows, row_len), np.float32)
  r, col, seg, pending = 0, 0, 1, []
  while r < n_rows:
    if not pending:
      pending = views(chat, keep, A.make_episode(rng, TURNS, HOPS,
                                                 **(task or {})))
      rng.shuffle(pending)
    ids, mask = pending.pop()
    if short and rng.random() < short:
      ids, mask = window(ids, mask, chat.tok.id_of("<|im_start|>"), rng)
    n = len(ids) - 1
    if n > row_len:
      continue
    if col + n > row_len:
      r, col = r + 1, 0
      if r == n_rows:
        break
    sl = slice(col, col + n)
    arr["inputs"][r, sl] = ids[:-1]
    arr["targets"][r, sl] = ids[1:]
    arr["weights"][r, sl] = mask[1:]
    keys, values = copy_mask(ids, mask)
    arr["keys"][r, sl] = keys[1:]
    arr["values"][r, sl] = values[1:]
    arr["segment_ids"][r, sl] = seg
    arr["positions"][r, sl] = np.arange(n)
    col, seg = col + n, seg + 1
  return {k: jnp.asarray(v) for k, v in arr.items()}


# ---------------------------------------------------------------- training


def phase_mode(cfg, kind):
  if kind == "sparse":
    return AttentionMode.of(cfg, "sparse", topk=TOPK, indexer_loss=True)
  return AttentionMode.of(cfg, "dense", topk=TOPK,
                          indexer_loss=kind == "warmup")


def train(params, cfg, kind, steps, lr, data, log, copy_weight=1.0):
  """sft: LM loss; copy: LM loss on the copied characters (``copy_mask``)
  only; warmup: indexer KL, only the indexer moves; sparse: LM loss +
  indexer KL (the indexer's inputs are detached in dsax.dsa). sft and
  sparse weigh the copied characters ``copy_weight`` times a template
  token; ``lm`` in the log is the plain mean over generated tokens."""
  mode = phase_mode(cfg, kind)
  tx = optax.adam(optax.linear_schedule(lr, lr, 1) if steps < 10 else
                  optax.warmup_constant_schedule(0.0, lr, 10))
  opt = tx.init(params)

  def loss_fn(p, b):
    logits, aux = model.forward(p, b["inputs"], cfg, b["segment_ids"],
                                mode=mode, positions_BT=b["positions"])
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(lp, b["targets"][..., None], -1)[..., 0]
    def mean(w):
      return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1)
    lm = mean(b["weights"])
    # Diagnostics: the loss on copied characters and on the template.
    cp = jnp.stack([mean(b["keys"]), mean(b["values"])])
    tm = mean(b["weights"] - b["keys"] - b["values"])
    kl = (jnp.sum(aux.indexer_kl) if kind in ("warmup", "sparse") else
          0.0)
    w = b["weights"] + (copy_weight - 1.0) * (b["keys"] + b["values"])
    if kind == "copy":
      w = b["keys"] + b["values"]
    loss = kl if kind == "warmup" else mean(w) + kl
    return loss, (lm, kl, cp, tm)

  @jax.jit
  def step(p, opt, b):
    (loss, (lm, kl, cp, tm)), g = jax.value_and_grad(loss_fn,
                                                     has_aux=True)(p, b)
    if kind == "warmup":
      g = {k: (v if k == "layers" else jax.tree.map(jnp.zeros_like, v))
           for k, v in g.items()}
      g["layers"] = {k: (v if k == "indexer" else
                         jax.tree.map(jnp.zeros_like, v))
                     for k, v in g["layers"].items()}
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, lm, kl, cp, tm

  t0 = time.time()
  for s in range(steps):
    params, opt, lm, kl, cp, tm = step(params, opt, data(s))
    if s % 25 == 0 or s == steps - 1:
      log(f"{kind} step {s}: lm {float(lm):.4f} (key {float(cp[0]):.3f} "
          f"value {float(cp[1]):.3f} template {float(tm):.4f}) "
          f"kl {float(kl):.4f} "
          f"({time.time() - t0:.0f}s)")
  return params


# -------------------------------------------------------------- evaluation


def evaluate(params, cfg, mode, chat, keep, policy, budget, episodes,
             reply=REPLY, force=None):
  acfg = A.AgentConfig(policy=policy, budget=budget, max_reply_tokens=reply,
                       max_calls=HOPS + 2,
                       sampling=sampling.SamplingConfig(0.0))
  sampler = A.AgentSampler(cfg, acfg, chat, keep, mode=mode)
  t0 = time.time()
  trajs = sampler.run(params, episodes, jax.random.PRNGKey(0), force=force)
  rew = np.array([t.rewards for t in trajs])
  return dict(
      policy=policy, budget=budget, accuracy=float(rew.mean()),
      by_turn=rew.mean(0).round(3).tolist(),
      peak=float(np.mean([t.peak for t in trajs])),
      generated=float(np.mean([t.generated for t in trajs])),
      fed=float(np.mean([t.fed for t in trajs])),
      budget_events=float(np.mean([t.budget_events for t in trajs])),
      stops=dict(collections.Counter(t.stop for t in trajs)),
      seconds=round(time.time() - t0, 1))


def run(opts: dict, workdir: str, log=print, eval_only: bool = False,
        resume: bool = False) -> list[dict]:
  """Trains (``resume``: SFT continues from the dense model a previous run
  saved in ``workdir``/params.npz; ``eval_only``: loads both models from
  it) and evaluates."""
  chat, keep = chats()
  cfg = model_config(opts["d_model"], chat.tok.vocab_size,
                     opts.get("rope", 8), opts.get("layers", 2))
  rng = np.random.default_rng(opts["seed"])
  task = {k: opts[k] for k in ("n_keys", "value_len", "letters")
          if k in opts}

  def data(short):
    return lambda _: rows(chat, keep, rng, opts["batch"], opts["row_len"],
                          task, short)

  saved = os.path.join(workdir, "params.npz")
  if eval_only:
    with np.load(saved) as f:
      flat = {k: jnp.asarray(v) for k, v in f.items()}
    dense = train_lib.unflatten({k[6:]: v for k, v in flat.items()
                                 if k.startswith("dense/")})
    dsa = train_lib.unflatten({k[4:]: v for k, v in flat.items()
                               if k.startswith("dsa/")})
  else:
    params = P.init_params(cfg, jax.random.PRNGKey(opts["seed"]))
    short, cw = opts.get("short", 0.0), opts.get("copy_weight", 1.0)
    if resume:   # more SFT from a previous run's dense model (fresh Adam)
      with np.load(saved) as f:
        params = train_lib.unflatten({k[6:]: jnp.asarray(v)
                                      for k, v in f.items()
                                      if k.startswith("dense/")})
      rng = np.random.default_rng([opts["seed"], 1])
    elif opts.get("copy_steps"):   # the copy curriculum (module docstring)
      params = train(params, cfg, "copy", opts["copy_steps"], 3e-3,
                     data(1.0), log)
    dense = train(params, cfg, "sft", opts["sft_steps"], 3e-3, data(short),
                  log, cw)
    dsa = train(dense, cfg, "warmup", opts["warmup_steps"], 3e-3, data(short),
                log)
    dsa = train(dsa, cfg, "sparse", opts["sparse_steps"], 3e-4, data(short),
                log, cw)
    os.makedirs(workdir, exist_ok=True)
    np.savez(saved, **{f"{name}/{k}": np.asarray(v)
                       for name, p in (("dense", dense), ("dsa", dsa))
                       for k, v in train_lib.flatten(p).items()})
  eval_rng = np.random.default_rng([opts["seed"], 7])
  episodes = [A.make_episode(eval_rng, TURNS, HOPS, **task)
              for _ in range(opts["episodes"])]
  out = []
  for name, p, mode in (("oracle", dense, AttentionMode.of(cfg)),
                        ("dense", dense, AttentionMode.of(cfg)),
                        ("dsa", dsa, AttentionMode.of(cfg, "sparse",
                                                      topk=TOPK))):
    for budget in opts["budgets"]:
      for policy in A.POLICIES:
        row = dict(model=name, **evaluate(
            p, cfg, mode, chat, keep, policy, budget, episodes,
            opts.get("reply", REPLY),
            force=A.oracle if name == "oracle" else None))
        log(json.dumps(row))
        out.append(row)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(dict(opts=opts, rows=out), f, indent=1)
  return out


# ------------------------------------------------------------------ report


def table(rows_: list[dict]) -> str:
  head = ("| model | budget | policy | accuracy | by turn | peak context | "
          "generated | fed | budget drops | stops |\n|" + "---|" * 10)
  lines = [head]
  for r in rows_:
    stops = ", ".join(f"{k} {v}" for k, v in sorted(r["stops"].items()))
    lines.append(
        f"| {r['model']} | {r['budget']} | {r['policy']} | "
        f"{r['accuracy']:.3f} | {' / '.join(f'{x:.2f}' for x in r['by_turn'])}"
        f" | {r['peak']:.0f} | {r['generated']:.0f} | {r['fed']:.0f} | "
        f"{r['budget_events']:.2f} | {stops} |")
  return "\n".join(lines)


def plot(rows_: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), sharey=True)
  marks = dict(keep_all="o", drop_reasoning="s", discard_tools="^")
  for ax, name in zip(axes, ("oracle", "dense", "dsa")):
    for pol, m in marks.items():
      rs = [r for r in rows_ if r["model"] == name and r["policy"] == pol]
      ax.plot([r["peak"] for r in rs], [r["accuracy"] for r in rs],
              marker=m, label=pol)
      for r in rs:
        ax.annotate(str(r["budget"]), (r["peak"], r["accuracy"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_title(name)
    ax.set_xlabel("mean peak context (tokens)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("accuracy")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--workdir", default=os.path.join(ROOT, "work",
                                                    "agent_budget"))
  ap.add_argument("--png", default=None)
  ap.add_argument("--eval-only", action="store_true",
                  help="evaluate the parameters a previous run saved")
  ap.add_argument("--resume", action="store_true",
                  help="continue SFT from the dense model a previous run "
                       "saved (then warm-up, sparse, evaluation)")
  ap.add_argument("--sft-steps", type=int, default=None)
  ap.add_argument("--rope", type=int, default=None,
                  help="qk_rope_head_dim (default 8)")
  ap.add_argument("--copy-steps", type=int, default=None)
  args = ap.parse_args(argv)
  opts = dict(QUICK if args.quick else FULL)
  if args.sft_steps is not None:
    opts["sft_steps"] = args.sft_steps
  if args.rope is not None:
    opts["rope"] = args.rope
  if args.copy_steps is not None:
    opts["copy_steps"] = args.copy_steps
  t0 = time.time()
  out = run(opts, args.workdir, eval_only=args.eval_only,
            resume=args.resume)
  print(table(out))
  if args.png:
    plot(out, args.png)
  print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
  main()
