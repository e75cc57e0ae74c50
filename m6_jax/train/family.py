"""Model families: what the one train loop needs to know about the model it trains.

`config.model.family` picks one: "m6" (the multimodal Transformer) or "vqgan" (the image
tokenizer of text-to-image). A family gives the module, its parameter initialiser, the
optimizer, the train step (loss and metrics inside), the batch's features and the data
iterator; everything else (mesh, shardings, checkpoints, progress, divergence, evaluation
hook) is the same code for both:

    family = get(config)
    setup.build(config)   # family.init_params / make_optimizer / make_train_step / batch_shapes
    data_iter = family.data_iterator(tokenizer)   # tokenizer None when not needs_tokenizer
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from m6_jax.data import image_batches, pipeline, tasks
from m6_jax.model import features
from m6_jax.model import vqgan as vqgan_lib
from m6_jax.model.m6 import M6, M6Config, dummy_batch
from m6_jax.train import optim, vqgan_step
from m6_jax.train import step as step_lib
from m6_jax.train.state import TrainState

Shapes = dict[str, tuple[tuple[int, ...], np.dtype]]
Step = Callable[[TrainState, dict], tuple[TrainState, dict]]


class M6Family:
  name = "m6"
  needs_tokenizer = True  # texts are tokenized; checkpoints record the tokenizer

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = M6(M6Config.from_config(config))

  def init_params(self, params_rng: jax.Array, dropout_rng: jax.Array) -> Any:
    rngs = {"params": params_rng, "dropout": dropout_rng}
    return self.model.init(rngs, dummy_batch(self.model.config), deterministic=True)["params"]

  def make_optimizer(self) -> optax.GradientTransformation:
    return optim.make_optimizer(self.config.train)

  def make_train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Step:
    return step_lib.make_train_step(self.model, tx, schedule, self.config.train, len(tasks.names()))

  def batch_shapes(self) -> Shapes:
    return features.config_shapes(self.config.data)

  def data_iterator(self, tokenizer) -> Any:
    """This process's slice of every global batch (the task mixture), checkpointable."""
    return iter(
      pipeline.make_dataset(
        self.config, tokenizer, "train", jax.process_index(), jax.process_count()
      )
    )


class VQGANFamily:
  name = "vqgan"
  needs_tokenizer = False  # images only

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = vqgan_lib.VQGAN(vqgan_lib.VQGANConfig.from_config(config))

  def init_params(self, params_rng: jax.Array, dropout_rng: jax.Array) -> Any:
    del dropout_rng  # no dropout
    return vqgan_lib.init_params(self.model.config, params_rng)

  def make_optimizer(self) -> optax.GradientTransformation:
    return optim.make_optimizer(self.config.train)

  def make_train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Step:
    return vqgan_step.make_train_step(self.model, tx, schedule, self.config)

  def batch_shapes(self) -> Shapes:
    return image_batches.batch_shapes(self.config.data)

  def data_iterator(self, tokenizer) -> Any:
    """This process's slice of every global batch of images, checkpointable."""
    del tokenizer
    return iter(
      image_batches.make_dataset(self.config, "train", jax.process_index(), jax.process_count())
    )


FAMILIES = {"m6": M6Family, "vqgan": VQGANFamily}
Family = M6Family | VQGANFamily


def get(config: ml_collections.ConfigDict) -> Family:
  """The family of `config.model.family` (validated by m6_jax/config.py)."""
  return FAMILIES[config.model.get("family", "m6")](config)
