"""A model small enough for tests: 2 layers, width 64, byte vocabulary.

  python -c "from configs.tiny import model_config; print(model_config())"

The runnable whole-pipeline version of it is configs/tiny_run.py.
"""

from dsax.config import IndexerConfig, ModelConfig


def model_config(arg=None) -> ModelConfig:
  del arg
  return ModelConfig(
      vocab_size=256, d_model=64, n_layers=2, n_heads=4, q_lora_rank=32,
      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
      d_ff=128, attn_q_chunk=64,
      indexer=IndexerConfig(n_heads=4, head_dim=32, rope_dim=16, topk=16,
                            q_chunk=32))
