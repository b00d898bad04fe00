"""Strict dotted overrides; phase configs by kind."""

import dataclasses
import json
import re

import pytest

from dsax.config import (ConfigError, ExperimentConfig, LossConfig,
                         ModelConfig, OptimConfig, PhaseConfig, dumps,
                         from_dict, override, to_dict, validate)


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str = "a"
  steps: int = 1


@dataclasses.dataclass(frozen=True)
class Exp:
  model: ModelConfig = ModelConfig()
  phases: tuple[Phase, ...] = (Phase("pretrain"), Phase("warmup"))
  tags: tuple[str, ...] = ()


def test_overrides_parse_types_and_address_phases_by_name_or_index():
  cfg = override(Exp(), ["model.d_model=96", "model.indexer.topk=8",
                         "phases.warmup.steps=7", "phases.0.steps=3",
                         "model.tie_embeddings=true", "tags=a,b"])
  assert cfg.model.d_model == 96 and cfg.model.indexer.topk == 8
  assert cfg.phases[1].steps == 7 and cfg.phases[0].steps == 3
  assert cfg.model.tie_embeddings is True and cfg.tags == ("a", "b")
  assert from_dict(Exp, to_dict(cfg)) == cfg


@pytest.mark.parametrize("item,needle", [
    ("model.d_modle=3", "model.d_modle"),
    ("model.d_model=wide", "model.d_model"),
    ("model.n_layers=0", "model.n_layers"),
    ("phases.sparse.steps=3", "phases.sparse.steps"),
    ("model.indexer.rope_dim=7", "model.indexer.rope_dim"),
    ("model.param_dtype=float16", "model.param_dtype"),
    ("model=3", "model"),
])
def test_bad_overrides_name_the_key(item, needle):
  with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
    override(Exp(), [item])


# ------------------------------------------------------ phases by kind

PHASES = (PhaseConfig(name="pretrain", kind="pretrain"),
          PhaseConfig(name="warmup", kind="warmup"),
          PhaseConfig(name="sparse", kind="sparse"))
RUN = ExperimentConfig(phases=PHASES)

# A key per field that means nothing for a kind, with a non-default value.
MEANINGLESS = [
    ("pretrain", "indexer_trainable", "^x"),
    ("pretrain", "indexer_optim.lr", 1e-4),
    ("pretrain", "loss.indexer_weight", 2.0),
    ("pretrain", "topk", 8),
    ("warmup", "trainable", "^x"),
    ("warmup", "indexer_optim.lr", 1e-4),
    ("warmup", "indexer_optim.lr_warmup_steps", 3),
    ("warmup", "loss.lm_weight", 2.0),
    ("warmup", "selection", "local"),
    ("warmup", "indexer_grad", "both"),
    ("pretrain", "selection", "oracle"),
    ("pretrain", "sinks", 2),
]


@pytest.mark.parametrize("kind,field,value", MEANINGLESS)
def test_override_of_a_meaningless_key_names_key_and_kind(kind, field, value):
  key = f"phases.{kind}.{field}"
  with pytest.raises(ConfigError) as e:
    override(RUN, [f"{key}={value}"])
  assert str(e.value).startswith(f"{key}={value} means nothing")
  assert f"kind={kind}" in str(e.value)


@pytest.mark.parametrize("kind,field,value", MEANINGLESS)
def test_config_setting_a_meaningless_field_is_refused(kind, field, value):
  index = [p.kind for p in PHASES].index(kind)
  group, _, leaf = field.rpartition(".")
  phase = PHASES[index]
  if group:
    sub = dataclasses.replace(getattr(phase, group), **{leaf: value})
    phase = dataclasses.replace(phase, **{group: sub})
  else:
    phase = dataclasses.replace(phase, **{field: value})
  cfg = dataclasses.replace(
      RUN, phases=PHASES[:index] + (phase,) + PHASES[index + 1:])
  with pytest.raises(ConfigError, match=rf"^phases\.{kind}\.{field}=") as e:
    validate(cfg)
  assert f"kind={kind}" in str(e.value)


@pytest.mark.parametrize("kind,fields", [
    ("pretrain", ["trainable=^layers/", "optim.lr=1e-4",
                  "optim.lr_warmup_steps=3", "loss.lm_weight=2", "steps=3",
                  "init_from=", "data_from=warmup"]),
    ("warmup", ["indexer_trainable=^layers/indexer/wk", "optim.lr=1e-4",
                "optim.schedule=constant", "loss.indexer_weight=2",
                "topk=8"]),
    ("sparse", ["trainable=^layers/", "indexer_trainable=^layers/indexer/",
                "optim.lr=1e-4", "indexer_optim.lr=1e-4",
                "indexer_optim.weight_decay=0.1", "loss.lm_weight=2",
                "loss.indexer_weight=2", "topk=8", "selection=local",
                "sinks=2", "indexer_grad=both"]),
])
def test_meaningful_keys_are_accepted(kind, fields):
  cfg = override(RUN, [f"phases.{kind}.{f}" for f in fields])
  assert cfg != RUN


def test_kind_override_counts_whatever_the_order():
  """The meaning of a key is judged with the kind after every override of
  the command; a file's kind-specific field left over by a kind change is
  refused by validation."""
  turn = ["phases.pretrain.kind=sparse",
          "phases.pretrain.indexer_optim.lr=1e-4"]
  a, b = override(RUN, turn), override(RUN, turn[::-1])
  assert a == b and a.phases[0].indexer_optim.lr == 1e-4
  for order in (1, -1):
    with pytest.raises(ConfigError, match="kind=pretrain"):
      override(RUN, ["phases.sparse.topk=8",
                     "phases.sparse.kind=pretrain"][::order])
  sparse = dataclasses.replace(PHASES[2], topk=8)
  cfg = dataclasses.replace(RUN, phases=PHASES[:2] + (sparse,))
  with pytest.raises(ConfigError,
                     match=r"^phases\.sparse\.topk=8 .*kind=pretrain"):
    override(cfg, ["phases.sparse.kind=pretrain"])
  # A renamed phase is addressed by its old name before the rename.
  cfg = override(RUN, ["phases.warmup.name=w", "phases.w.topk=8"])
  assert cfg.phases[1].name == "w" and cfg.phases[1].topk == 8


REPLACED = [
    ("phases.sparse.lr", "phases.sparse.optim.lr"),
    ("phases.sparse.indexer_lr", "phases.sparse.indexer_optim.lr"),
    ("phases.warmup.warmup_steps", "phases.warmup.optim.lr_warmup_steps"),
    ("phases.sparse.lm_weight", "phases.sparse.loss.lm_weight"),
    ("phases.sparse.indexer_weight", "phases.sparse.loss.indexer_weight"),
    ("phases.sparse.schedule", "phases.sparse.optim.schedule"),
    ("phases.sparse.min_lr_ratio", "phases.sparse.optim.min_lr_ratio"),
    ("phases.sparse.weight_decay", "phases.sparse.optim.weight_decay"),
    ("phases.sparse.grad_clip", "phases.sparse.optim.grad_clip"),
    ("phases.sparse.b1", "phases.sparse.optim.b1"),
    ("phases.sparse.b2", "phases.sparse.optim.b2"),
    ("phases.2.lr", "phases.2.optim.lr"),
    ("phases.sparse.optim.warmup_steps",
     "phases.sparse.optim.lr_warmup_steps"),
    ("phases.sparse.indexer_optim.warmup_steps",
     "phases.sparse.indexer_optim.lr_warmup_steps"),
]


@pytest.mark.parametrize("old,new", REPLACED)
def test_an_old_key_names_its_replacement(old, new):
  with pytest.raises(ConfigError, match=re.escape(repr(new))):
    override(RUN, [f"{old}=1"])
  data = to_dict(RUN)  # an old run's config.json
  _, entry, *rest = old.split(".")
  names = [p.name for p in PHASES]
  index = int(entry) if entry.isdigit() else names.index(entry)
  node = data["phases"][index]
  for part in rest[:-1]:
    node = node[part]
  node[rest[-1]] = 1
  want = ".".join(["phases", names[index]] + new.split(".")[2:])
  with pytest.raises(ConfigError, match=re.escape(repr(want))):
    from_dict(ExperimentConfig, data)


def test_phase_config_round_trips():
  phase = PhaseConfig(
      name="s", kind="sparse", steps=7, trainable="^layers/attn/",
      indexer_trainable="^layers/indexer/wk",
      optim=OptimConfig(lr=1e-5, lr_warmup_steps=3, schedule="constant",
                        min_lr_ratio=0.2, weight_decay=0.1, grad_clip=0.5,
                        b1=0.8, b2=0.99),
      indexer_optim=OptimConfig(lr=1e-4, lr_warmup_steps=4),
      loss=LossConfig(lm_weight=0.5, indexer_weight=2.0), topk=8,
      selection="oracle", sinks=2, indexer_grad="lm",
      init_from="pretrain", data_from="pretrain")
  data = json.loads(json.dumps(to_dict(phase)))
  assert data["optim"]["lr_warmup_steps"] == 3 and "lr" not in data
  assert from_dict(PhaseConfig, data) == phase
  cfg = dataclasses.replace(RUN, phases=PHASES + (phase,))
  assert from_dict(ExperimentConfig, json.loads(dumps(cfg))) == cfg


def test_indexer_optim_defaults_and_group_checks():
  assert PhaseConfig().indexer_optim.lr == 1e-3  # today's indexer_lr
  for key in ("phases.sparse.indexer_optim.lr=0", "phases.warmup.optim.lr=-1",
              "phases.sparse.optim.schedule=linear",
              "phases.pretrain.optim.lr_warmup_steps=-1"):
    with pytest.raises(ConfigError, match=re.escape(key.split("=")[0])):
      override(RUN, [key])
