"""The VQGAN train step and optimizer, for the one train loop (m6_jax/train/families/vqgan.py).

One TrainState: params = {"generator": VQGAN, "discriminator": patch-GAN (when
vqgan.disc_weight > 0)}. One gradient of the objective (m6_jax/model/vqgan_loss.py) gives the
generator its reconstruction + commitment + adaptive-weighted GAN gradient and the
discriminator its hinge-loss gradient; one optax update (M6's optimizer: clipping, AdamW,
schedule) applies both. The quantizer's codebook and EMA statistics get no gradient (see
m6_jax/model/vqgan.py); after the update the step overwrites them, whatever the optimizer
did to them (weight decay), with their EMA update from the batch's encoder outputs
(`ema_update`). The update is applied only when every part of it is finite, as for M6
(step.py `apply_if_finite`).
"""

from __future__ import annotations

from typing import Callable

import jax
import ml_collections
import optax

from m6_jax.model import vqgan as vqgan_lib
from m6_jax.model import vqgan_loss
from m6_jax.train import optim
from m6_jax.train.state import TrainState
from m6_jax.train.step import apply_if_finite

QUANTIZER = "quantizer"  # the module whose parameters the step, not the optimizer, sets


def make_train_step(
  model: vqgan_lib.VQGAN,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  config: ml_collections.ConfigDict,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """(state, {"image": [b, H, W, 3]}) -> (state, metrics): per-step means of the loss terms
  and code statistics, `codes_restarted`, `grad_norm`, `finite`, `learning_rate`."""
  weights = vqgan_loss.LossWeights.from_config(config)
  v = config.vqgan
  decay, threshold = float(v.ema_decay), float(v.dead_code_threshold)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(vqgan_loss.loss_and_metrics, has_aux=True)
    (objective, (metrics, encoded)), grads = grad_fn(
      state.params, batch["image"], state.step, model, weights
    )
    quantizer, restarted = vqgan_lib.ema_update(
      state.params["generator"][QUANTIZER],
      encoded["z"],
      encoded["codes"],
      rng,
      decay,
      threshold,
      model.config.l2_normalize,
    )

    def set_codebook(params):
      return dict(params, generator=dict(params["generator"], **{QUANTIZER: quantizer}))

    new_state, grad_norm, finite = apply_if_finite(state, grads, objective, tx, set_codebook)
    metrics = dict(
      metrics,
      codes_restarted=restarted,
      grad_norm=grad_norm,
      finite=finite,
      learning_rate=optim.learning_rate(schedule, state.step, state.opt_state),
    )
    return new_state, metrics

  return train_step
