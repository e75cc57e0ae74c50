"""Stand-ins for the VQGAN side of text-to-image, for tests only: an image tokenizer with the
members text-to-image relies on, and an image-codes directory's description
(real code grids are written by m6_jax/data/image_codes.py `encode_dataset` with the stand-in).

The tokenizer is a palette quantiser: each cell of a grid x grid split of the image becomes
the code of the palette colour nearest its mean colour, and decoding paints the cells. So
the synthetic world's coloured shapes give codes a model can learn from their captions.
"""

from __future__ import annotations

import json
import os

import numpy as np

PALETTE = np.array(
  [
    [255, 255, 255],
    [230, 40, 40],
    [40, 160, 60],
    [40, 80, 220],
    [240, 210, 40],
    [150, 60, 190],
    [250, 140, 30],
    [120, 120, 120],
    [0, 0, 0],
    [120, 200, 230],
    [200, 120, 150],
    [90, 60, 30],
    [180, 230, 120],
    [240, 180, 180],
    [60, 60, 120],
    [200, 200, 150],
  ],
  np.float32,
)


class StandInImageTokenizer:
  """codebook_size, grid, image_size, encode(uint8 [b,H,W,3]) -> int32 [b,h,w] and
  decode(int [b,h,w]) -> uint8 [b,H,W,3], like m6_jax/infer/image_tokenizer.py's."""

  batch_size = 8  # images per encode call of m6_jax/data/image_codes.py `encode_dataset`
  step = None

  def __init__(self, codebook_size: int = 16, grid=(3, 3), image_size: int = 48, workdir=""):
    self.codebook_size, self.grid, self.image_size = codebook_size, tuple(grid), image_size
    self.workdir = workdir
    self.decoded = 0  # images decoded so far

  @classmethod
  def load(cls, workdir: str, checkpoint_step=None) -> "StandInImageTokenizer":
    with open(os.path.join(workdir, "stand_in.json")) as f:
      info = json.load(f)
    return cls(info["codebook_size"], tuple(info["grid"]), info["image_size"], workdir)

  def save(self, workdir: str) -> str:
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    info = {"codebook_size": self.codebook_size, "grid": self.grid, "image_size": self.image_size}
    with open(os.path.join(workdir, "stand_in.json"), "w") as f:
      json.dump(info, f)
    return workdir

  def encode(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    b, size = images.shape[0], images.shape[1]
    h, w = self.grid
    cells = images.reshape(b, h, size // h, w, size // w, 3).mean(axis=(2, 4))
    palette = PALETTE[: self.codebook_size]
    distance = ((cells[..., None, :] - palette) ** 2).sum(-1)
    return distance.argmin(-1).astype(np.int32)

  def decode(self, codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    assert codes.ndim == 3 and codes.shape[1:] == self.grid, codes.shape
    assert codes.min() >= 0 and codes.max() < self.codebook_size, (codes.min(), codes.max())
    self.decoded += len(codes)
    cell = self.image_size // self.grid[0]
    pixels = PALETTE[codes % len(PALETTE)].astype(np.uint8)
    return pixels.repeat(cell, axis=1).repeat(cell, axis=2)


def write_codes_dir(path: str, vqgan: StandInImageTokenizer, vqgan_workdir: str) -> str:
  """An image_codes_dir holding only codes_info.json: enough for config validation and for
  finding the VQGAN; training reads real codes (m6_jax/data/image_codes.py `encode_dataset`)."""
  os.makedirs(path, exist_ok=True)
  info = {
    "codebook_size": vqgan.codebook_size,
    "grid": list(vqgan.grid),
    "image_size": vqgan.image_size,
    "vqgan_workdir": vqgan_workdir,
    "vqgan_step": None,
  }
  with open(os.path.join(path, "codes_info.json"), "w") as f:
    json.dump(info, f)
  return path
