"""The examples of one split of the configured data source, and its images in order: what
M6's pipeline (m6_jax/data/pipeline.py), the VQGAN's (image_batches.py) and the encoding of
code grids (image_codes.py) all read.

Sources (``config.data.source``): ``"synthetic"`` (the embedded world, m6_jax/data/synthetic.py),
``"tfds"`` (a dataset made by ``--mode=prepare_data``, m6_jax/data/sources.py) or ``"shards"``
(WebDataset / Parquet shards read in place, m6_jax/data/shard_source.py).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from m6_jax.data import drawings, synthetic

SOURCES = ("synthetic", "tfds", "shards")
# The sources whose records carry their own texts (not regenerated from a seed).
RECORD_SOURCES = ("tfds", "shards")


def split_source(config, split: str, max_records: int | None = None):
  """The examples of one split of ``config.data.source`` as a grain random-access source:
  the synthetic world (``num_train_examples`` / ``num_eval_examples``), a prepared
  dataset or streamed shards (``data.shards`` for train, ``data.eval_shards`` for the other
  splits; all of them, not this process's: evaluation slices records) (their first
  ``max_records`` records; None: all)."""
  data = config.data
  image_size = int(data.image_size)
  kind = data.get("source", "synthetic")
  if kind == "synthetic":
    size = data.num_train_examples if split == "train" else data.num_eval_examples
    return synthetic_source(config, split, int(size))
  if kind == "shards":
    from m6_jax.data import shard_source

    return shard_source.open_shards(config, split, max_records)
  if kind != "tfds":
    raise ValueError(f"config.data.source={kind!r} is not one of {list(SOURCES)}")
  name = str(data.get("tfds_name", ""))
  if not name:
    raise ValueError(
      "config.data.source='tfds' needs config.data.tfds_name (the name given to "
      "--mode=prepare_data) and config.data.data_dir"
    )
  from m6_jax.data import sources  # imports tensorflow_datasets: only when asked for

  return sources.PreparedSource(str(data.get("data_dir", "")), name, split, image_size, max_records)


def synthetic_source(config, split: str, num_examples: int):
  """The first ``num_examples`` examples of a split of the synthetic world of ``config``: its
  held-out drawings (m6_jax/data/drawings.py) or its scenes, in varied looks with
  ``data.world_variety``."""
  seed, image_size = int(config.seed), int(config.data.image_size)
  if split == drawings.SPLIT:
    return drawings.DrawingsSource(seed, num_examples, image_size)
  varied = bool(config.data.get("world_variety", False))
  return synthetic.SyntheticWorldSource(seed, split, num_examples, image_size, varied)


class _Image:
  """example -> its uint8 image (picklable, for grain)."""

  def __call__(self, example):
    return example["image"]


def read_options(config):
  """``data.read_threads`` threads, ``data.prefetch_batches`` batches read ahead (a
  grain.ReadOptions; grain is imported here, so that the config's checks can name the
  sources without importing JAX)."""
  import grain

  return grain.ReadOptions(
    num_threads=int(config.data.get("read_threads", 2)),
    prefetch_buffer_size=int(config.data.get("prefetch_batches", 4)),
  )


def iter_images(source, batch_size: int, config) -> Iterator[np.ndarray]:
  """The images of every record of `source`, in order: uint8 [<= batch_size, H, W, 3]."""
  import grain

  ds = grain.MapDataset.source(source).map(_Image()).batch(batch_size)
  yield from ds.to_iter_dataset(read_options(config))
