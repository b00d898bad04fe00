"""Strict dotted overrides."""

import dataclasses

import pytest

from dsax.config import ConfigError, ModelConfig, from_dict, override, to_dict


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
