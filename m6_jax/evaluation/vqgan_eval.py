"""Evaluation of a VQGAN image tokenizer on the whole held-out split.

Every validation image (the synthetic world's `data.num_eval_examples` scenes, or a prepared
dataset's validation split, its first `data.num_eval_examples` records when > 0) is encoded
to codes and decoded back, as `ImageTokenizer` does for its users (uint8 in, uint8 out):

  psnr             mean over images of 10 log10(255^2 / MSE), MSE over the uint8 pixels
                   ([0, 255] scale), the MSE floored at 1e-10 (a perfect image: 110 dB)
  codebook_usage   fraction of the codebook used at least once over the whole split
  perplexity       exp(entropy) of the code histogram over the whole split (codebook_size
                   for a uniform use of every code)
  mse              mean squared error in [0, 1] scale; num_images, grid, codebook_size

`run_eval` (--mode=eval on a VQGAN workdir) writes eval_metrics.json(l) and TensorBoard like
M6's evaluation; `PeriodicEvaluator` is the train loop's hook (on the training mesh).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from m6_jax.checkpoint import checkpoints
from m6_jax.data import pipeline, splits
from m6_jax.errors import ConfigError
from m6_jax.evaluation import evaluate as evaluate_lib
from m6_jax.infer.image_tokenizer import ImageTokenizer
from m6_jax.parallel import partitioning

MAX_PSNR_MSE_FLOOR = 1e-10
# The metrics train.eval_metric may pick for a VQGAN (the best step by one of them is kept).
METRICS = ("psnr", "codebook_usage", "perplexity")


def code_metrics(histogram: np.ndarray) -> dict[str, float]:
  """Codebook usage and perplexity of a histogram of codes."""
  total = max(float(histogram.sum()), 1.0)
  p = histogram[histogram > 0] / total
  return {
    "codebook_usage": float(np.mean(histogram > 0)),
    "perplexity": float(np.exp(-np.sum(p * np.log(p)))),
  }


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB) of uint8 images, [0, 255] scale."""
  diff = images.astype(np.float64) - reconstructions.astype(np.float64)
  mse = np.maximum(np.mean(diff * diff, axis=(1, 2, 3)), MAX_PSNR_MSE_FLOOR)
  return 10.0 * np.log10(255.0**2 / mse)


def evaluate(tokenizer: ImageTokenizer, config: ml_collections.ConfigDict) -> dict[str, float]:
  """The metrics of the module docstring over the validation split of `config`'s data."""
  start = time.perf_counter()
  source, _ = pipeline.open_source(config, "validation", [])
  histogram = np.zeros(tokenizer.codebook_size, np.int64)
  psnrs, squared = [], 0.0
  for images in splits.iter_images(source, tokenizer.batch_size, config):
    codes = tokenizer.encode(images)
    reconstructions = tokenizer.decode(codes)
    histogram += np.bincount(codes.reshape(-1), minlength=tokenizer.codebook_size)
    psnrs.append(psnr(images, reconstructions))
    diff = (images.astype(np.float64) - reconstructions) / 255.0
    squared += float(np.sum(diff * diff))
  values = np.concatenate(psnrs)
  h, w = tokenizer.grid
  return {
    "psnr": float(values.mean()),
    "mse": squared / (values.size * tokenizer.image_size**2 * 3),
    **code_metrics(histogram),
    "num_images": float(values.size),
    "grid": float(h * w),
    "codebook_size": float(tokenizer.codebook_size),
    "eval_seconds": time.perf_counter() - start,
  }


class PeriodicEvaluator:
  """`evaluator(step, params) -> metrics` for the train loop, on the training mesh."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    metric = config.train.eval_metric
    if metric not in METRICS:
      raise ConfigError(
        f"train.eval_metric='{metric}' is not a VQGAN eval metric; use one of {METRICS} "
        "(e.g. --config.train.eval_metric=psnr)."
      )
    self.config, self.workdir = config, workdir

  def __call__(self, step: int, params: Any) -> dict[str, float]:
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    rules = partitioning.logical_rules(self.config)
    tokenizer = ImageTokenizer(self.config, params["generator"], step, self.workdir, mesh, rules)
    return evaluate(tokenizer, self.config)


def run_eval(
  workdir: str,
  step: int | None = None,
  config: ml_collections.ConfigDict | None = None,
  best: bool = False,
) -> dict[str, Any]:
  """--mode=eval on a VQGAN workdir (its latest, `step` or `best` checkpoint): evaluates,
  prints, writes the results. `config` (the --config given, if any) picks the data;
  default: the checkpoint's."""
  tokenizer = ImageTokenizer.load(checkpoints.best_dir(workdir) if best else workdir, step)
  data_config = config if config is not None else tokenizer.config
  logging.info("Evaluating the VQGAN of %s step %d", workdir, tokenizer.step)
  result = {"step": tokenizer.step, "time": time.time(), "best": bool(best)}
  result["metrics"] = m = evaluate(tokenizer, data_config)
  evaluate_lib.write_results(workdir, result)
  print(
    f"eval step {tokenizer.step}: psnr {m['psnr']:.2f} dB ([0, 255] images), codebook usage "
    f"{m['codebook_usage']:.1%}, perplexity {m['perplexity']:.1f} of {tokenizer.codebook_size} "
    f"codes, over {int(m['num_images'])} held-out images; wrote "
    f"{os.path.join(workdir, 'eval_metrics.json')}"
  )
  return result
