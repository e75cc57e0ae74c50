"""One image loader, for training, dataset preparation, generation and evaluation alike.

Every path that turns an image file's bytes into model pixels goes through `load_image`:
EXIF orientation applied, transparency composited on white, RGB, resized to the model's
square (aspect ratio not kept) with bicubic filtering. A prepared dataset stores the file's
bytes (re-encoded only when too large or not JPEG/PNG, via `oriented_rgb`), the pipeline
decodes them with `load_image`, and `--mode=generate` reads the same file with
`load_image_file`: one file, the same pixels in training and in generation.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from m6_jax.errors import ImageError


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB; transparent areas become white (not the undefined colour under the alpha)."""
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA"):
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
  return img.convert("RGB")


def oriented_rgb(img: Image.Image) -> Image.Image:
  """The image as it is meant to be seen: EXIF orientation applied, then `to_rgb`."""
  return to_rgb(ImageOps.exif_transpose(img))


def load_image(data: bytes, image_size: int) -> np.ndarray:
  """Image file bytes -> uint8 [image_size, image_size, 3] (see the module docstring); an
  image already of that size is not resampled. Raises Pillow's errors on bad bytes."""
  with Image.open(io.BytesIO(data)) as img:
    if img.format == "JPEG":
      img.draft("RGB", (image_size, image_size))  # fast DCT downscaling, still >= the target
    img = oriented_rgb(img)
  if img.size != (image_size, image_size):
    img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(img, dtype=np.uint8)


def load_image_file(path: str, image_size: int) -> np.ndarray:
  """`load_image` of a file; ImageError (one line) if it is missing or cannot be decoded."""
  if not os.path.isfile(path):
    raise ImageError(f"image file not found: {path}")
  try:
    with open(path, "rb") as f:
      return load_image(f.read(), image_size)
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
    raise ImageError(f"cannot read image {path}: {e}") from e
