"""The best-checkpoint directory keeps the step with the best eval metric (parameters only)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m6_jax.checkpoint import checkpoints


class _Tokenizer:
  model_proto = b"a tokenizer"
  vocab_size = 7


def _save(best, step, value, metric):
  params = {"w": jnp.full((2,), float(step))}
  config = ml_collections.ConfigDict({"step": step})
  metrics = {metric: value, "other": -value}
  best.save(step, config=config, tokenizer=_Tokenizer(), params=params, metrics=metrics)
  best.wait()


def test_keeps_the_step_with_the_highest_metric(tmp_path):
  best = checkpoints.Checkpoints(checkpoints.best_dir(str(tmp_path)), 1, "vqa_accuracy", "max")
  for step, value in [(1, 50.0), (2, 90.0), (3, 70.0), (4, 10.0)]:
    _save(best, step, value, "vqa_accuracy")
  assert best.steps() == [2]
  target = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
  loaded = checkpoints.load_params(checkpoints.best_dir(str(tmp_path)), target)
  assert loaded.step == 2 and loaded.config == {"step": 2}
  np.testing.assert_array_equal(np.asarray(loaded.params["w"]), [2.0, 2.0])
  assert not best.has(2, "state")  # the best step holds parameters, not the optimizer state


def test_min_mode_for_losses(tmp_path):
  best = checkpoints.Checkpoints(str(tmp_path / "best"), 1, "loss", "min")
  for step, value in [(1, 3.0), (2, 1.0), (3, 2.0)]:
    _save(best, step, value, "loss")
  assert best.steps() == [2]
