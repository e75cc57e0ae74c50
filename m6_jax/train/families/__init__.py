"""Model families: everything that depends on which kind of model a run trains.

`config.model.family` picks one: "m6" (the multimodal Transformer, `m6.py`) or "vqgan" (the
image tokenizer of text-to-image, `vqgan.py`). A family gives what the one train loop, the
command line and evaluation need to know about its model:

  training     the module, its parameter initialiser, the optimizer, the train step (loss
               and metrics inside), the batch's features, the data iterator, whether texts
               are tokenized, and the model FLOPs of a step (for MFU);
  reporting    its part of the progress line, the metrics shown after each evaluation and
               the headline loss the train command's last line compares;
  evaluation   the periodic evaluator (which checks `train.eval_metric` before training)
               and `--mode=eval` on a workdir of that family.

Everything else (mesh, shardings, checkpoints, progress, divergence) is the same code for
both; no module outside a family's own files asks which family it has:

    family = get(config)
    setup.build(config)   # family.init_params / make_optimizer / make_train_step / batch_shapes
    data_iter = family.data_iterator(tokenizer)   # tokenizer None when not needs_tokenizer
    of_workdir(workdir).run_eval(workdir, ...)    # the family a checkpoint was trained as
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import ml_collections
import numpy as np
import optax

from m6_jax.checkpoint import checkpoints
from m6_jax.train.families.m6 import M6Family
from m6_jax.train.families.vqgan import VQGANFamily
from m6_jax.train.state import TrainState

Shapes = dict[str, tuple[tuple[int, ...], np.dtype]]
Step = Callable[[TrainState, dict], tuple[TrainState, dict]]
# (step, parameters) -> eval metrics: the loop's periodic evaluation.
Evaluator = Callable[[int, Any], dict[str, float]]


class Family(Protocol):
  """What a model family provides (M6Family and VQGANFamily implement it)."""

  name: str
  needs_tokenizer: bool  # texts are tokenized; checkpoints record the tokenizer
  headline_loss: str  # the loss the train command's last line compares, first vs last step
  eval_line_metrics: tuple[str, ...]  # shown after train.eval_metric in the eval log line
  config: ml_collections.ConfigDict
  model: Any

  def init_params(self, params_rng: jax.Array, dropout_rng: jax.Array) -> Any: ...
  def make_optimizer(self) -> optax.GradientTransformation: ...
  def make_train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Step: ...
  def batch_shapes(self) -> Shapes: ...
  def data_iterator(self, tokenizer) -> Any: ...
  def step_flops(self, host_batch: dict[str, np.ndarray]) -> float: ...
  def progress_terms(self, summary: dict[str, float]) -> str: ...
  def evaluator(self, workdir: str) -> Evaluator: ...

  @staticmethod
  def run_eval(
    workdir: str,
    step: int | None,
    config: ml_collections.ConfigDict | None,
    best: bool,
    num_examples: int,
    with_baselines: bool,
    split: str = "validation",
  ) -> dict[str, Any]: ...


FAMILIES: dict[str, type] = {"m6": M6Family, "vqgan": VQGANFamily}


def get(config: ml_collections.ConfigDict) -> Family:
  """The family of `config.model.family` (validated by m6_jax/config/)."""
  return FAMILIES[config.model.get("family", "m6")](config)


def of_saved_config(saved: dict) -> type:
  """The family class of a saved config (M6 for configs from before families existed)."""
  return FAMILIES[saved.get("model", {}).get("family", "m6")]


def of_workdir(workdir: str, best: bool = False) -> type:
  """The family class of the newest checkpoint of `workdir` (or of its best/); a workdir
  without checkpoints is M6's, whose loader then reports what is missing."""
  try:
    ckpts = checkpoints.open_steps(checkpoints.best_dir(workdir) if best else workdir)
  except checkpoints.CheckpointError:
    return M6Family
  return of_saved_config(checkpoints.saved_config(ckpts, None, workdir))
