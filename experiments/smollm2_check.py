"""SmolLM2-135M-Instruct imported from GGUF: perplexity on natural English,
dense passkey accuracy, and logit parity with transformers.

  python experiments/smollm2_check.py                     # dsax, the prepared model
  python experiments/smollm2_check.py --backend transformers   # the same numbers
                                                          # from torch, as a check
  python experiments/smollm2_check.py --parity 64         # + max |logit diff| vs
                                                          # transformers' own loader

Weights: ``--model-dir`` (``launch.py prepare smollm2``: params/,
model_config.json, tokenizer.json) for dsax; the GGUF (work/downloads, fetched
if missing) for the transformers backend and the parity check.

Perplexity: ``exp`` of the mean next-token NLL over ``--ppl-windows`` windows of
``--ppl-len`` tokens (each window scored from its own start; its first token is
context only) cut from the natural-text haystack of dsax.tasks_text (CPython
docstring and reference prose, ~600K characters), and the same on CPython's
LICENSE.txt. Passkey: ``--passkey-n`` teacher-forced prompts of
``--passkey-len`` tokens (dsax.evals.retrieval, depths 0..1), exact match.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "work", "models", "smollm2-135m-instruct")


def natural_text() -> str:
  from dsax import tasks_text
  return "\n\n".join(tasks_text.natural_paragraphs())


def licence_text() -> str:
  path = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
  with open(path, encoding="utf-8") as f:
    return f.read()


def windows(ids: np.ndarray, length: int, count: int) -> np.ndarray:
  """``count`` windows of ``length`` tokens spread evenly over ``ids``."""
  n = min(count, len(ids) // length)
  starts = np.linspace(0, len(ids) - length, n).astype(int)
  return np.stack([ids[s:s + length] for s in starts])


def perplexity(logits_fn, rows: np.ndarray, batch: int = 1) -> float:
  nll, count = 0.0, 0
  for i in range(0, len(rows), batch):
    tokens = rows[i:i + batch]
    logits = np.asarray(logits_fn(tokens[:, :-1]), np.float32)
    m = logits.max(-1, keepdims=True)
    logz = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    target = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    nll += float((logz - target).sum())
    count += target.size
  return float(np.exp(nll / count))


# ----------------------------------------------------------------- models


def gguf_model(downloads: str):
  from dsax.hf import gguf as G
  path = G.smollm2_gguf(downloads)
  return G.load(path) + (G.tokenizer(G.read(path)),)


def transformers_state(downloads: str):
  """(state dict, config) as transformers' own GGUF loader reads them."""
  import torch
  import transformers
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  from dsax.hf import gguf as G
  path = G.smollm2_gguf(downloads)
  hf_cfg = load_gguf_checkpoint(path)["config"]
  with torch.device("meta"):
    skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg))
  tensors = load_gguf_checkpoint(path, return_tensors=True,
                                 model_to_load=skeleton)["tensors"]
  return {k: v.float().numpy() for k, v in tensors.items()}, hf_cfg


def torch_logits_fn(state: dict, hf_cfg: dict):
  import torch
  import transformers
  cfg = transformers.LlamaConfig(**{k: v for k, v in hf_cfg.items()
                                    if k != "architectures"})
  net = transformers.LlamaForCausalLM(cfg).float().eval()
  missing, _ = net.load_state_dict(
      {k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  assert set(missing) <= {"lm_head.weight"}, missing
  net.tie_weights()

  def fn(tokens):
    with torch.no_grad():
      return net(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
  return fn


def dsax_model(model_dir: str):
  """(params, ModelConfig, tokenizers.Tokenizer) of a prepared model dir."""
  import tokenizers
  from dsax import checkpoint, config as C, params as P
  with open(os.path.join(model_dir, "model_config.json"), encoding="utf-8") as f:
    cfg = C.from_dict(C.ModelConfig, json.load(f))
  params = checkpoint.load_params(os.path.join(model_dir, "params"),
                                  P.abstract_params(cfg))
  tok = tokenizers.Tokenizer.from_file(os.path.join(model_dir,
                                                    "tokenizer.json"))
  return params, cfg, tok


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--backend", choices=("dsax", "transformers"),
                  default="dsax")
  ap.add_argument("--model-dir", default=MODEL_DIR)
  ap.add_argument("--downloads", default=os.path.join(ROOT, "work",
                                                      "downloads"))
  ap.add_argument("--ppl-len", type=int, default=1024)
  ap.add_argument("--ppl-windows", type=int, default=8)
  ap.add_argument("--passkey-len", type=int, default=2048)
  ap.add_argument("--passkey-n", type=int, default=20)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--parity", type=int, default=0, metavar="T",
                  help="also compare dsax logits with transformers' on T "
                  "tokens (0: skip)")
  args = ap.parse_args(argv)
  if args.backend == "dsax" and not os.path.isfile(
      os.path.join(args.model_dir, "model_config.json")):
    print(f"error: {args.model_dir} is not a dsax model directory (no "
          "model_config.json): run `python launch.py prepare smollm2` first, "
          "or pass --model-dir", file=sys.stderr)
    return 2

  from dsax.evals import retrieval as R
  from dsax.tokenizer import Tokenizer
  t0 = time.perf_counter()
  out: dict = {"backend": args.backend}
  if args.backend == "transformers":
    state, hf_cfg, bpe = gguf_model(args.downloads)
    logits_fn = torch_logits_fn(state, hf_cfg)
  else:
    params, cfg, bpe = dsax_model(args.model_dir)
    logits_fn = R.model_logits_fn(params, cfg)
    out["model"] = {"d_model": cfg.d_model, "n_layers": cfg.n_layers,
                    "vocab_size": cfg.vocab_size}
  tok = Tokenizer("file", bpe)
  print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

  for name, text in (("natural", natural_text()), ("licence", licence_text())):
    rows = windows(tok.encode_array(text), args.ppl_len + 1, args.ppl_windows)
    t = time.perf_counter()
    ppl = perplexity(logits_fn, rows, args.batch)
    out[f"ppl_{name}"] = {"ppl": round(ppl, 3), "windows": len(rows),
                          "tokens": int(rows[:, 1:].size),
                          "seconds": round(time.perf_counter() - t, 1)}
    print(name, out[f"ppl_{name}"], file=sys.stderr, flush=True)

  depths = R.PASSKEY_DEPTHS
  examples = R.build_eval_set(tok, 0, [args.passkey_len], depths,
                              task_names=("passkey",),
                              per_cell=max(1, args.passkey_n // len(depths)))
  t = time.perf_counter()
  res = R.score_examples(logits_fn, examples, tok, batch_size=args.batch)
  out["passkey"] = {
      "accuracy": float(np.mean([r["correct"] for r in res])),
      "token_acc": float(np.mean([r["token_acc"] for r in res])),
      "prompts": len(res), "mean_tokens": float(np.mean(
          [r["n_tokens"] for r in res])),
      "seconds": round(time.perf_counter() - t, 1)}
  print("passkey", out["passkey"], file=sys.stderr, flush=True)

  if args.parity and args.backend == "dsax":
    ref_fn = torch_logits_fn(*transformers_state(args.downloads))
    ids = tok.encode_array(natural_text())[None, :args.parity]
    a = np.asarray(logits_fn(ids), np.float32)
    b = ref_fn(ids)
    out["parity"] = {"tokens": int(ids.shape[1]),
                     "max_abs_diff": float(np.abs(a - b).max()),
                     "max_abs_logit": float(np.abs(b).max()),
                     "argmax_agree": float((a.argmax(-1) == b.argmax(-1)
                                            ).mean())}
  print(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
