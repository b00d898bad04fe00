"""The attention interface: one mode value in, a fixed structure out.

A forward (``model.forward``), a decode step and every caller (trainer, evals,
benchmarks) say how to attend with one frozen ``AttentionMode``, built once
with ``AttentionMode.of(model_cfg, kind, ...)``, which resolves the defaults
(top-k from ``model.indexer.topk``, kernels from ``model.kernel_impl``) in
one place. A layer's projections are one ``Projections`` value, MLA and GQA
alike; ``dsa.attend(p_layer, h_BTD, proj, mode, ctx) -> (o_BTNE, LayerAux)``
returns the same structure whatever the mode: fields the mode did not ask
for are None.

  kind       "dense": causal attention over every visible key;
             "sparse": each query attends to its top-k keys only (DSA).
  selection  where a sparse query's keys come from (``dsa.select``):
             "indexer"  the lightning indexer's top-k (DeepSeek-V3.2);
             "local"    a baseline: the first ``sinks`` keys of the query's
                        segment (attention sinks) plus its k - sinks most
                        recent keys (itself included); all visible keys
                        when it sees at most k;
             "oracle"   an upper bound: the top-k of the dense attention
                        probabilities p_t (the warm-up target), from a
                        detached dense pass over query chunks;
             "given"    indices the caller passes (``forward(selection=)``),
                        e.g. the sets recorded at sampling time (RL replay).
             The baselines do not need the indexer to select; with
             ``indexer_loss`` the sparse KL still trains it on their set.
  sinks      "local": the attention sinks, counted inside k (default 4,
             as in StreamingLLM; must be < k so the query sees itself).
  indexer_gate
             sparse: train the indexer from the LM loss through the
             selection, like an MoE router (``dsa.gate_delta``): the
             selected keys' attention logits get the straight-through bias
             log g - sg(log g), g[t, k] = softmax over S_t of I[t, k]; the
             forward value is unchanged (exactly), the LM gradient reaches
             the indexer, and the main model's gradient is unchanged.
  aux        indexer_loss (the warm-up KL when dense, the KL on the selected
             set when sparse), recall (dense attention mass kept by the
             selection, the oracle top-k and the local window), indices
             (the selected sets), indexer_keys and cache (the rows a decode
             cache holds), experts (the MoE experts each token chose, for
             keep routing; the MoE load and balance loss come always).
  impl       "reference" | "pallas" | "auto" (dsax.kernels).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from dsax.config import ModelConfig, resolve_topk

KINDS = ("dense", "sparse")
SELECTIONS = ("indexer", "local", "oracle", "given")
IMPLS = ("reference", "pallas", "auto")
SPARSE_WAYS = ("auto", "gather", "masked")


@dataclasses.dataclass(frozen=True)
class AttentionMode:
  """How every layer of a forward attends and what it reports (hashable:
  a static argument of jitted functions)."""
  kind: str = "dense"
  topk: int = 0                 # keys per query (sparse attention, recall)
  selection: str = "indexer"
  sinks: int = 4                # selection="local": attention sinks in k
  indexer_gate: bool = False    # sparse: LM loss reaches the indexer
  indexer_loss: bool = False    # LayerAux.indexer_kl
  recall: bool = False          # LayerAux.recall, recall_oracle, recall_local
  indices: bool = False         # LayerAux.idx, valid (the selected sets)
  indexer_keys: bool = False    # LayerAux.index_k (a sparse decode cache)
  cache: bool = False           # LayerAux.cache (model.CACHE_NAMES rows)
  experts: bool = False         # LayerAux.experts (MoE layers' choices)
  impl: str = "reference"
  # How the jnp reference runs a sparse layer: gather the k selected rows,
  # or dense attention under the selection's key mask; "auto" picks by the
  # number of keys (dsa.use_masked). The kernels always gather.
  sparse_way: str = "auto"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"AttentionMode.kind must be one of {KINDS}, "
                       f"got {self.kind!r}")
    if self.selection not in SELECTIONS:
      raise ValueError(f"AttentionMode.selection must be one of "
                       f"{SELECTIONS}, got {self.selection!r}")
    if self.impl not in IMPLS:
      raise ValueError(f"AttentionMode.impl must be one of {IMPLS}, "
                       f"got {self.impl!r}")
    if self.sparse_way not in SPARSE_WAYS:
      raise ValueError(f"AttentionMode.sparse_way must be one of "
                       f"{SPARSE_WAYS}, got {self.sparse_way!r}")
    if self.sparse_way == "masked" and self.impl != "reference":
      raise ValueError(f"AttentionMode.sparse_way='masked' needs "
                       f"impl='reference', got impl={self.impl!r}")
    if (self.sparse or self.recall) and self.topk <= 0:
      raise ValueError(f"AttentionMode.topk must be > 0 for sparse attention "
                       f"or recall, got {self.topk} (AttentionMode.of "
                       "resolves it from the model config)")
    if self.selection != "indexer" and not self.sparse:
      raise ValueError(f"AttentionMode.selection={self.selection!r} needs "
                       "kind='sparse'")
    if self.sinks < 0:
      raise ValueError(f"AttentionMode.sinks must be >= 0, got {self.sinks}")
    if self.selection == "local" and self.sinks >= self.topk:
      raise ValueError(f"AttentionMode.sinks={self.sinks} must be < topk="
                       f"{self.topk} with selection='local' (the sinks are "
                       "counted inside k and the query must see itself)")
    if self.indexer_gate and not self.sparse:
      raise ValueError("AttentionMode.indexer_gate needs kind='sparse'")

  @property
  def sparse(self) -> bool:
    return self.kind == "sparse"

  @property
  def uses_indexer(self) -> bool:
    """Whether the layer computes the indexer's q, k and weights."""
    return ((self.sparse and self.selection == "indexer") or self.indexer_loss
            or self.recall or self.indexer_keys or self.indexer_gate)

  @classmethod
  def of(cls, cfg: ModelConfig, kind: str = "dense", *, topk: int | None = 0,
         impl: str | None = "", **flags) -> "AttentionMode":
    """The mode for ``cfg``: ``topk`` 0/None means ``cfg.indexer.topk``,
    ``impl`` ""/None means ``cfg.kernel_impl``; ``flags`` are the other
    fields (selection, sinks, indexer_gate, indexer_loss, recall, indices,
    indexer_keys, cache, experts, sparse_way)."""
    return cls(kind=kind, topk=resolve_topk(cfg, topk),
               impl=impl or cfg.kernel_impl, **flags)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Projections:
  """One layer's projected attention inputs.

  MLA: ``q`` = q_nope_BTNH, ``q_rope`` = q_rope_BTNR (RoPE applied),
  ``cq`` = the normalised q-latent c_q_BTQ (None when Q = 0), ``rows`` =
  (kv_BSC, k_rope_BSR). GQA: ``q`` = q_BTNH (RoPE applied), ``q_rope`` and
  ``cq`` None, ``rows`` = (k_BSGH, v_BSGH). ``rows`` is exactly what a
  decode cache holds per token (``model.CACHE_NAMES``); the indexer reads
  ``cq`` (or the hidden state when it is None).
  """
  q: jax.Array
  rows: tuple[jax.Array, jax.Array]
  q_rope: jax.Array | None = None
  cq: jax.Array | None = None


class QueryShard(NamedTuple):
  """A shard's queries among every key (context parallelism, dsax.context):
  ``q_index_T`` int32 [T], each local query's index among the S keys (the
  causal mask is key index <= it, never the local array order);
  ``k_segment_ids_BS`` the keys' segment ids; ``block`` the dense blocks
  (every run of ``block`` local queries is one aligned block of keys)."""
  q_index_T: jax.Array
  k_segment_ids_BS: jax.Array
  block: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerAux:
  """What a layer reports besides its output; None unless the mode asks.
  Per layer: scalars (means over the query positions; recall over queries
  that see more than k keys) and per-token arrays; ``model.forward`` stacks
  them on a leading L axis. The MoE fields (``dsax.moe.MoEAux``) are
  stacked over the MoE layers only (L_moe = L - first_k_dense), and are
  None without MoE; the load and the balance loss come whenever the model
  has MoE layers (cheap; unused, jit drops them)."""
  indexer_kl: jax.Array | None = None      # []
  recall: jax.Array | None = None          # [] mass on the selected keys
  recall_oracle: jax.Array | None = None   # [] on the k largest
  recall_local: jax.Array | None = None    # [] on the k most recent
  idx: jax.Array | None = None             # [B,T,K] int32
  valid: jax.Array | None = None           # [B,T,K] bool
  index_k: jax.Array | None = None         # [B,S,J] indexer keys
  cache: tuple[jax.Array, jax.Array] | None = None  # Projections.rows
  expert_load: jax.Array | None = None     # [X] assignments per expert
  balance_loss: jax.Array | None = None    # [] sequence-wise, unweighted
  experts: jax.Array | None = None         # [B,T,K] int32, K = n_activated

  SCALARS = ("indexer_kl", "recall", "recall_oracle", "recall_local")

  def scalars(self) -> dict[str, jax.Array]:
    """The per-layer scalar metrics that were computed, by name."""
    return {k: getattr(self, k) for k in self.SCALARS
            if getattr(self, k) is not None}
