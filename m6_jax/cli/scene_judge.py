"""`--mode=scene_judge`: train the scene judge (or load it from its cache) and print its
held-out accuracy on rendered validation scenes, on degraded copies of them, and chance
(m6_jax/evaluation/scene_judge.py).

    python -m m6_jax.main --mode=scene_judge --cache_dir=/tmp/judge
"""

from __future__ import annotations

import time

from absl import flags

from m6_jax.errors import EvaluationError, exit_with

# Unset training settings take TrainSettings' defaults (m6_jax/evaluation/scene_judge.py).
CACHE_DIR = flags.DEFINE_string(
  "cache_dir", None, "Folder of cached judges, one per training setting (required)."
)
NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Training steps.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per training step.")
LEARNING_RATE = flags.DEFINE_float("learning_rate", None, "Peak AdamW learning rate.")
NUM_TRAIN_SCENES = flags.DEFINE_integer(
  "num_train_scenes", None, "Train-split scenes rendered for training."
)
SEED = flags.DEFINE_integer("seed", None, "World seed (train and validation scenes).")
NUM_EVAL = flags.DEFINE_integer("num_eval", 1000, "Validation scenes to report on (>= 2).")


def settings() -> dict:
  """The TrainSettings the flags set."""
  given = (NUM_STEPS, BATCH_SIZE, LEARNING_RATE, NUM_TRAIN_SCENES, SEED)
  return {f.name: f.value for f in given if f.value is not None}


def run() -> None:
  from m6_jax.evaluation import scene_judge, scene_scores

  cache_dir, num_eval = CACHE_DIR.value, NUM_EVAL.value
  if not cache_dir:
    exit_with("--cache_dir is required, e.g. --cache_dir=/tmp/judge")
  if num_eval < 2:
    exit_with(f"--num_eval must be >= 2, got {num_eval}")
  try:
    start = time.perf_counter()
    judge = scene_judge.load_or_train(
      cache_dir, log=lambda line: print(line, flush=True), **settings()
    )
    print(f"judge ready in {time.perf_counter() - start:.1f}s")
    seed, size = judge.settings.seed, judge.settings.image_size
    result = scene_scores.evaluate_on_world(judge, seed, num_eval, size)
  except EvaluationError as e:
    exit_with(str(e))
  except OSError as e:
    exit_with(f"cannot use --cache_dir={cache_dir!r}: {e.strerror or e}")
  print(f"held-out accuracy on {num_eval} rendered validation scenes (world {seed}):")
  rows = {
    "judge": result["accuracy"],
    "judge, degraded images": result["degraded"],
    "chance (other captions)": result["chance"],
    "chance (analytic)": scene_scores.analytic_chance(),
  }
  print(scene_scores.format_table(rows))
