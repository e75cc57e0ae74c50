"""User image-text data -> WebDataset or Parquet shards, for ``--mode=prepare_data
--output_format=webdataset|parquet``: an image folder + JSONL (or MUGE TSV files) converted
into ``<output_dir>/<name>/<split>/00000.tar`` (or ``.parquet``) shards in img2dataset's
layout (m6_jax/data/shard_writer.py), which ``data.source='shards'`` streams.

The input formats, the splits and the checks of bad records are those of the TFDS
conversion (``m6_jax.data.prepare``): the same records are kept, with the same image bytes
(JPEG and PNG byte for byte, anything else re-encoded), in input order. A record's caption
is its ``.txt`` (none when it has only a question / answer), its other texts, id and image
key are in its ``.json`` (or metadata columns). The shards are written under
``<name>.incomplete`` and renamed when every split is done, so an interrupted conversion
never looks finished.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Mapping

from m6_jax.data import fields, prepare, shard_writer
from m6_jax.data.prepare_summary import PrepareSummary
from m6_jax.errors import DataPreparationError


def prepare_shards(
  input_format: str,
  input_path: str | Mapping[str, str],
  output_dir: str,
  name: str,
  output_format: str = "webdataset",
  *,
  shard_size: int = 1000,
  validation_fraction: float = 0.0,
  image_dir: str | None = None,
  max_text_chars: int = 1000,
  max_image_size: int = 512,
  max_rejected_fraction: float = 0.1,
  overwrite: bool = False,
  progress_every: int = 1000,
  log_limit: int = 100,
  num_workers: int = 0,
  print_fn: Callable[[str], None] | None = print,
) -> PrepareSummary:
  """Converts user data into shards (arguments as ``prepare.prepare_data``'s, plus the
  ``output_format`` and the records per shard); returns the summary."""
  start = time.time()
  if output_format not in shard_writer.FORMATS:
    raise DataPreparationError(
      f"output_format={output_format!r} is not one of {shard_writer.FORMATS}"
    )
  if not output_dir:
    raise DataPreparationError(
      f"--output_format={output_format} writes <data_dir>/<name>/<split>/ shards: give --data_dir"
    )
  if shard_size < 1:
    raise DataPreparationError(f"shard_size={shard_size} must be >= 1")
  inputs = prepare.checked_inputs(
    input_format,
    input_path,
    name,
    validation_fraction,
    max_text_chars,
    max_image_size,
    max_rejected_fraction,
    progress_every,
  )
  root = os.path.join(os.path.expanduser(output_dir), name)
  if os.path.exists(root) and not overwrite:
    raise DataPreparationError(
      f"{root} already exists; pass overwrite=True (--overwrite) to replace it"
    )
  partial = root + ".incomplete"
  shutil.rmtree(partial, ignore_errors=True)  # leftovers of a killed run
  generator = prepare.Generator(  # the TFDS conversion's reader and checks
    input_format,
    inputs,
    validation_fraction,
    image_dir,
    max_text_chars,
    max_image_size,
    max_rejected_fraction,
    progress_every,
    log_limit,
    num_workers or min(8, os.cpu_count() or 1),
  )
  others = [c for c in fields.columns() if c != "caption"]
  try:
    for split in generator.plan:
      writer = shard_writer.ShardWriter(os.path.join(partial, split), output_format, shard_size)
      for _, example in generator.generate(split, {}):
        texts = {c: example[c] for c in others}
        texts.update(id=example["id"], image_key=example["image_key"])
        writer.add(example["image"], example["caption"] or None, texts)
      writer.close()
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  finally:
    generator.close()
  if os.path.exists(root):
    shutil.rmtree(root)
  os.rename(partial, root)
  summary = PrepareSummary(
    name, root, generator.stats, time.time() - start, generator.task_records()
  )
  if print_fn is not None:
    print_fn(summary.format() + f"\n  ({summary.seconds:.1f} s)")
  return summary
