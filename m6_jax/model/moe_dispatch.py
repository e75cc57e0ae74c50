"""Sorted MoE dispatch: tokens gathered into expert buffers by a sort, not one-hot einsums.

`MoeMlp(dispatch="sorted")` (m6_jax/model/moe.py) routes exactly like the GShard einsum
dispatch (same experts, same capacity, same slot priority, same dropped tokens) but moves
the tokens with index arithmetic:

  slots           per batch row, the assignments [length * k] in priority order (choice by
                  choice, then sequence order) are stably sorted by expert id. An
                  assignment's slot is its rank within its expert's run of the sorted list:
                  its index minus the run's start, the start being an exclusive cumulative
                  sum of the per-expert counts ([experts], not [tokens, experts]). Ranks
                  >= capacity are dropped, as the einsum's cumulative sum drops them.
  gather          slot (e, c) of a row holds sorted entry start[e] + c when c < count[e]:
                  buffers [batch, capacity, expert, embed] are one gather from the tokens
                  (an empty slot reads zeros).
  combine         each kept assignment reads its expert's output at (expert, slot), times
                  its combine weight; a token's assignments are summed.

The buffers are transposed to [expert, batch, capacity, embed] for the experts (the layout
of the einsum path), so with the batch and the experts split over the same mesh axis the
SPMD partitioner turns the transposes into all-to-alls; the gathers stay within a batch row
and therefore local (tests/model/test_moe_dispatch.py checks the compiled HLO).

Why: the einsum path's dispatch and combine are matmuls against one-hot [tokens, experts,
capacity] tensors (2 * tokens * experts * capacity * embed FLOPs each, plus their
gradients), and its slot positions a cumulative sum over a [tokens * k, experts] one-hot;
both grow with the expert count. Here the work per row is a sort of length * k ids and
gathers of the buffers' size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m6_jax.model.ops import constrain

DISPATCH_MODES = ("einsum", "sorted")

# Token buffers while they are still laid out by batch row (before the all-to-all).
ROW_BUFFERS = ("batch", None, None, "embed")


def _row_slots(flat: jax.Array, num_experts: int, capacity: int):
  """One batch row. flat: [n] expert id of each assignment in priority order (num_experts
  for an assignment that is not routed). Returns (rank [n] within its expert in priority
  order, source [capacity, num_experts]: the assignment in each slot, or n when empty)."""
  n = flat.shape[0]
  order = jnp.argsort(flat, stable=True)  # by expert, priority order within an expert
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[flat].add(1)
  starts = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(n, dtype=jnp.int32) - starts[flat[order]]
  rank = jnp.zeros(n, jnp.int32).at[order].set(rank_sorted, unique_indices=True)
  slot = jnp.arange(capacity, dtype=jnp.int32)[:, None]
  filled = slot < counts[None, :num_experts]
  entry = jnp.minimum(starts[None, :num_experts] + slot, n - 1)
  source = jnp.where(filled, order[entry], n)
  return rank, source


def sorted_slots(
  expert_index: jax.Array,
  num_experts: int,
  capacity: int,
  token_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Slot of every assignment and the token of every slot (GShard priority, per batch row).

  Args:
    expert_index: [batch, length, k] distinct experts per token, in priority order.
    num_experts: E.
    capacity: C, slots per expert per batch row.
    token_mask: optional [batch, length]; tokens where it is 0 are not routed.

  Returns:
    position: [batch, length, k] int32, the assignment's slot within its expert.
    kept: [batch, length, k] bool, the assignments that got a slot.
    slot_token: [batch, C, E] int32, the token in each slot, or `length` when empty
      (capacity-major: see gather_tokens).
  """
  b, l, k = expert_index.shape
  routed = jnp.ones((b, l, k), bool)
  if token_mask is not None:
    routed = routed & token_mask.astype(bool)[:, :, None]
  # Priority order: all first choices of the row in sequence order, then all second ones.
  flat = jnp.where(routed, expert_index, num_experts)  # padding sorts after every expert
  flat = jnp.swapaxes(flat, 1, 2).reshape(b, k * l)
  rank, source = jax.vmap(lambda f: _row_slots(f, num_experts, capacity))(flat)
  position = jnp.swapaxes(rank.reshape(b, k, l), 1, 2)
  kept = routed & (position < capacity)
  # Assignment a = choice * length + token; an empty slot (a = k * length) maps to `length`.
  slot_token = jnp.where(source < k * l, source % l, l)
  return position, kept, slot_token


def _take(rows: jax.Array, index: jax.Array) -> jax.Array:
  """rows [batch, n, d], index [batch, m] -> [batch, m, d]; an index >= n reads zeros."""
  return jax.vmap(lambda r, i: r.at[i].get(mode="fill", fill_value=0))(rows, index)


# The buffers are laid out capacity-major, [batch, C, E, embed]: the TPU tiles the two minor
# dimensions of an array, and an expert-major [..., C, embed] pads a small capacity (M6-100B:
# 3 slots per expert and row) up to the tile height.
def gather_tokens(x: jax.Array, slot_token: jax.Array) -> jax.Array:
  """x [batch, length, embed], slot_token [batch, C, E] -> buffers [E, batch, C, embed]."""
  b, c, e = slot_token.shape
  buffers = _take(x, slot_token.reshape(b, c * e)).reshape(b, c, e, x.shape[-1])
  buffers = constrain(buffers, ROW_BUFFERS)
  return jnp.transpose(buffers, (2, 0, 1, 3))  # the all-to-all on an expert-parallel mesh


def combine_outputs(
  ys: jax.Array, expert_index: jax.Array, position: jax.Array, kept: jax.Array, weights
) -> jax.Array:
  """ys [E, batch, C, embed] -> [batch, length, embed]: each token's kept assignments'
  expert outputs times their combine weights, summed."""
  e, b, c, d = ys.shape
  rows = constrain(jnp.transpose(ys, (1, 2, 0, 3)), ROW_BUFFERS).reshape(b, c * e, d)
  slot = jnp.where(kept, position * e + expert_index, c * e)  # dropped: out of range -> 0
  l, k = slot.shape[1:]
  picked = _take(rows, slot.reshape(b, l * k)).reshape(b, l, k, d)
  w = (weights * kept).astype(ys.dtype)
  return jnp.einsum("blkd,blk->bld", picked, w)
