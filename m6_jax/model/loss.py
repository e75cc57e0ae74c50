"""The loss, once: token cross-entropy on the target positions, used by the train step and by
evaluation.

The objective is the sum of the weighted token losses (float32) divided by `total_weight`
(the target tokens of the whole global batch, so gradient accumulation over micro-batches
gives the gradient of one large batch), plus, for a MoE model, the weighted auxiliary losses.
Metrics come back as sums, so callers can average them exactly over any number of batches.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from m6_jax.model import moe as moe_lib
from m6_jax.model.m6 import M6


def token_losses(logits: jax.Array, targets: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-token cross-entropy [b, t] in float32, with optional label smoothing."""
  logits = logits.astype(jnp.float32)
  if label_smoothing <= 0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  vocab = logits.shape[-1]
  soft = optax.smooth_labels(jax.nn.one_hot(targets, vocab, dtype=jnp.float32), label_smoothing)
  return optax.softmax_cross_entropy(logits, soft)


def loss_and_sums(
  params: Any,
  batch: dict,
  rng: jax.Array,
  model: M6,
  num_tasks: int,
  label_smoothing: float,
  total_weight: jax.Array,
  deterministic: bool,
  num_micro: int = 1,
  aux_weights: tuple[float, float] = (0.0, 0.0),
) -> tuple[jax.Array, dict]:
  """(objective, metric sums) for one (micro-)batch: the objective is the sum of weighted
  token losses / total_weight, plus, for a MoE model, the weighted aux losses / num_micro
  (so that the micro-batches of one step add up to their mean).

  The sums are of the (micro-)batch: loss, correct tokens and target tokens in total and per
  task (`task_*_sum` [num_tasks], indexed by batch['task_id']); training and evaluation
  both average them, over a logging interval or over the validation set."""
  c = model.config
  moe_terms = {}
  if c.moe_num_experts > 0:
    logits, collections = model.apply(
      {"params": params},
      batch,
      deterministic=deterministic,
      rngs={"dropout": rng},
      mutable=[moe_lib.AUX_LOSS_COLLECTION, moe_lib.METRICS_COLLECTION],
    )
    moe_terms = moe_lib.moe_terms(collections)
  else:
    logits = model.apply(
      {"params": params}, batch, deterministic=deterministic, rngs={"dropout": rng}
    )
  weights = batch["tgt_weights"].astype(jnp.float32)
  losses = token_losses(logits, batch["tgt_target"], label_smoothing) * weights
  correct = (jnp.argmax(logits, axis=-1) == batch["tgt_target"]) * weights
  task_onehot = jax.nn.one_hot(batch["task_id"], num_tasks, dtype=jnp.float32)  # [b, T]
  sums = {
    "loss_sum": losses.sum(),
    "weight_sum": weights.sum(),
    "correct_sum": correct.sum(),
    "task_loss_sum": task_onehot.T @ losses.sum(axis=1),
    "task_correct_sum": task_onehot.T @ correct.sum(axis=1),
    "task_weight_sum": task_onehot.T @ weights.sum(axis=1),
  }
  objective = losses.sum() / total_weight
  if moe_terms:
    # Per micro-batch / num_micro, so that accumulation gives the step's mean.
    for name in MOE_METRICS:
      sums[f"moe_{name}"] = moe_terms[name] / num_micro
    objective = (
      objective
      + (
        aux_weights[0] * moe_terms["load_balance_loss"]
        + aux_weights[1] * moe_terms["router_z_loss"]
      )
      / num_micro
    )
  return objective, sums


MOE_METRICS = ("load_balance_loss", "router_z_loss", "dropped_fraction")
