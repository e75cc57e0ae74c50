"""The config keys of images as codes: the VQGAN (model.family="vqgan", the `vqgan` section)
and the image codes M6 generates (model.code_*, data.image_codes_dir, the tasks that need
codes), with their validation. m6_jax/config.py builds the whole config and validates it
through here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from m6_jax.data import tasks
from m6_jax.errors import ConfigError
from m6_jax.errors import require as _require

VQGAN_EVAL_METRICS = ("psnr", "codebook_usage", "perplexity")


def vqgan_defaults() -> ml_collections.ConfigDict:
  """The VQGAN image tokenizer (model.family="vqgan"; m6_jax/model/vqgan.py). Images are
  data.image_size px; compute in model.dtype."""
  v = ml_collections.ConfigDict()
  v.channels = 8  # base width of the encoder / decoder convolutions
  # Width multiplier of each resolution level; a stride-2 convolution (encoder) or an
  # upsampling (decoder) between levels, so there are log2(downsample_factor) + 1 entries.
  # Every width must be a multiple of 8 (GroupNorm groups).
  v.channel_multipliers = (1, 2, 4, 8)
  v.num_res_blocks = 1  # residual blocks per level (encoder and decoder)
  # Image side / code grid side: 48 px / 8 -> 6x6 codes per image, / 4 -> 12x12.
  v.downsample_factor = 8
  v.codebook_size = 256  # codes; at most 65536 (code grids are stored as uint16)
  v.code_dim = 16  # dimension of the code vectors the lookup compares
  v.l2_normalize = True  # ViT-VQGAN lookup: unit-length encoder outputs and codes
  v.beta = 0.25  # commitment loss weight: mean (z - stop_gradient(code))^2
  v.ema_decay = 0.99  # the codebook is an exponential moving average of its assigned z
  # A code whose EMA count falls below this many assignments per step is restarted on a
  # random encoder output of the batch, with this count (0: never restart).
  v.dead_code_threshold = 0.25
  v.l1_weight = 1.0  # reconstruction loss: l1_weight * |x' - x| + l2_weight * (x' - x)^2,
  v.l2_weight = 0.0  # means over pixels, images in [-1, 1] scale
  # Patch-GAN discriminator (hinge loss, taming-transformers' adaptive weight on the
  # decoder's last layer). 0: no discriminator (no parameters, no compute).
  v.disc_weight = 0.0
  v.disc_start = 0  # train step from which the GAN terms count (both networks)
  v.disc_channels = 32  # width of the discriminator's first convolution (a multiple of 8)
  v.disc_layers = 2  # stride-2 convolutions of the discriminator
  return v


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


def validate_image_codes(config: ml_collections.ConfigDict, training: bool) -> None:
  """model.code_* and the tasks that generate image codes (registry flag `needs_codes`)."""
  m, d = config.model, config.data
  k, grid = m.code_vocab_size, tuple(m.code_grid)
  _require(k >= 0, f"model.code_vocab_size={k} must be >= 0 (0 = no image codes).")
  _require(
    k == 0 or (len(grid) == 2 and min(grid) > 0),
    f"model.code_grid={grid} must be (h, w) with h, w > 0 when model.code_vocab_size={k}, "
    "e.g. --config.model.code_grid='(6, 6)'.",
  )
  _require(
    0.0 <= d.guidance_drop_rate < 1.0,
    f"data.guidance_drop_rate={d.guidance_drop_rate} must be in [0, 1).",
  )
  weights = dict(d.task_weights)
  code_tasks = [n for n in tasks.names() if tasks.get(n).needs_codes and weights.get(n, 0) > 0]
  if not code_tasks:
    return
  name = code_tasks[0]
  _require(
    k > 0,
    f"{name} generates image codes and needs model.code_vocab_size > 0 (the VQGAN's codebook "
    f"size) and model.code_grid; or set data.task_weights.{name}=0.",
  )
  _require(
    d.tgt_len >= grid[0] * grid[1] + 1,
    f"data.tgt_len={d.tgt_len} must be >= {grid[0] * grid[1] + 1}: {name} targets are the "
    f"{grid[0]}x{grid[1]} codes of model.code_grid and EOS.",
  )
  _require(
    bool(d.image_codes_dir),
    f"{name} needs data.image_codes_dir (the VQGAN codes of the images), e.g. "
    "--config.data.image_codes_dir=/tmp/codes.",
  )
  if training:
    info = read_codes_info(d.image_codes_dir)
    mismatch = codes_mismatch(info["codebook_size"], info["grid"], m)
    _require(
      not mismatch,
      f"the image codes in data.image_codes_dir={d.image_codes_dir!r} do not fit the model: "
      f"{mismatch}.",
    )


def validate_vqgan(config: ml_collections.ConfigDict) -> None:
  v, size, t = config.vqgan, config.data.image_size, config.train
  f = v.downsample_factor
  _require(
    f >= 1 and f & (f - 1) == 0,
    f"vqgan.downsample_factor={f} must be a power of two (1, 2, 4, 8, ...).",
  )
  _require(
    size > 0 and size % f == 0,
    f"data.image_size={size} is not divisible by vqgan.downsample_factor={f}; pick a "
    "factor that tiles the image (48 px: 4 -> 12x12 codes, 8 -> 6x6, 16 -> 3x3).",
  )
  levels = f.bit_length()  # log2(f) + 1
  mults = tuple(v.channel_multipliers)
  _require(
    len(mults) == levels,
    f"vqgan.channel_multipliers={mults} needs {levels} entries for "
    f"vqgan.downsample_factor={f} (one per resolution level, log2(factor) + 1).",
  )
  _require(
    v.channels > 0 and all(m > 0 and v.channels * m % 8 == 0 for m in mults),
    f"vqgan.channels={v.channels} x vqgan.channel_multipliers={mults} must all be positive "
    "multiples of 8 (GroupNorm uses 8 groups).",
  )
  _require(
    2 <= v.codebook_size <= 65536,
    f"vqgan.codebook_size={v.codebook_size} must be in [2, 65536] (codes are stored as uint16).",
  )
  _require(v.code_dim >= 1, f"vqgan.code_dim={v.code_dim} must be >= 1.")
  _require(v.num_res_blocks >= 0, f"vqgan.num_res_blocks={v.num_res_blocks} must be >= 0.")
  _require(0 <= v.ema_decay < 1, f"vqgan.ema_decay={v.ema_decay} must be in [0, 1).")
  _require(
    v.dead_code_threshold >= 0,
    f"vqgan.dead_code_threshold={v.dead_code_threshold} must be >= 0 (assignments per step).",
  )
  _require(
    min(v.beta, v.l1_weight, v.l2_weight, v.disc_weight) >= 0 and v.l1_weight + v.l2_weight > 0,
    "vqgan.beta, vqgan.l1_weight, vqgan.l2_weight and vqgan.disc_weight must be >= 0, with "
    "a positive l1_weight or l2_weight.",
  )
  _require(v.disc_start >= 0, f"vqgan.disc_start={v.disc_start} must be >= 0.")
  _require(
    v.disc_channels > 0 and v.disc_channels % 8 == 0 and v.disc_layers >= 1,
    f"vqgan.disc_channels={v.disc_channels} must be a positive multiple of 8 and "
    f"vqgan.disc_layers={v.disc_layers} >= 1.",
  )
  _require(
    t.grad_accum_steps == 1,
    f"train.grad_accum_steps={t.grad_accum_steps}: the VQGAN trains without gradient "
    "accumulation (its codebook follows each batch); use 1 and a smaller data.batch_size.",
  )
  _require(
    t.eval_every == 0 or t.eval_metric in VQGAN_EVAL_METRICS,
    f"train.eval_metric='{t.eval_metric}' is not a VQGAN eval metric; use one of "
    f"{VQGAN_EVAL_METRICS} (e.g. --config.train.eval_metric=psnr).",
  )
