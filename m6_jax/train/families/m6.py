"""The M6 family: the multimodal Transformer trained on the task mixture (m6_jax/train/families/)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from m6_jax.data import pipeline, tasks
from m6_jax.model import features, param_count
from m6_jax.model.m6 import M6, M6Config, dummy_batch
from m6_jax.train import optim
from m6_jax.train import step as step_lib


class M6Family:
  name = "m6"
  needs_tokenizer = True
  headline_loss = "image_to_text_loss"
  eval_line_metrics = ("loss", "vqa_accuracy", "cider")

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = M6(M6Config.from_config(config))
    self._param_counts: dict[str, int] | None = None
    self._flops: dict[tuple[int, int], float] = {}

  def init_params(self, params_rng: jax.Array, dropout_rng: jax.Array) -> Any:
    rngs = {"params": params_rng, "dropout": dropout_rng}
    return self.model.init(rngs, dummy_batch(self.model.config), deterministic=True)["params"]

  def make_optimizer(self) -> optax.GradientTransformation:
    return optim.make_optimizer(self.config.train)

  def make_train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule):
    return step_lib.make_train_step(self.model, tx, schedule, self.config.train, len(tasks.names()))

  def batch_shapes(self):
    return features.config_shapes(self.config.data)

  def data_iterator(self, tokenizer) -> Any:
    """This process's slice of every global batch (the task mixture), checkpointable."""
    return iter(
      pipeline.make_dataset(
        self.config, tokenizer, "train", jax.process_index(), jax.process_count()
      )
    )

  def step_flops(self, host_batch: dict[str, np.ndarray]) -> float:
    """Analytic model FLOPs of a train step at this batch's text columns (cached per shape)."""
    shape = (host_batch["src_tokens"].shape[1], host_batch["tgt_input"].shape[1])
    if shape not in self._flops:
      if self._param_counts is None:
        self._param_counts = param_count.count_params(self.config)
      self._flops[shape] = param_count.train_flops(self.config, self._param_counts, None, *shape)
    return self._flops[shape]

  def progress_terms(self, summary: dict[str, float]) -> str:
    i2t = summary.get("image_to_text_loss")
    i2t = f"image_to_text {i2t:.4f} | " if i2t is not None else ""
    return f"{i2t}acc {summary['accuracy']:.3f}"

  def evaluator(self, workdir: str):
    """Teacher-forced losses and greedy-decoding metrics on the held-out split; checks now,
    before training, that train.eval_metric can be computed on the configured data."""
    from m6_jax.evaluation import evaluate

    return evaluate.PeriodicEvaluator(self.config, workdir)

  @staticmethod
  def run_eval(
    workdir, step, config, best, num_examples, with_baselines, split="validation"
  ) -> dict[str, Any]:
    from m6_jax.evaluation import evaluate

    return evaluate.run_eval(workdir, step, config, best, num_examples, with_baselines, split)
