"""The train step: a pure function (state, batch) -> (state, metrics), jitted with explicit
shardings and a donated state.

The loss is m6_jax/model/loss.py's (the one evaluation uses too). Metrics come back as sums
(loss, correct tokens, per task) so the loop can average them exactly over any logging
interval.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from m6_jax.model.loss import loss_and_sums
from m6_jax.model.m6 import M6
from m6_jax.model.ops import constrain
from m6_jax.train import optim
from m6_jax.train.state import TrainState


def _split_microbatches(batch: dict, num_micro: int) -> dict:
  """[b, ...] -> [num_micro, b / num_micro, ...], keeping each device's rows local.

  Rows are taken strided (micro-batch i holds rows i, i + n, ...) so that a batch sharded
  over devices along its rows yields micro-batches that are still evenly sharded.
  """

  def split(x):
    micro = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
    return jnp.moveaxis(micro, 1, 0)

  return jax.tree.map(split, batch)


def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


def make_train_step(
  model: M6,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  train: ml_collections.ConfigDict,
  num_tasks: int,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The train step. For a MoE model the objective adds model.config.moe_aux_loss_weight *
  load-balance loss + moe_z_loss_weight * router z-loss (means over MoE layers); metrics hold
  moe_load_balance_loss, moe_router_z_loss, moe_dropped_fraction (unweighted step means);
  `loss` stays the token cross-entropy."""
  num_micro = int(train.grad_accum_steps)
  # MoE layers use their training capacity only when not deterministic (dropout with rate 0
  # is a no-op either way).
  deterministic = model.config.dropout_rate == 0.0 and model.config.moe_num_experts == 0
  aux_weights = (float(model.config.moe_aux_loss_weight), float(model.config.moe_z_loss_weight))

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    total_weight = jnp.maximum(batch["tgt_weights"].astype(jnp.float32).sum(), 1.0)
    grad_fn = jax.value_and_grad(
      lambda params, micro, key: loss_and_sums(
        params,
        micro,
        key,
        model,
        num_tasks,
        train.label_smoothing,
        total_weight,
        deterministic,
        num_micro,
        aux_weights,
      ),
      has_aux=True,
    )

    if num_micro == 1:
      (loss, sums), grads = grad_fn(state.params, batch, rng)
    else:
      micro_batches = _split_microbatches(batch, num_micro)

      def accumulate(carry, xs):
        micro, index = xs
        micro = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), micro)
        out = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, out), None

      first = jax.tree.map(lambda x: x[0], micro_batches)
      zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, state.params, first, rng)
      )
      ((loss, sums), grads), _ = jax.lax.scan(
        accumulate, zeros, (micro_batches, jnp.arange(num_micro))
      )

    new_state, grad_norm, finite = apply_if_finite(state, grads, loss, tx)
    # `loss` is the objective; report the cross-entropy part (comparable with dense models).
    ce_loss = sums["loss_sum"] / total_weight
    metrics = dict(
      sums,
      loss=ce_loss,
      grad_norm=grad_norm,
      finite=finite,
      learning_rate=optim.learning_rate(schedule, state.step, state.opt_state),
    )
    return new_state, metrics

  return train_step


def apply_if_finite(
  state: TrainState,
  grads: Any,
  loss: jax.Array,
  tx: optax.GradientTransformation,
  overwrite: Callable[[Any], Any] | None = None,
) -> tuple[TrainState, jax.Array, jax.Array]:
  """(the next state, the gradient norm, whether the update was applied).

  The update is applied only when the loss, the gradients and the new parameters and
  optimizer state are all finite (Adam with a zero gradient and eps=0 computes 0/0 from
  finite gradients; a huge learning rate overflows the parameters): otherwise the state
  stays as it was, so no checkpoint can hold a non-finite array. `overwrite(new_params)`
  sets parameters the optimizer does not train (the VQGAN's EMA codebook) before the check.
  """
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  if overwrite is not None:
    new_params = overwrite(new_params)
  finite = (
    jnp.isfinite(loss)
    & jnp.isfinite(grad_norm)
    & _all_finite(new_params)
    & _all_finite(new_opt_state)
  )
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
    step=state.step + 1,
    params=keep(new_params, state.params),
    opt_state=keep(new_opt_state, state.opt_state),
  )
  return new_state, grad_norm, finite


def jit_train_step(
  train_step: Callable, state_shardings: Any, batch_shardings: Any, metrics_sharding: Any
) -> Callable:
  """The step under jit with explicit in/out shardings; the input state is donated."""
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, metrics_sharding),
    donate_argnums=(0,),
  )
