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
import re

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


# What Pillow raises on bytes it cannot decode (or whose size it refuses to decode).
PILLOW_ERRORS = (
  UnidentifiedImageError,
  OSError,
  ValueError,
  SyntaxError,
  EOFError,
  Image.DecompressionBombError,
)

# Pillow names an in-memory file by its repr, which tells a user nothing.
_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def error_reason(error: BaseException) -> str:
  """Pillow's error as one line, without the repr of the buffer it read."""
  if isinstance(error, UnidentifiedImageError):
    return "unknown image format (not a PNG, JPEG or other format Pillow reads)"
  return _BUFFER_REPR.sub("", str(error)).strip() or type(error).__name__


def load_image(
  data: bytes, image_size: int, name: str = "the image bytes", max_pixels: int = 0
) -> np.ndarray:
  """Image file bytes -> uint8 [image_size, image_size, 3] (see the module docstring); an
  image already of that size is not resampled. ImageError "cannot read <name>: <why>" on
  bytes Pillow cannot decode; with `max_pixels` > 0, an image of more pixels is an
  ImageError before its pixels are decoded (its header gives its size)."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
      if max_pixels and width * height > max_pixels:
        raise ImageError(
          f"{name} has {width}x{height} = {width * height:,} pixels; at most {max_pixels:,} "
          "are accepted."
        )
      if img.format == "JPEG":
        img.draft("RGB", (image_size, image_size))  # fast DCT downscaling, still >= the target
      img = oriented_rgb(img)
  except ImageError:
    raise
  except PILLOW_ERRORS as e:
    raise ImageError(f"cannot read {name}: {error_reason(e)}") from e
  if img.size != (image_size, image_size):
    img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(img, dtype=np.uint8)


def load_image_file(path: str, image_size: int) -> np.ndarray:
  """`load_image` of a file; ImageError (one line) if it is missing or cannot be decoded."""
  if not os.path.isfile(path):
    raise ImageError(f"image file not found: {path}")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ImageError(f"cannot read image {path}: {e.strerror or e}") from e
  return load_image(data, image_size, name=f"image {path}")
