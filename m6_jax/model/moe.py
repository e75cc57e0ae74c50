"""Mixture-of-Experts feed-forward (M6-100B, M6-T): router, dispatch/combine, experts, aux losses.

`MoeMlp` is a drop-in replacement for `layers.Mlp`: `__call__(x [batch, length, embed],
deterministic) -> y [batch, length, embed]` (plus an optional `token_mask` keyword). It is
built from small pieces that are tested on their own:

  Router          x -> router logits [batch, length, expert], float32, no bias.
  route           logits -> per-token expert indices and combine weights (top-k, or M6-T
                  "k top-1" expert prototyping: top_k experts within each of num_groups
                  prototypes of consecutive experts).
  dispatch_combine  indices + weights -> one-hot dispatch / weighted combine tensors
                  [batch, length, expert, capacity] with a fixed expert capacity
                  (dispatch="einsum"; dispatch="sorted" gets the same slots by a sort and
                  moves the tokens by gathers: m6_jax/model/moe_dispatch.py).
  Experts         batched expert MLPs over buffers [expert, batch, capacity, embed].
  load_balance_loss, router_z_loss   the auxiliary losses, unweighted.

Each expert takes at most

  capacity = min(length, ceil(capacity_factor * length * num_groups * top_k / num_experts))

tokens per routing group (one batch row, or `group_rows` rows in training;
`eval_capacity_factor` when `deterministic`); assignments beyond it are dropped (combine
weight 0, the residual connection carries the token), and padding (`token_mask == 0`) takes
no slot. docs/scale.md ("How the MoE layer routes") describes the routing, the slot order,
causality, incremental decoding and the sharding rules in full.

**Aux losses and metrics** are sown, not returned, so the call signature matches `Mlp`:

  self.sow("aux_loss", "load_balance_loss", ...)   Switch loss, 1.0 when balanced
  self.sow("aux_loss", "router_z_loss", ...)       mean over tokens of logsumexp(logits)^2
  self.sow("moe_metrics", "dropped_fraction", ...) dropped / routed token-assignments

They are recorded only when the collection is mutable, e.g.
`model.apply(variables, x, deterministic, mutable=["aux_loss", "moe_metrics"])`;
`moe_terms()` averages each of them over all MoE layers. The losses are unweighted: the train
step multiplies them by its weights.

**Sharding.** Expert kernels carry ('experts', 'embed', 'mlp') / ('experts', 'mlp', 'embed'),
the expert buffers ('experts', 'batch', None, 'embed'): a logical rule ('experts', <mesh
axis>) splits the experts and GSPMD inserts the all-to-all. When 'batch' is also split over
that axis, list the 'experts' rule first and add a fallback 'batch' rule without it
(m6_jax/parallel/axes.py does).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6_jax.model import moe_dispatch
from m6_jax.model.ops import constrain, gelu

Dtype = Any

AUX_LOSS_COLLECTION = "aux_loss"
METRICS_COLLECTION = "moe_metrics"

# Buffers of tokens on their way to / back from the experts.
EXPERT_EMBED = ("experts", "batch", None, "embed")
EXPERT_MLP = ("experts", "batch", None, "mlp")
# Dispatch / combine tensors [batch, length, expert, capacity].
ROUTING = ("batch", "length", None, None)

# Switch Transformer's router init: a 10x smaller scale than the usual fan-in init keeps the
# initial routing close to uniform and training stable.
router_kernel_init = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
# The dense `Mlp`'s Xavier init applied to each expert's matrix separately (axis 0 = expert).
expert_kernel_init = nn.initializers.xavier_uniform(batch_axis=(0,))


class Routing(NamedTuple):
  """The router's decision for every token.

  expert_index: [batch, length, assignments] int32, distinct experts per token, in priority
    order (for top-k: best first; for prototyping: prototype by prototype).
  weights: [batch, length, assignments] float32 combine weights.
  probs: [batch, length, num_groups, experts_per_group] float32 softmax within prototypes.
  """

  expert_index: jax.Array
  weights: jax.Array
  probs: jax.Array


def check_moe_shape(num_experts: int, num_groups: int, top_k: int) -> None:
  """Raises ValueError when the expert / prototype / top-k sizes cannot work."""
  if num_experts < 1 or num_groups < 1 or top_k < 1:
    raise ValueError(
      f"MoE sizes must be positive, got num_experts={num_experts}, num_groups={num_groups}, "
      f"top_k={top_k}."
    )
  if num_experts % num_groups:
    raise ValueError(
      f"num_experts={num_experts} is not divisible by num_groups={num_groups}; expert "
      "prototyping splits the experts into equal groups, pick a divisor."
    )
  if top_k > num_experts // num_groups:
    raise ValueError(
      f"top_k={top_k} exceeds the {num_experts // num_groups} experts of a group "
      f"(num_experts={num_experts} / num_groups={num_groups}); lower top_k."
    )


def expert_capacity(
  tokens_per_group: int, num_experts: int, assignments_per_token: int, capacity_factor: float
) -> int:
  """ceil(capacity_factor * tokens * assignments / experts), at least 1, at most the tokens."""
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be positive.")
  raw = math.ceil(capacity_factor * tokens_per_group * assignments_per_token / num_experts)
  # No expert can receive a token twice, so more than `tokens_per_group` slots is waste.
  return max(1, min(tokens_per_group, raw))


class Router(nn.Module):
  """Linear router: x [batch, length, embed] -> logits [batch, length, expert] in float32."""

  num_experts: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(router_kernel_init, ("embed", None)),
      (x.shape[-1], self.num_experts),
      jnp.float32,
    )
    logits = jnp.einsum("bld,de->ble", x.astype(jnp.float32), kernel)
    return constrain(logits, ("batch", "length", None))


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis (ties: lowest index first) as k rounds of argmax.

  The SPMD partitioner replicates `lax.top_k` (an all-gather of every token's router
  probabilities); argmax and masking stay sharded over the batch.
  """
  values, indices = [], []
  for _ in range(k):
    index = jnp.argmax(x, axis=-1)
    values.append(jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0])
    indices.append(index)
    x = jnp.where(jax.nn.one_hot(index, x.shape[-1], dtype=bool), -jnp.inf, x)
  return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def route(logits: jax.Array, num_groups: int = 1, top_k: int = 1) -> Routing:
  """Top-k within each of `num_groups` prototypes (see the module docstring)."""
  b, l, e = logits.shape
  check_moe_shape(e, num_groups, top_k)
  per_group = e // num_groups
  probs = jax.nn.softmax(logits.reshape(b, l, num_groups, per_group).astype(jnp.float32), -1)
  weights, index = _top_k(probs, top_k)  # [b, l, groups, top_k]
  if top_k > 1:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  index = index + (jnp.arange(num_groups) * per_group)[:, None]
  # Priority order: every prototype's first choice, then every prototype's second, ...
  index, weights = jnp.swapaxes(index, 2, 3), jnp.swapaxes(weights, 2, 3)
  k = num_groups * top_k
  return Routing(index.reshape(b, l, k).astype(jnp.int32), weights.reshape(b, l, k), probs)


def dispatch_combine(
  expert_index: jax.Array,
  weights: jax.Array,
  num_experts: int,
  capacity: int,
  token_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Capacity-limited dispatch and combine tensors (GShard).

  Args:
    expert_index: [batch, length, k] distinct experts per token, in priority order.
    weights: [batch, length, k] combine weights.
    num_experts: E.
    capacity: C, slots per expert per batch row.
    token_mask: optional [batch, length]; tokens where it is 0 are not routed.

  Returns:
    dispatch: [batch, length, E, C] float32, 1 where a token occupies a slot.
    combine: [batch, length, E, C] float32, dispatch times the token's combine weight.
    kept: [batch, length, k] bool, the assignments that got a slot.
  """
  b, l, k = expert_index.shape
  expert_mask = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [b, l, k, E]
  if token_mask is not None:
    expert_mask = expert_mask * token_mask.astype(jnp.int32)[:, :, None, None]
  # Slots go out choice by choice: all first choices of the row, then all second choices.
  by_priority = jnp.swapaxes(expert_mask, 1, 2).reshape(b, k * l, num_experts)
  position = jnp.sum((jnp.cumsum(by_priority, axis=1) - 1) * by_priority, axis=-1)
  position = jnp.swapaxes(position.reshape(b, k, l), 1, 2)  # [b, l, k]
  routed = jnp.sum(expert_mask, axis=-1) > 0
  kept = routed & (position < capacity)
  kept_mask = expert_mask.astype(jnp.float32) * kept[..., None]
  slot = jax.nn.one_hot(position, capacity, dtype=jnp.float32)  # all zero where >= capacity
  dispatch = jnp.einsum("blke,blkc->blec", kept_mask, slot)
  combine = jnp.einsum("blke,blkc,blk->blec", kept_mask, slot, weights.astype(jnp.float32))
  return dispatch, combine, kept


def dropped_fraction(
  kept: jax.Array, expert_index: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
  """Fraction of the (real tokens') expert assignments that found no slot."""
  routed = jnp.ones(expert_index.shape, jnp.float32)
  if token_mask is not None:
    routed = routed * token_mask.astype(jnp.float32)[:, :, None]
  return 1.0 - jnp.sum(kept * routed) / jnp.maximum(jnp.sum(routed), 1.0)


def _token_weights(shape: tuple[int, int], token_mask) -> jax.Array:
  if token_mask is None:
    return jnp.ones(shape, jnp.float32)
  return token_mask.astype(jnp.float32)


def load_balance_loss(
  probs: jax.Array, expert_index: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
  """Switch load-balance loss, per prototype and averaged over prototypes.

  For a prototype of n experts: n * sum_e f_e * P_e, with f_e the fraction of the prototype's
  token-assignments (before capacity dropping) that go to expert e and P_e the mean router
  probability of e, both over the real tokens of the whole batch. It is 1.0 when either is
  uniform and up to n when all tokens go, confidently, to one expert.
  """
  b, l, g, n = probs.shape
  w = _token_weights((b, l), token_mask)
  count = jnp.maximum(jnp.sum(w), 1.0)
  assigned = jnp.sum(jax.nn.one_hot(expert_index, g * n, dtype=jnp.float32), axis=2)
  assigned = assigned.reshape(b, l, g, n)
  per_token_choices = jnp.sum(assigned, axis=-1, keepdims=True)  # top_k, in every prototype
  f = jnp.einsum("blgn,bl->gn", assigned / per_token_choices, w) / count
  p = jnp.einsum("blgn,bl->gn", probs, w) / count
  return jnp.mean(n * jnp.sum(f * p, axis=-1))


def router_z_loss(
  logits: jax.Array, num_groups: int = 1, token_mask: jax.Array | None = None
) -> jax.Array:
  """ST-MoE z-loss: mean over real tokens (and prototypes) of logsumexp(logits)^2."""
  b, l, e = logits.shape
  lse = jax.nn.logsumexp(logits.reshape(b, l, num_groups, e // num_groups), axis=-1)
  w = _token_weights((b, l), token_mask)
  z = jnp.mean(jnp.square(lse.astype(jnp.float32)), axis=-1)
  return jnp.sum(z * w) / jnp.maximum(jnp.sum(w), 1.0)


class Experts(nn.Module):
  """`num_experts` GELU MLPs applied to buffers [expert, batch, capacity, embed]."""

  num_experts: int
  mlp_dim: int
  dropout_rate: float = 0.0
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  def _param(self, name, init, names, shape):
    return self.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    e, d, m = self.num_experts, x.shape[-1], self.mlp_dim
    if x.shape[0] != e:
      raise ValueError(f"Experts got a buffer for {x.shape[0]} experts, expected {e}.")
    wi = self._param("wi_kernel", expert_kernel_init, ("experts", "embed", "mlp"), (e, d, m))
    h = jnp.einsum("ebcd,edm->ebcm", x.astype(self.dtype), wi.astype(self.dtype))
    if self.use_bias:
      bi = self._param("wi_bias", nn.initializers.zeros, ("experts", "mlp"), (e, m))
      h = h + bi.astype(self.dtype)[:, None, None, :]
    h = constrain(gelu(h), EXPERT_MLP)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    wo = self._param("wo_kernel", expert_kernel_init, ("experts", "mlp", "embed"), (e, m, d))
    out = jnp.einsum("ebcm,emd->ebcd", h, wo.astype(self.dtype))
    if self.use_bias:
      bo = self._param("wo_bias", nn.initializers.zeros, ("experts", "embed"), (e, d))
      out = out + bo.astype(self.dtype)[:, None, None, :]
    return constrain(out, EXPERT_EMBED)


@dataclasses.dataclass(frozen=True)
class MoeOptions:
  """The routing settings of a MoE feed-forward (hashable, for module attributes)."""

  num_experts: int
  num_groups: int = 1
  top_k: int = 1
  capacity_factor: float = 1.25
  eval_capacity_factor: float | None = None
  dispatch: str = "einsum"
  group_rows: int = 1

  def kwargs(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class MoeMlp(nn.Module):
  """Sparse feed-forward with the call signature of `layers.Mlp` (see the module docstring).

  Attributes:
    num_experts: total experts E (over all prototypes).
    mlp_dim: hidden width of each expert.
    num_groups: M6-T prototypes; 1 = plain top-k routing.
    top_k: experts per token within each prototype (M6-T prototyping uses 1).
    capacity_factor: slack of the expert capacity during training.
    eval_capacity_factor: used instead when `deterministic`; None = capacity_factor.
    dispatch: "einsum" (GShard one-hot dispatch / combine einsums) or "sorted" (a sort by
      expert and gathers, m6_jax/model/moe_dispatch.py); same routing and results.
    group_rows: batch rows per routing group in training (see "Token groups" above).
    dropout_rate: dropout on the experts' hidden activations, as in `Mlp`.
    use_bias: expert biases [expert, mlp] / [expert, embed].
    dtype: compute dtype; router, softmax and aux losses stay float32.
  """

  num_experts: int
  mlp_dim: int
  num_groups: int = 1
  top_k: int = 1
  capacity_factor: float = 1.25
  eval_capacity_factor: float | None = None
  dispatch: str = "einsum"
  group_rows: int = 1
  dropout_rate: float = 0.0
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  def capacity(self, length: int, deterministic: bool) -> int:
    factor = self.capacity_factor
    if deterministic and self.eval_capacity_factor is not None:
      factor = self.eval_capacity_factor
    return expert_capacity(length, self.num_experts, self.num_groups * self.top_k, factor)

  def __call__(
    self, x: jax.Array, deterministic: bool, token_mask: jax.Array | None = None
  ) -> jax.Array:
    rows = 1 if deterministic else self.group_rows
    if rows == 1:
      return self._routed(x, deterministic, token_mask)
    b, l, d = x.shape
    if b % rows:
      raise ValueError(f"group_rows={rows} does not divide the batch of {b} rows.")
    # Consecutive rows form one routing group of rows * length tokens (row-major order).
    x = x.reshape(b // rows, rows * l, d)
    token_mask = None if token_mask is None else token_mask.reshape(b // rows, rows * l)
    return self._routed(x, deterministic, token_mask).reshape(b, l, d)

  @nn.compact
  def _routed(self, x: jax.Array, deterministic: bool, token_mask: jax.Array | None) -> jax.Array:
    check_moe_shape(self.num_experts, self.num_groups, self.top_k)
    if self.dispatch not in moe_dispatch.DISPATCH_MODES:
      raise ValueError(f"dispatch='{self.dispatch}' is not one of {moe_dispatch.DISPATCH_MODES}.")
    capacity = self.capacity(x.shape[1], deterministic)
    logits = Router(self.num_experts, name="router")(x)
    routing = route(logits, self.num_groups, self.top_k)
    experts = Experts(
      self.num_experts, self.mlp_dim, self.dropout_rate, self.use_bias, self.dtype, name="experts"
    )
    if self.dispatch == "sorted":
      position, kept, slot_token = moe_dispatch.sorted_slots(
        routing.expert_index, self.num_experts, capacity, token_mask
      )
      xs = constrain(moe_dispatch.gather_tokens(x.astype(self.dtype), slot_token), EXPERT_EMBED)
      ys = experts(xs, deterministic)
      out = moe_dispatch.combine_outputs(ys, routing.expert_index, position, kept, routing.weights)
    else:
      dispatch, combine, kept = dispatch_combine(
        routing.expert_index, routing.weights, self.num_experts, capacity, token_mask
      )
      dispatch, combine = constrain(dispatch, ROUTING), constrain(combine, ROUTING)
      xs = jnp.einsum("blec,bld->ebcd", dispatch.astype(self.dtype), x.astype(self.dtype))
      ys = experts(constrain(xs, EXPERT_EMBED), deterministic)
      out = jnp.einsum("blec,ebcd->bld", combine.astype(self.dtype), ys)

    # One-hot form for both dispatches: a gather form's scatter-add gradient costs more HBM
    # traffic on TPU in every config measured (docs/performance.md, "MoE: sorted dispatch").
    balance = load_balance_loss(routing.probs, routing.expert_index, token_mask)
    self.sow(AUX_LOSS_COLLECTION, "load_balance_loss", balance)
    self.sow(
      AUX_LOSS_COLLECTION, "router_z_loss", router_z_loss(logits, self.num_groups, token_mask)
    )
    self.sow(
      METRICS_COLLECTION,
      "dropped_fraction",
      dropped_fraction(kept, routing.expert_index, token_mask),
    )
    return constrain(out, ("batch", "length", "embed"))


def moe_terms(collections: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Averages every sown MoE value over all MoE layers, by name.

  `collections` is the mutable-state dict returned by `apply(..., mutable=[...])` (or any
  sub-tree of it, e.g. `state["aux_loss"]`); leaves stacked by `nn.scan` count once per layer.
  Returns e.g. {"load_balance_loss": ..., "router_z_loss": ..., "dropped_fraction": ...};
  an empty dict when the model has no MoE layer.
  """
  values: dict[str, list[jax.Array]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(collections)[0]:
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    values.setdefault(str(names[-1]), []).append(jnp.ravel(leaf))
  return {name: jnp.mean(jnp.concatenate(vs)) for name, vs in values.items()}
