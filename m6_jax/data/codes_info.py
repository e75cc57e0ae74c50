"""The description of a directory of image codes (`codes_info.json`, written by
`--mode=encode_images`, m6_jax/data/image_codes.py), read without JAX: config validation and
text-to-image generation check a model against the codes it learns from.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from m6_jax.errors import ConfigError

CODES_INFO_FILE = "codes_info.json"


def read_codes_info(codes_dir: str) -> dict[str, Any]:
  """The codes_info.json of an image-codes directory (codebook_size, grid, image_size,
  vqgan_workdir, vqgan_step); ConfigError when it is missing or unreadable."""
  path = os.path.join(str(codes_dir), CODES_INFO_FILE)
  try:
    with open(path) as f:
      info = json.load(f)
    info["grid"] = tuple(int(x) for x in info["grid"])
    info["codebook_size"] = int(info["codebook_size"])
  except FileNotFoundError:
    raise ConfigError(
      f"data.image_codes_dir={codes_dir!r} has no {CODES_INFO_FILE}; write the codes with "
      "python -m m6_jax.main --mode=encode_images --workdir=<vqgan workdir> "
      f"--codes_dir={codes_dir}."
    ) from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path} is not a valid codes description ({e!r}).") from None
  return info


def codes_mismatch(codebook_size: int, grid: Any, model: ml_collections.ConfigDict) -> str:
  """'' when a codebook of `codebook_size` codes in a `grid` fits the model, else why not."""
  grid, model_grid = tuple(int(x) for x in grid), tuple(int(x) for x in model.code_grid)
  if int(codebook_size) != int(model.code_vocab_size):
    return (
      f"codebook_size={codebook_size} but the model has model.code_vocab_size="
      f"{model.code_vocab_size}"
    )
  if grid != model_grid:
    return f"grid={grid} but the model has model.code_grid={model_grid}"
  return ""
