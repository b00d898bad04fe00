"""A whole DSA run on CPU in about two minutes (mostly compilation): the tiny
model on 40 stdlib files.

  python launch.py tiny_run
  python launch.py tiny_run --set phases.sparse.steps=20 --dry-run

Phases: dense pretraining, indexer warm-up (dense attention, indexer only),
sparse training (top-16 of 128 tokens), and a dense control that starts from
the same pretrained weights and replays the sparse phase's data.
"""

import dataclasses

from configs.tiny import model_config
from dsax.config import (ConfigError, DataConfig, EvalConfig,
                         ExperimentConfig, OptimConfig, PhaseConfig)


def get_config(arg=None) -> ExperimentConfig:
  if arg is not None:
    raise ConfigError(f"tiny_run takes no ARG (tiny_run:ARG), got {arg!r}")
  model = model_config()
  model = dataclasses.replace(
      model, indexer=dataclasses.replace(model.indexer, topk=16))
  return ExperimentConfig(
      name="tiny_run",
      model=model,
      data=DataConfig(source="stdlib", max_docs=40, tokenizer="bytes",
                      seq_len=128, batch_size=4),
      phases=(
          PhaseConfig(name="pretrain", kind="pretrain", steps=20,
                      optim=OptimConfig(lr=3e-3, lr_warmup_steps=5)),
          PhaseConfig(name="warmup", kind="warmup", steps=10,
                      optim=OptimConfig(lr=1e-3, lr_warmup_steps=2,
                                        schedule="constant")),
          PhaseConfig(name="sparse", kind="sparse", steps=10,
                      optim=OptimConfig(lr=1e-3, lr_warmup_steps=2),
                      indexer_optim=OptimConfig(lr=1e-3, lr_warmup_steps=2)),
          PhaseConfig(name="dense", kind="pretrain", steps=10,
                      optim=OptimConfig(lr=1e-3, lr_warmup_steps=2),
                      init_from="pretrain", data_from="sparse"),
      ),
      eval=EvalConfig(every=10, batches=2, final_batches=2),
      log_every=5,
      save_every=0,
      control="dense",
  )
