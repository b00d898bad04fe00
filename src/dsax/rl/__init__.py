"""RL post-training: GRPO with DeepSeek-V3.2's stabilisers and DSA index
replay (the maths: ../shared/RL.md).

  sampling  temperature, top-k, top-p; the kept set packed per token
  rollout   G samples per prompt from the latent-cache decode, with the
            sampler's log-probs, kept sets and DSA key sets
  policy    per-token log-probs of a rollout under a parameter set
            (index replay, keep sampling mask, keep routing)
  grpo      GRPOConfig and the loss as pure functions
  rewards   the reward interface and verifiable generated tasks
  trainer   the grpo phase kind's loop (dsax.train dispatches to it)
"""
