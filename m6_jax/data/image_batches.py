"""The VQGAN's train stream: images alone, from the sources M6's pipeline opens (the
synthetic world, or a prepared dataset decoded by the one image loader), so a VQGAN sees the
pixels M6 sees.

    source -> shuffle(seed) -> repeat -> pixels -> [process_index::process_count] -> batch

an endless grain stream of ``{"image": float32 [b, H, W, 3] in [0, 1]}`` whose iterator state
is a position, checkpointed and resumed like M6's (see pipeline.py). Whole splits in order
(evaluation, encoding): m6_jax/data/splits.py ``iter_images``.
"""

from __future__ import annotations

import grain
import numpy as np

from m6_jax.data import pipeline, splits
from m6_jax.model import features


def batch_shapes(data_config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{feature: (shape of one example, dtype)} of a VQGAN batch."""
  size = int(data_config.image_size)
  return {"image": ((size, size, 3), np.dtype(np.float32))}


class _Pixels:
  """example -> {"image": float32 [H, W, 3] in [0, 1]} (picklable, for grain)."""

  def __call__(self, example):
    return {"image": features.pixels(example["image"])}


def make_dataset(
  config, split: str = "train", process_index: int | None = None, process_count: int | None = None
) -> grain.IterDataset:
  """This process's slice of every global batch of images, endless (see the docstring)."""
  if config.data.get("source", "synthetic") == "shards":
    raise ValueError(
      "data.source='shards' streams M6's task mixture; the image batches read a prepared "
      "dataset (--mode=prepare_data) or the synthetic world"
    )
  process_index, process_count = pipeline.process_index_and_count(process_index, process_count)
  batch = pipeline.local_batch_size(int(config.data.batch_size), process_count)
  source, _ = pipeline.open_source(config, split, [])
  ds = grain.MapDataset.source(source).shuffle(seed=pipeline.derive_seed(config.seed, 5))
  ds = ds.repeat().map(_Pixels())[process_index::process_count]
  return ds.batch(batch, drop_remainder=True).to_iter_dataset(splits.read_options(config))
