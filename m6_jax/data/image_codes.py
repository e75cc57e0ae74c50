"""Code grids of a data source, computed once by a trained VQGAN and read by the pipeline.

`encode_dataset` (``--mode=encode_images``) encodes every image of the train and validation
splits of a data source (the synthetic world: examples 0 .. data.num_train_examples - 1 and
0 .. data.num_eval_examples - 1 by index; a prepared dataset: every record of each split it
has) and writes a new directory:

  codes_info.json      codebook_size, grid [h, w], image_size, the VQGAN's workdir and step,
                       the data source's fingerprint, and the row count of every split
  <split>.npy          uint16 [N, h, w]: row i holds the codes of record i of the split
  <split>_index.npy    int64 [N]: the record index of every row (0 .. N - 1)

It is written under a temporary name and renamed when complete, so a directory that exists
is whole. With ``data.image_codes_dir`` set, the pipeline's sources (train and eval, every
task) attach ``example["image_codes"]`` int32 [h, w] by record index (`with_codes`), after
checking that the codes were made from this data source: the fingerprint (synthetic: seed
and image size; prepared: name, version, image size and split sizes) must match, and a
synthetic split must have codes for every example the config uses. Anything else is one
ConfigError.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import numpy as np
from absl import logging

from m6_jax.data import splits
from m6_jax.data.codes_info import CODES_INFO_FILE, read_codes_info
from m6_jax.errors import ConfigError

FORMAT_VERSION = 1
INFO_FILE = CODES_INFO_FILE
SPLITS = ("train", "validation")


def fingerprint(config) -> dict[str, Any]:
  """What identifies the images of `config`'s data source, and its split sizes."""
  d = config.data
  if d.get("source", "synthetic") == "synthetic":
    return {
      "kind": "synthetic",
      "seed": int(config.seed),
      "image_size": int(d.image_size),
      "splits": {"train": int(d.num_train_examples), "validation": int(d.num_eval_examples)},
    }
  from m6_jax.data import sources

  builder = sources.open_builder(d.data_dir, d.tfds_name)
  return {
    "kind": "tfds",
    "name": str(d.tfds_name).split(":")[0],
    "version": str(builder.info.version),
    "image_size": int(d.image_size),
    "splits": {
      s: int(builder.info.splits[s].num_examples) for s in SPLITS if s in builder.info.splits
    },
  }


def _mismatch(saved: dict, mine: dict, split: str) -> str | None:
  """What differs between the codes' fingerprint and the data source's, or None."""
  for key in sorted(set(saved) | set(mine)):
    if key != "splits" and saved.get(key) != mine.get(key):
      return f"{key} {saved.get(key)!r} (codes) != {mine.get(key)!r} (data)"
  have, need = saved.get("splits", {}).get(split), mine["splits"].get(split)
  if have is None or need is None:
    return f"no {split!r} split in the codes" if have is None else None
  if (have < need) if mine["kind"] == "synthetic" else (have != need):
    return f"the {split!r} split has {have} coded examples but the data has {need}"
  return None


class _WithCodes:
  """A source whose examples carry `image_codes` int32 [h, w] (row i for record i); every
  other attribute is the wrapped source's."""

  def __init__(self, source, codes: np.ndarray):
    self._source, self._codes = source, codes

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return dict(self._source[index], image_codes=np.asarray(self._codes[int(index)], np.int32))

  def __getattr__(self, name: str):
    if name.startswith("__") or name in ("_source", "_codes"):
      raise AttributeError(name)
    return getattr(self._source, name)

  def __repr__(self) -> str:
    return f"{self._source!r} with image codes"


def with_codes(source, config, split: str):
  """`source` with the codes of `data.image_codes_dir` attached (ConfigError: see above)."""
  codes_dir = str(config.data.image_codes_dir)
  info = read_codes_info(codes_dir)
  problem = _mismatch(info.get("source", {}), fingerprint(config), split)
  if problem:
    raise ConfigError(
      f"data.image_codes_dir={codes_dir} was encoded from another data source ({problem}); "
      "encode this one with --mode=encode_images and a new --codes_dir, or set "
      "data.image_codes_dir to its codes."
    )
  codes = np.load(os.path.join(codes_dir, f"{split}.npy"), mmap_mode="r")
  return _WithCodes(source, codes)


def encode_dataset(tokenizer, config, codes_dir: str) -> dict[str, Any]:
  """Encodes the train and validation splits of `config`'s data source with `tokenizer`
  (an m6_jax.infer.image_tokenizer.ImageTokenizer) into the new directory `codes_dir`;
  returns its codes_info."""
  if os.path.exists(codes_dir) and os.listdir(codes_dir):
    raise ConfigError(f"--codes_dir={codes_dir} exists and is not empty; pick a new directory.")
  if int(config.data.image_size) != tokenizer.image_size:
    raise ConfigError(
      f"data.image_size={config.data.image_size} but the VQGAN encodes "
      f"{tokenizer.image_size} px images; use a data config with that image size."
    )
  source_print = fingerprint(config)
  tmp = codes_dir.rstrip("/") + ".incomplete"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  info = {
    "format_version": FORMAT_VERSION,
    "codebook_size": tokenizer.codebook_size,
    "grid": list(tokenizer.grid),
    "image_size": tokenizer.image_size,
    "vqgan_workdir": os.path.abspath(tokenizer.workdir),
    "vqgan_step": tokenizer.step,
    "source": source_print,
    "splits": {},
  }
  for split in SPLITS:
    if split not in source_print["splits"]:
      logging.info("The data source has no %s split; skipped.", split)
      continue
    codes = _encode_split(tokenizer, splits.split_source(config, split), config, split)
    np.save(os.path.join(tmp, f"{split}.npy"), codes.astype(np.uint16))
    np.save(os.path.join(tmp, f"{split}_index.npy"), np.arange(len(codes), dtype=np.int64))
    info["splits"][split] = len(codes)
  with open(os.path.join(tmp, INFO_FILE), "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  if os.path.exists(codes_dir):
    os.rmdir(codes_dir)  # empty (checked above)
  os.replace(tmp, codes_dir)
  return info


def _encode_split(tokenizer, source, config, split: str) -> np.ndarray:
  total, done, start, last = len(source), 0, time.perf_counter(), 0.0
  out = []
  for images in splits.iter_images(source, tokenizer.batch_size, config):
    out.append(tokenizer.encode(images))
    done += len(images)
    now = time.perf_counter()
    if now - last > 5.0 or done == total:
      last = now
      rate = done / max(now - start, 1e-9)
      logging.info("encode_images %s: %d/%d images (%.0f images/s)", split, done, total, rate)
  return np.concatenate(out) if out else np.zeros((0,) + tuple(tokenizer.grid), np.int32)
