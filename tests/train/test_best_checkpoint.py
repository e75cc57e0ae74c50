"""The best-checkpoint manager keeps the step with the best eval metric."""

import jax.numpy as jnp
import ml_collections

from m6_jax.train import checkpointing


def _save(manager, step, value, metric):
  state = {"params": {"w": jnp.full((2,), float(step))}}
  config = ml_collections.ConfigDict({"step": step})
  checkpointing.save_best(manager, step, state, config, {metric: value, "other": -value})


def test_keeps_the_step_with_the_highest_metric(tmp_path):
  manager = checkpointing.make_best_manager(str(tmp_path), "vqa_accuracy", "max")
  for step, value in [(1, 50.0), (2, 90.0), (3, 70.0), (4, 10.0)]:
    _save(manager, step, value, "vqa_accuracy")
  assert manager.all_steps() == [2]
  assert manager.best_step() == 2
  params, step, config = checkpointing.load_params(checkpointing.best_dir(str(tmp_path)))
  assert step == 2 and config == {"step": 2} and float(params["w"][0]) == 2.0


def test_min_mode_for_losses(tmp_path):
  manager = checkpointing.make_best_manager(str(tmp_path), "loss", "min")
  for step, value in [(1, 3.0), (2, 1.0), (3, 2.0)]:
    _save(manager, step, value, "loss")
  assert manager.all_steps() == [2]
