"""DeepSeekMoE feed-forward (DeepSeek-V2/V3): shared experts plus routed
experts; routing, two dispatches (grouped, and the dense reference), forced
experts (keep routing, RL) and the training-time load-balance maths.

Axes beyond DESIGN's key: K here is moe.n_activated (the experts chosen per
token); F is the width of one expert; U the tokens of a
batch, flattened (B*T); M the token-expert assignments (U*K, token-major);
R the rows of the expert-sorted, padded buffer; Z its blocks of rows.

Routing, per token with hidden h (all in f32):
  logits_x = h . W_router[:, x]
  s_x      = softmax(logits)_x  (V2)   or   sigmoid(logits_x)  (V3)
  c_x      = s_x + b_x   the noaux_tc correction bias b (aux-loss-free
                         balancing): it changes which experts are chosen, never
                         their weights; absent otherwise (c = s)
  groups (n_group G, topk_group): the X experts form G contiguous groups of
  X / G; a group's score is max_x c_x (group_limited_greedy, V2) or the sum
  of its two largest c_x (noaux_tc, V3); only the topk_group best groups
  stay eligible (greedy: every expert is).
  S = the n_activated eligible experts with the largest c_x, or the experts
      the caller gives (``experts_BTK``: keep routing, RL replays the experts
      chosen at sampling; the weights still come from the current s)
  g_x = s_x for x in S, else 0;  g <- g / (sum_S s + 1e-20) if norm_topk_prob;
  g <- g * routed_scaling_factor
Output:
  y = sum_x g_x SwiGLU_x(h) + SwiGLU_shared(h)

Dispatch (``moe_forward(dispatch=)``; both run every assignment, no token
dropping, no capacity):
  "dense"    the reference: every expert runs on every token and g (zero off
             S) weights the results. Clear and exact; X / K times the work.
  "grouped"  the M = U*K assignments are sorted by expert (``expert_layout``)
             and gathered into a row buffer in which expert x's rows are
             contiguous, padded to a multiple of ``block`` rows; each of
             W_gate, W_up, W_down is one grouped matmul over that buffer
             (rows of expert x times W[x]); a row's SwiGLU output is scaled
             by its g, and each token sums its K rows. The gathers have
             gather backwards (``gather_rows`` / ``sum_rows`` are each
             other's transposes), so no scatter-add runs. ``impl``:
               "blocks"  a loop over the used blocks, one [block, D] x [D, F]
                         matmul each with its expert's weights; a custom VJP
                         runs the same loop backwards and accumulates dW in
                         place (``block_matmul``). The CPU path.
               "ragged"  ``jax.lax.ragged_dot`` on the unpadded sorted rows
                         (block = 1). On GPU/TPU jax lowers it to a grouped
                         matmul; on CPU jax 0.10 lowers it to a masked dense
                         product over all X experts (X times the work and an
                         [X, M, D] mask): tests only there.
               "auto"    ragged on GPU/TPU, blocks on CPU.
             Under a mesh with an ``expert`` axis > 1 the experts are
             sharded over it and the rows exchanged with all-to-all:
             dsax.expert_parallel.

Training-time load balance (DeepSeek-V3), over valid tokens (segment id >
0 when the caller has segment ids; dsax.data marks padding with 0):
  load_x = #{(t, k): S_t[k] = x}                               ``MoEAux.load``
  b_x   <- b_x + rate * sign(mean_x' load_x' - load_x)   ``update_router_bias``
           (after each step; the bias gets no gradient)
  sequence-wise balance loss, per sequence (batch row) of T' valid tokens:
    s'_tx = s_tx / sum_x' s_tx'
    f_x = X / (K T') * #{t: x in S_t}     (a count: carries no gradient)
    P_x = (1 / T') sum_t s'_tx
    L_bal = mean over sequences of sum_x f_x P_x      ``MoEAux.balance``
           (the caller weights it, V3: alpha = 1e-4); 1 when perfectly
           balanced and the scores uniform.
  ``load_stats``: the max violation max_x load_x / mean load - 1 (mean over
  layers and the worst layer) and the share of idle experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dsax.config import ModelConfig

DISPATCHES = ("grouped", "dense")
IMPLS = ("auto", "blocks", "ragged")
BLOCK = 128  # rows per block of the "blocks" grouped matmul (bench_moe)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEAux:
  """What one MoE layer reports (``model.forward`` stacks it over the MoE
  layers into ``LayerAux.expert_load``, ``balance_loss`` and ``experts``)."""
  load: jax.Array     # [X] f32: assignments per expert (valid tokens)
  balance: jax.Array  # [] f32: the sequence-wise balance loss, unweighted
  experts: jax.Array  # [B,T,K] int32: the chosen experts


# ---------------------------------------------------------------- routing


def router_scores(p: dict[str, Any], x_BTD: jax.Array, cfg: ModelConfig):
  """Returns (s_BTX, c_BTX): the gate scores and the scores that choose."""
  logits = x_BTD.astype(jnp.float32) @ p["router"].astype(jnp.float32)
  if cfg.moe.score_func == "softmax":
    s = jax.nn.softmax(logits, axis=-1)
  else:
    s = jax.nn.sigmoid(logits)
  if "router_bias" not in p:
    return s, s
  return s, s + jax.lax.broadcast_to_rank(
      p["router_bias"].astype(jnp.float32), s.ndim)


def eligible_experts(c_BTX: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Bool [B,T,X]: experts in the topk_group best groups (all for greedy)."""
  m = cfg.moe
  if m.topk_method == "greedy" or m.n_group == 1:
    return jnp.ones(c_BTX.shape, bool)
  grouped = c_BTX.reshape(c_BTX.shape[:-1] + (m.n_group, -1))
  if m.topk_method == "noaux_tc":
    group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
  else:
    group_score = jnp.max(grouped, axis=-1)
  _, best = jax.lax.top_k(group_score, m.topk_group)
  keep = jnp.sum(jax.nn.one_hot(best, m.n_group, dtype=jnp.int32), -2) > 0
  return jnp.repeat(keep, m.n_routed_experts // m.n_group, axis=-1)


def route(p: dict[str, Any], x_BTD: jax.Array, cfg: ModelConfig,
          experts_BTK: jax.Array | None = None):
  """Returns (w_BTK, idx_BTK, s_BTX): the weights of the chosen experts
  (f32), the chosen experts (the router's top-k, or ``experts_BTK`` when
  given: ints in [0, X), not checked under jit; K = n_activated) and the
  gate scores."""
  m = cfg.moe
  s, c = router_scores(p, x_BTD, cfg)
  if experts_BTK is None:
    c = jnp.where(eligible_experts(c, cfg), c, -jnp.inf)
    _, idx = jax.lax.top_k(c, m.n_activated)
  else:
    want = x_BTD.shape[:-1] + (m.n_activated,)
    if experts_BTK.shape != want:
      raise ValueError(f"moe.route: experts_BTK has shape {experts_BTK.shape}"
                       f", want {want} (B, T, n_activated)")
    idx = experts_BTK.astype(jnp.int32)
  w = jnp.take_along_axis(s, idx, axis=-1)
  if m.norm_topk_prob:
    w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
  return w * m.routed_scaling_factor, idx, s


def gates(p: dict[str, Any], x_BTD: jax.Array,
          cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Returns (g_BTX, idx_BTK): the combine weights (zero off the chosen
  experts, f32) and the chosen experts (K = n_activated)."""
  w, idx, _ = route(p, x_BTD, cfg)
  return _spread(w, idx, cfg.moe.n_routed_experts), idx


def _spread(w_BTK: jax.Array, idx_BTK: jax.Array, n: int) -> jax.Array:
  onehot = jax.nn.one_hot(idx_BTK, n, dtype=jnp.float32)
  return jnp.einsum("btk,btkx->btx", w_BTK, onehot)


# ------------------------------------------------------------ dispatches


def swiglu(p: dict[str, Any], x_BTD: jax.Array, cdt) -> jax.Array:
  """down(silu(x W_gate) * (x W_up)), matmuls in ``cdt``."""
  x = x_BTD.astype(cdt)
  gate = jax.nn.silu(x @ p["w_gate"].astype(cdt))
  return (gate * (x @ p["w_up"].astype(cdt))) @ p["w_down"].astype(cdt)


def dense_experts(p: dict[str, Any], x_BTD: jax.Array, w_BTK: jax.Array,
                  idx_BTK: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The reference dispatch: sum_x g_x SwiGLU_x(h), every expert on every
  token (the routed part only)."""
  cdt = jnp.dtype(cfg.compute_dtype)
  g_BTX = _spread(w_BTK, idx_BTK, cfg.moe.n_routed_experts)
  x = x_BTD.astype(cdt)
  gate_BTXF = jax.nn.silu(jnp.einsum("btd,xdf->btxf", x,
                                     p["w_gate"].astype(cdt)))
  h_BTXF = gate_BTXF * jnp.einsum("btd,xdf->btxf", x, p["w_up"].astype(cdt))
  h_BTXF = h_BTXF * g_BTX[..., None].astype(cdt)
  return jnp.einsum("btxf,xfd->btd", h_BTXF, p["w_down"].astype(cdt))


class Layout(NamedTuple):
  """Where the assignments go in the expert-sorted buffer of R rows, R a
  multiple of the block (``expert_layout``)."""
  token_R: jax.Array   # the token of each row; U on padding rows
  src_R: jax.Array     # the assignment (u*K + k) of each row; M on padding
  dest_UK: jax.Array   # the row of each assignment
  sizes_X: jax.Array   # assignments per expert
  expert_Z: jax.Array  # the expert of each block (X - 1 past the used ones)
  n_used: jax.Array    # [] blocks that hold rows


def expert_layout(idx_UK: jax.Array, n_experts: int, block: int,
                  spare: bool = False) -> Layout:
  """Sorts the assignments by expert (stably: token order within an expert)
  and pads each expert's rows to a multiple of ``block``. The padded total
  is at most M + X (block - 1), which fixes R statically. ``spare``: ids
  may also be X (no expert: the padding rows an expert-parallel exchange
  receives); they sort last, past the ``n_used`` blocks, so no matmul runs
  on them and their outputs are zero (R grows by block - 1)."""
  u, k = idx_UK.shape
  m = u * k
  n_ids = n_experts + 1 if spare else n_experts
  e_M = idx_UK.reshape(m).astype(jnp.int32)
  order_M = jnp.argsort(e_M, stable=True)          # sorted position -> m
  sizes_X = jnp.zeros(n_ids, jnp.int32).at[e_M].add(1)
  padded_X = (sizes_X + block - 1) // block * block
  start_X = jnp.cumsum(sizes_X) - sizes_X
  pend_X = jnp.cumsum(padded_X)
  e_sorted = e_M[order_M]
  dest_sorted = (pend_X - padded_X)[e_sorted] + (
      jnp.arange(m, dtype=jnp.int32) - start_X[e_sorted])
  dest_M = jnp.zeros(m, jnp.int32).at[order_M].set(dest_sorted)
  n_rows = (m + n_ids * (block - 1)) // block * block
  src_R = jnp.full(n_rows, m, jnp.int32).at[dest_sorted].set(
      order_M.astype(jnp.int32))
  token_R = jnp.where(src_R < m, src_R // k, u)
  first_row_Z = jnp.arange(n_rows // block, dtype=jnp.int32) * block
  expert_Z = jnp.minimum(jnp.searchsorted(pend_X, first_row_Z, side="right"),
                         n_experts - 1).astype(jnp.int32)
  return Layout(token_R, src_R, dest_M.reshape(u, k), sizes_X[:n_experts],
                expert_Z, pend_X[n_experts - 1] // block)


def _rows(x_UD: jax.Array, token_R: jax.Array) -> jax.Array:
  """x_RD[r] = x_UD[token_R[r]], zero where token_R[r] = U."""
  x_ext = jnp.concatenate([x_UD, jnp.zeros((1,) + x_UD.shape[1:], x_UD.dtype)])
  return x_ext[token_R]


@jax.custom_vjp
def gather_rows(x_UD: jax.Array, token_R: jax.Array,
                dest_UK: jax.Array) -> jax.Array:
  """The dispatch gather x_RD = x_UD[token_R] (zero rows on padding); its
  transpose sums each token's K rows (a gather, not a scatter-add)."""
  return _rows(x_UD, token_R)


def _gather_rows_fwd(x_UD, token_R, dest_UK):
  return _rows(x_UD, token_R), (token_R, dest_UK)


def _gather_rows_bwd(res, g_RD):
  token_R, dest_UK = res
  return _sum_rows(g_RD, dest_UK), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _sum_rows(y_RD: jax.Array, dest_UK: jax.Array) -> jax.Array:
  return jnp.sum(y_RD[dest_UK], axis=1)


@jax.custom_vjp
def sum_rows(y_RD: jax.Array, token_R: jax.Array,
             dest_UK: jax.Array) -> jax.Array:
  """The combine y_UD = sum_k y_RD[dest_UK[:, k]]; its transpose is the
  dispatch gather."""
  return _sum_rows(y_RD, dest_UK)


def _sum_rows_fwd(y_RD, token_R, dest_UK):
  return _sum_rows(y_RD, dest_UK), (token_R, dest_UK)


def _sum_rows_bwd(res, g_UD):
  token_R, _ = res
  return _rows(g_UD, token_R), None, None


sum_rows.defvjp(_sum_rows_fwd, _sum_rows_bwd)


@jax.custom_vjp
def block_matmul(x_RD: jax.Array, w_XDF: jax.Array, expert_Z: jax.Array,
                 n_used: jax.Array) -> jax.Array:
  """Grouped matmul over blocks: y[z-th block] = x[z-th block] @ w[e_z]
  for the first ``n_used`` blocks, zero after (D, F: in and out widths).
  Blocks of R / Z rows; one loop step per used block."""
  return _block_matmul(x_RD, w_XDF, expert_Z, n_used)


def _block_matmul(x_RD, w_XDF, expert_Z, n_used):
  block = x_RD.shape[0] // expert_Z.shape[0]

  def body(z, y_RF):
    x_blk = jax.lax.dynamic_slice_in_dim(x_RD, z * block, block)
    w_DF = jax.lax.dynamic_index_in_dim(w_XDF, expert_Z[z], keepdims=False)
    return jax.lax.dynamic_update_slice_in_dim(y_RF, x_blk @ w_DF, z * block,
                                               axis=0)

  y_RF = jnp.zeros((x_RD.shape[0], w_XDF.shape[2]),
                   jnp.result_type(x_RD, w_XDF))
  return jax.lax.fori_loop(0, n_used, body, y_RF)


def _block_matmul_fwd(x_RD, w_XDF, expert_Z, n_used):
  return (_block_matmul(x_RD, w_XDF, expert_Z, n_used),
          (x_RD, w_XDF, expert_Z, n_used))


def _block_matmul_bwd(res, g_RF):
  """dx[block] = g[block] w[e]^T; dw[e] += x[block]^T g[block] (f32,
  updated in place in the loop carry)."""
  x_RD, w_XDF, expert_Z, n_used = res
  block = x_RD.shape[0] // expert_Z.shape[0]

  def body(z, carry):
    dx_RD, dw_XDF = carry
    x_blk = jax.lax.dynamic_slice_in_dim(x_RD, z * block, block)
    g_blk = jax.lax.dynamic_slice_in_dim(g_RF, z * block, block)
    e = expert_Z[z]
    w_DF = jax.lax.dynamic_index_in_dim(w_XDF, e, keepdims=False)
    dx_RD = jax.lax.dynamic_update_slice_in_dim(
        dx_RD, (g_blk @ w_DF.T).astype(dx_RD.dtype), z * block, axis=0)
    dw_DF = jax.lax.dynamic_index_in_dim(dw_XDF, e, keepdims=False) + (
        jnp.matmul(x_blk.T, g_blk, preferred_element_type=jnp.float32))
    dw_XDF = jax.lax.dynamic_update_index_in_dim(dw_XDF, dw_DF, e, axis=0)
    return dx_RD, dw_XDF

  dx_RD, dw_XDF = jax.lax.fori_loop(
      0, n_used, body,
      (jnp.zeros_like(x_RD), jnp.zeros(w_XDF.shape, jnp.float32)))
  return dx_RD, dw_XDF.astype(w_XDF.dtype), None, None


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"moe impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "blocks" if jax.default_backend() == "cpu" else "ragged"
  return impl


def grouped_experts(p: dict[str, Any], x_BTD: jax.Array, w_BTK: jax.Array,
                    idx_BTK: jax.Array, cfg: ModelConfig, impl: str = "auto",
                    block: int = BLOCK) -> jax.Array:
  """The grouped dispatch (module docstring): the routed part, equal to
  ``dense_experts`` up to rounding."""
  cdt = jnp.dtype(cfg.compute_dtype)
  impl = resolve_impl(impl)
  b, t, d = x_BTD.shape
  k = idx_BTK.shape[-1]
  lay = expert_layout(idx_BTK.reshape(b * t, k), cfg.moe.n_routed_experts,
                      1 if impl == "ragged" else block)
  x_RD = gather_rows(x_BTD.reshape(b * t, d).astype(cdt), lay.token_R,
                     lay.dest_UK)
  w_M = w_BTK.reshape(b * t * k)
  w_R = jnp.concatenate([w_M, jnp.zeros((1,), w_M.dtype)])[lay.src_R]
  y_RD = swiglu_rows(p, x_RD, lay, impl, cdt, w_R)
  return sum_rows(y_RD, lay.token_R, lay.dest_UK).reshape(b, t, d)


def swiglu_rows(p: dict[str, Any], x_RD: jax.Array, lay: Layout, impl: str,
                cdt, w_R: jax.Array | None = None) -> jax.Array:
  """SwiGLU_e(x_r) for each row of an expert-sorted buffer (``lay``) with
  its expert's weights, scaled by ``w_R`` when given: three grouped
  matmuls (``impl`` "blocks" or "ragged", resolved)."""

  def matmul(a_R_, w_X__):
    if impl == "ragged":
      return jax.lax.ragged_dot(a_R_, w_X__.astype(cdt), lay.sizes_X)
    return block_matmul(a_R_, w_X__.astype(cdt), lay.expert_Z, lay.n_used)

  h_RF = jax.nn.silu(matmul(x_RD, p["w_gate"])) * matmul(x_RD, p["w_up"])
  if w_R is not None:
    h_RF = h_RF * w_R[:, None].astype(cdt)
  return matmul(h_RF, p["w_down"])


# ----------------------------------------------------------- load balance


def expert_counts(idx_BTK: jax.Array, n_experts: int,
                  mask_BT: jax.Array | None = None) -> jax.Array:
  """[B, X] f32: assignments per expert in each sequence (valid tokens)."""
  onehot_BTX = jnp.sum(jax.nn.one_hot(idx_BTK, n_experts, dtype=jnp.float32),
                       axis=2)
  if mask_BT is not None:
    onehot_BTX = onehot_BTX * mask_BT[..., None].astype(jnp.float32)
  return jnp.sum(onehot_BTX, axis=1)


def balance_loss(s_BTX: jax.Array, idx_BTK: jax.Array,
                 mask_BT: jax.Array | None = None) -> jax.Array:
  """The sequence-wise balance loss (module docstring), unweighted: mean
  over sequences with a valid token of sum_x f_x P_x; f carries no
  gradient."""
  b, t, x = s_BTX.shape
  k = idx_BTK.shape[-1]
  valid_BT = (jnp.ones((b, t), jnp.float32) if mask_BT is None
              else mask_BT.astype(jnp.float32))
  n_B = jnp.sum(valid_BT, axis=1)
  per_B = jnp.maximum(n_B, 1.0)[:, None]
  f_BX = jax.lax.stop_gradient(
      x / (k * per_B) * expert_counts(idx_BTK, x, mask_BT))
  sn_BTX = s_BTX / jnp.sum(s_BTX, axis=-1, keepdims=True)
  p_BX = jnp.sum(sn_BTX * valid_BT[..., None], axis=1) / per_B
  has_B = (n_B > 0).astype(jnp.float32)
  return jnp.sum(jnp.sum(f_BX * p_BX, -1) * has_B) / jnp.maximum(
      jnp.sum(has_B), 1.0)


def update_router_bias(bias__X: jax.Array, load__X: jax.Array,
                       rate: float) -> jax.Array:
  """V3's aux-loss-free update, after a step: raise the bias of the experts
  below the mean load by ``rate``, lower those above (any leading axes,
  e.g. [L_moe, X] for the stacked ``moe/router_bias``)."""
  load = load__X.astype(jnp.float32)
  step = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
  return (bias__X.astype(jnp.float32) + rate * step).astype(bias__X.dtype)


def load_stats(load__X: jax.Array) -> dict[str, jax.Array]:
  """Scalar metrics of the expert loads ([X] or [L_moe, X]): the max
  violation max_x load_x / mean load - 1 (mean over layers, worst layer)
  and the share of experts that got no token."""
  load = load__X.astype(jnp.float32).reshape((-1, load__X.shape[-1]))
  vio_L = jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9) - 1.0
  return {"moe_maxvio": jnp.mean(vio_L), "moe_maxvio_worst": jnp.max(vio_L),
          "moe_idle": jnp.mean((load == 0).astype(jnp.float32))}


def train_terms(aux, balance_weight: float):
  """What a training step adds for the MoE layers of ``aux`` (a LayerAux):
  (loss term, scalar metrics, expert load [L_moe, X] for the bias update);
  (0.0, {}, None) without MoE."""
  if aux.expert_load is None:
    return 0.0, {}, None
  metrics = dict(load_stats(aux.expert_load),
                 moe_balance=jnp.mean(aux.balance_loss))
  return (balance_weight * jnp.sum(aux.balance_loss), metrics,
          aux.expert_load)


BIAS_PATH = "moe/router_bias"   # the flat path of the stacked router bias


def bias_update(trainable: dict[str, Any], load_LX: jax.Array | None,
                rate: float) -> dict[str, Any]:
  """``trainable`` with V3's router-bias update applied after a step (when
  the bias trains here, a load came back and ``rate`` > 0)."""
  if load_LX is None or not rate or BIAS_PATH not in trainable:
    return trainable
  return {**trainable, BIAS_PATH: update_router_bias(trainable[BIAS_PATH],
                                                     load_LX, rate)}


# ------------------------------------------------------------ the layer


def moe_forward(p: dict[str, Any], x_BTD: jax.Array, cfg: ModelConfig, *,
                experts_BTK: jax.Array | None = None,
                mask_BT: jax.Array | None = None, dispatch: str = "grouped",
                impl: str = "auto",
                block: int = BLOCK) -> tuple[jax.Array, MoEAux]:
  """The MoE feed-forward of one layer on the normalised input: (y_BTD,
  MoEAux). ``experts_BTK`` forces the experts (keep routing);
  ``mask_BT`` (bool, valid tokens) restricts the load and the balance
  loss; ``dispatch`` "grouped" or "dense" (the reference), ``impl`` and
  ``block`` for grouped (module docstring). Grouped under a mesh whose
  ``expert`` axis is > 1: expert parallel (dsax.expert_parallel)."""
  if dispatch not in DISPATCHES:
    raise ValueError(f"moe dispatch must be one of {DISPATCHES}, "
                     f"got {dispatch!r}")
  # expert_parallel builds on this module: imported here, not at the top
  # pylint: disable-next=import-outside-toplevel
  from dsax import expert_parallel as EP
  cdt = jnp.dtype(cfg.compute_dtype)
  if dispatch == "grouped" and EP.expert_shards() > 1:
    y, idx_BTK, s_BTX = EP.routed_experts(p, x_BTD, cfg, experts_BTK, impl,
                                          block)
  else:
    w_BTK, idx_BTK, s_BTX = route(p, x_BTD, cfg, experts_BTK)
    if dispatch == "dense":
      y = dense_experts(p, x_BTD, w_BTK, idx_BTK, cfg)
    else:
      y = grouped_experts(p, x_BTD, w_BTK, idx_BTK, cfg, impl, block)
  if "shared" in p:
    y = y + swiglu(p["shared"], x_BTD, cdt)
  load_X = jnp.sum(expert_counts(idx_BTK, cfg.moe.n_routed_experts, mask_BT),
                   axis=0)
  return y, MoEAux(load_X, balance_loss(s_BTX, idx_BTK, mask_BT), idx_BTK)


def moe_block(p: dict[str, Any], x_BTD: jax.Array, cfg: ModelConfig,
              dispatch: str = "grouped") -> jax.Array:
  """The MoE feed-forward of one layer on the normalised input: y_BTD."""
  return moe_forward(p, x_BTD, cfg, dispatch=dispatch)[0]


def ffn(p: dict[str, Any], x_BTD: jax.Array, cfg: ModelConfig,
        experts_BTK: jax.Array | None = None,
        mask_BT: jax.Array | None = None
        ) -> tuple[jax.Array, MoEAux | None]:
  """A layer's feed-forward: (y_BTD, MoEAux) when ``p`` holds a router,
  else (SwiGLU, None)."""
  if "router" in p:
    return moe_forward(p, x_BTD, cfg, experts_BTK=experts_BTK,
                       mask_BT=mask_BT, dispatch=cfg.moe.dispatch)
  if experts_BTK is not None:
    raise ValueError("moe.ffn: experts_BTK given to a dense-MLP layer")
  return swiglu(p, x_BTD, jnp.dtype(cfg.compute_dtype)), None
