"""The VQGAN objective, once: reconstruction + commitment, and the patch-GAN terms with
taming-transformers' adaptive weight. Used by the train step (m6_jax/train/vqgan_step.py).

For parameters {"generator": ..., "discriminator": ...} one gradient of the objective gives
both parts their own: the generator's loss sees the discriminator through stop_gradient, and
the discriminator's hinge loss sees the reconstruction through stop_gradient.

    generator:     rec + beta * commit + f * disc_weight * lambda * (-mean D(x_rec))
    discriminator: f * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2

rec = l1_weight * |x_rec - x| + l2_weight * (x_rec - x)^2 (means, images in [-1, 1] scale);
commit = mean (z - stop_gradient(code))^2; f = 1 from step `disc_start` on, else 0; lambda =
||grad_L rec|| / (||grad_L gan|| + 1e-4) on the decoder's last layer L, clipped to [0, 1e4]
and held constant (stop_gradient). Metrics are per-step means.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from m6_jax.model.vqgan import VQGAN, Discriminator, last_layer

MAX_ADAPTIVE_WEIGHT = 1e4


@dataclasses.dataclass(frozen=True)
class LossWeights:
  l1_weight: float = 1.0
  l2_weight: float = 0.0
  beta: float = 0.25
  disc_weight: float = 0.0
  disc_start: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> LossWeights:
    v = config.vqgan
    return cls(
      float(v.l1_weight), float(v.l2_weight), float(v.beta), float(v.disc_weight), int(v.disc_start)
    )


def reconstruction_loss(x_rec: jax.Array, target: jax.Array, w: LossWeights) -> jax.Array:
  diff = x_rec.astype(jnp.float32) - target
  return w.l1_weight * jnp.mean(jnp.abs(diff)) + w.l2_weight * jnp.mean(diff * diff)


def code_statistics(codes: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
  """The fraction of the codebook used in `codes` and the perplexity of their histogram."""
  counts = jnp.bincount(codes.reshape(-1), length=codebook_size).astype(jnp.float32)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"batch_usage": jnp.mean(counts > 0), "batch_perplexity": jnp.exp(entropy)}


def adaptive_weight(rec_of_kernel, gan_of_kernel, kernel: jax.Array) -> jax.Array:
  """||d rec / d kernel|| / (||d gan / d kernel|| + 1e-4), clipped, without gradient."""
  rec_grad = jax.grad(rec_of_kernel)(kernel)
  gan_grad = jax.grad(gan_of_kernel)(kernel)
  weight = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, MAX_ADAPTIVE_WEIGHT))


def loss_and_metrics(
  params: dict[str, Any],
  images: jax.Array,
  step: jax.Array,
  model: VQGAN,
  weights: LossWeights,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, jax.Array]]]:
  """(objective, (metrics, {"z", "codes"} for the codebook's EMA update)) of a batch of
  images [b, H, W, 3] in [0, 1] at train step `step`."""
  w, c = weights, model.config
  out = model.apply({"params": params["generator"]}, images)
  decoder = params["generator"]["decoder"]
  kernel, bias = decoder["last_kernel"], decoder["last_bias"]
  target = images.astype(jnp.float32) * 2.0 - 1.0
  x_rec = last_layer(out["features"], kernel, bias)
  rec = reconstruction_loss(x_rec, target, w)
  commit = jnp.mean(jnp.square(out["z"] - jax.lax.stop_gradient(out["quantized"])))
  vq_loss = rec + w.beta * commit
  metrics = dict(
    loss=vq_loss,
    rec_loss=rec,
    commit_loss=commit,
    mse=jnp.mean(jnp.square((jnp.clip(x_rec, -1.0, 1.0) - target) / 2.0)),
    **code_statistics(out["codes"], c.codebook_size),
  )
  objective = vq_loss
  if "discriminator" in params:
    disc = Discriminator(c)
    factor = (step >= w.disc_start).astype(jnp.float32)
    frozen_disc = {"params": jax.lax.stop_gradient(params["discriminator"])}
    features = jax.lax.stop_gradient(out["features"])
    gan_loss = -jnp.mean(disc.apply(frozen_disc, x_rec))
    weight = adaptive_weight(
      lambda k: reconstruction_loss(last_layer(features, k, bias), target, w),
      lambda k: -jnp.mean(disc.apply(frozen_disc, last_layer(features, k, bias))),
      kernel,
    )
    logits_real = disc.apply({"params": params["discriminator"]}, target)
    logits_fake = disc.apply({"params": params["discriminator"]}, jax.lax.stop_gradient(x_rec))
    disc_loss = 0.5 * (
      jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake))
    )
    objective = objective + factor * (w.disc_weight * weight * gan_loss + disc_loss)
    metrics.update(
      gan_loss=gan_loss, disc_loss=disc_loss, adaptive_weight=weight, disc_factor=factor
    )
  return objective, (metrics, {"z": out["z"], "codes": out["codes"]})
