"""The optimizer: global-norm clipping, AdamW with a weight-decay mask, lr schedules.

The learning rate is the schedule times `lr_scale`, a hyperparameter injected into the
optimizer state (`optax.inject_hyperparams`): a divergence rollback lowers it by setting a
value in the state (`set_lr_scale`), without rebuilding or recompiling the step, and a
checkpoint carries it, so a resumed run continues with it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine / linear decay, rsqrt, or constant."""
  peak, warmup, steps = train.lr, int(train.warmup_steps), int(train.steps)
  end = peak * train.end_lr_fraction
  decay_steps = max(steps - warmup, 1)
  if train.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.end_lr_fraction)
  elif train.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  elif train.schedule == "rsqrt":
    # lr * sqrt(warmup / step) after warmup, as in the Transformer paper and t5x.
    start = max(warmup, 1)
    after = lambda count: peak * jnp.sqrt(start / jnp.maximum(jnp.asarray(count) + start, 1))
  elif train.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"Unknown schedule '{train.schedule}'.")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def weight_decay_mask(params: Any, train: ml_collections.ConfigDict) -> Any:
  """True for the parameters AdamW should decay.

  Following common practice (BERT, t5x, big_vision), norms, biases and embedding tables are
  not decayed unless the config says so: decaying a LayerNorm scale towards 0 or a rare
  token's embedding is harmful, not regularising.
  """

  def decide(path, _):
    # Only dict keys name parameters; other path entries are boxes (e.g. the `value` of a
    # logically-partitioned parameter during abstract initialisation).
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    leaf = names[-1]
    if leaf in ("bias", "scale") or leaf.endswith("_bias"):
      return bool(train.decay_norms_and_biases)
    if leaf == "embedding" or leaf.endswith("_embedding"):
      return bool(train.decay_embeddings)
    return True

  return jax.tree_util.tree_map_with_path(decide, params)


LR_SCALE = "lr_scale"


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train)

  def make(lr_scale: jax.Array) -> optax.GradientTransformation:
    return optax.chain(
      optax.clip_by_global_norm(train.grad_clip_norm),
      optax.adamw(
        lambda count: schedule(count) * lr_scale,
        b1=train.b1,
        b2=train.b2,
        eps=train.eps,
        weight_decay=train.weight_decay,
        mask=lambda p: weight_decay_mask(p, train),
        mu_dtype=jnp.dtype(train.get("adam_mu_dtype", "float32")),
      ),
    )

  # float32 whatever the parameters' dtype, so that the scale never rounds the schedule.
  return optax.inject_hyperparams(make, hyperparam_dtype=jnp.float32)(**{LR_SCALE: 1.0})


def get_lr_scale(opt_state: Any) -> jax.Array:
  """The learning-rate scale held in an optimizer state of `make_optimizer`."""
  return opt_state.hyperparams[LR_SCALE]


def learning_rate(schedule: optax.Schedule, step: jax.Array, opt_state: Any) -> jax.Array:
  """The learning rate of `step`: the schedule's, times the state's scale."""
  return schedule(step) * get_lr_scale(opt_state)


def set_lr_scale(opt_state: Any, scale: float) -> Any:
  """`opt_state` with its learning-rate scale set to `scale`, placed (dtype, sharding) as
  the value it replaces: the jitted step takes it without compiling again. Every process
  passes the same `scale` (its sharding may span the devices of several)."""
  old = get_lr_scale(opt_state)
  value = np.asarray(scale, old.dtype)
  new = jax.make_array_from_callback(old.shape, old.sharding, lambda index: value[index])
  return opt_state._replace(hyperparams={**opt_state.hyperparams, LR_SCALE: new})
