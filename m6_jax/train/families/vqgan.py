"""The VQGAN family: the image tokenizer of text-to-image (m6_jax/train/families/)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from m6_jax.data import image_batches
from m6_jax.model import vqgan as vqgan_lib
from m6_jax.train import optim, vqgan_step

# The progress line's loss terms and code statistics, when the step reports them.
_PROGRESS_TERMS = ("rec_loss", "mse", "batch_usage", "codes_restarted", "gan_loss", "disc_loss")


class VQGANFamily:
  name = "vqgan"
  needs_tokenizer = False  # images only
  headline_loss = "rec_loss"
  eval_line_metrics = ("psnr", "codebook_usage", "perplexity")

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = vqgan_lib.VQGAN(vqgan_lib.VQGANConfig.from_config(config))

  def init_params(self, params_rng: jax.Array, dropout_rng: jax.Array) -> Any:
    del dropout_rng  # no dropout
    return vqgan_lib.init_params(self.model.config, params_rng)

  def make_optimizer(self) -> optax.GradientTransformation:
    return optim.make_optimizer(self.config.train)

  def make_train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule):
    return vqgan_step.make_train_step(self.model, tx, schedule, self.config)

  def batch_shapes(self):
    return image_batches.batch_shapes(self.config.data)

  def data_iterator(self, tokenizer) -> Any:
    """This process's slice of every global batch of images, checkpointable."""
    del tokenizer
    return iter(
      image_batches.make_dataset(self.config, "train", jax.process_index(), jax.process_count())
    )

  def step_flops(self, host_batch: dict[str, np.ndarray]) -> float:
    del host_batch  # no analytic count for the convolutions: no MFU
    return 0.0

  def progress_terms(self, summary: dict[str, float]) -> str:
    return " | ".join(f"{k} {summary[k]:.4g}" for k in _PROGRESS_TERMS if k in summary)

  def evaluator(self, workdir: str):
    """PSNR, codebook usage and perplexity over the held-out images; checks now, before
    training, that train.eval_metric is one of them."""
    from m6_jax.evaluation import vqgan_eval

    return vqgan_eval.PeriodicEvaluator(self.config, workdir)

  @staticmethod
  def run_eval(
    workdir, step, config, best, num_examples, with_baselines, split="validation"
  ) -> dict[str, Any]:
    from m6_jax.evaluation import vqgan_eval

    if num_examples or with_baselines or split != "validation":
      logging.warning(
        "--num_eval_examples, --baselines and --split apply to M6 models, not a VQGAN."
      )
    return vqgan_eval.run_eval(workdir, step, config, best)
