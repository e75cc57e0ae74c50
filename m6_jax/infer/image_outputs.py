"""The files text-to-image writes: one PNG per image and a grid PNG, each with the prompt in
its text metadata (the grid also shows it, drawn with a font that has its glyphs:
m6_jax/infer/fonts.py), and an index JSON with the prompt, seed, settings and files.

    OUT/<stem>_<i>.png   OUT/<stem>_grid.png   OUT/<stem>.json

The stem is the prompt's ASCII words (`image` for a prompt without any, e.g. a Chinese one)
and a short hash of the whole prompt, so that two prompts never share a file. A file that
exists already is an error unless the request says `overwrite`. The index records the
model's workdir as the caller gave it and the VQGAN's as given or relative to the workdir,
so that no path the caller did not write ends up in it (`provenance`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from m6_jax.errors import GenerationError
from m6_jax.infer import fonts

GRID_CELL = 192  # grid cells are upscaled (nearest) to this many pixels: 48 px is tiny to look at


def slug(prompt: str) -> str:
  """The prompt's ASCII letters and digits ('image' when none)."""
  words = re.findall(r"[a-z0-9]+", prompt.lower())
  return "-".join(words)[:48].strip("-") or "image"


def stem(prompt: str) -> str:
  """The file-name stem of a prompt's outputs: its slug and a hash of the whole prompt."""
  return f"{slug(prompt)}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:8]}"


def output_names(prompt: str, num_images: int) -> list[str]:
  """Every file a request writes: the images, the grid, then the index JSON."""
  name = stem(prompt)
  return [f"{name}_{i}.png" for i in range(num_images)] + [f"{name}_grid.png", f"{name}.json"]


def check_not_written(output_dir: str, prompt: str, num_images: int, overwrite: bool) -> None:
  """GenerationError naming the first of the request's files that exists (unless `overwrite`)."""
  if overwrite:
    return
  for name in output_names(prompt, num_images):
    path = os.path.join(output_dir, name)
    if os.path.exists(path):
      raise GenerationError(
        f"{path} exists (this prompt was drawn into --output_dir before); pass --overwrite "
        "to replace it, or another --output_dir."
      )


def provenance(workdir: str, step: int, vqgan_workdir: str, vqgan_given: bool) -> dict[str, Any]:
  """The index's record of what drew: the workdir as the caller gave it, and the VQGAN as
  given (`vqgan_given`) or, found through the model's codes (an absolute path of this
  machine), relative to the workdir."""
  if not vqgan_given:
    vqgan_workdir = os.path.relpath(os.path.abspath(vqgan_workdir), os.path.abspath(workdir))
  return {"workdir": workdir, "step": step, "vqgan_workdir": vqgan_workdir}


def prompt_font(text: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont | None:
  """A font that draws every character of `text` (a system font, else the package's CJK
  subset: m6_jax/infer/fonts.py), or None when there is none."""
  path = fonts.font_file(text)
  if path:
    try:
      return ImageFont.truetype(path, size)
    except OSError:
      pass
  if text.isascii():
    return ImageFont.load_default(size)
  return None


def grid_image(images: np.ndarray, prompt: str) -> tuple[Image.Image, bool]:
  """(the images in a near-square grid, cells upscaled to GRID_CELL px, under a band with the
  prompt, wrapped to the grid's width; whether the prompt could be drawn)."""
  n = len(images)
  cols = int(np.ceil(np.sqrt(n)))
  rows = -(-n // cols)
  cell, pad = GRID_CELL, 4
  font = prompt_font(prompt, 20)
  width = cols * (cell + pad) + pad
  lines = []
  if font is not None:
    lines = fonts.wrap(prompt, lambda line: font.getlength(line) <= width - 2 * pad - 4)
  band = 12 + 24 * len(lines) if lines else 0
  grid = Image.new("RGB", (width, band + rows * (cell + pad) + pad), (255, 255, 255))
  for i, line in enumerate(lines):
    ImageDraw.Draw(grid).text((pad + 2, 6 + 24 * i), line, fill=(0, 0, 0), font=font)
  for i, image in enumerate(images):
    tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST)
    r, c = divmod(i, cols)
    grid.paste(tile, (pad + c * (cell + pad), band + pad + r * (cell + pad)))
  return grid, font is not None


def _png_info(fields: dict[str, Any]) -> PngImagePlugin.PngInfo:
  info = PngImagePlugin.PngInfo()
  for key, value in fields.items():
    info.add_itxt(key, str(value))  # iTXt: UTF-8, so a Chinese prompt survives
  return info


def png_bytes(image: np.ndarray, fields: dict[str, Any]) -> bytes:
  """The PNG file of one drawn image, `fields` in its text metadata."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG", pnginfo=_png_info(fields))
  return buffer.getvalue()


def image_fields(req: Any, candidate: int) -> dict[str, Any]:
  """The text metadata of a drawn image: the prompt, the seed and its candidate index."""
  return {"prompt": req.prompt, "seed": req.seed, "candidate": int(candidate)}


def write_outputs(result: Any, req: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes `result` (text_to_image.GeneratedImages) for `req` (its ImageRequest) and returns
  the index: prompt, seed, settings, files, the candidates kept and their reranking scores,
  and `extra` (`provenance`). The prompt is also in every PNG's text metadata, and drawn
  above the grid when a font has its glyphs. Nothing is written when one of the files
  exists, unless `req.overwrite`."""
  out = req.output_dir
  *files, grid_name, index_name = output_names(req.prompt, len(result.images))
  check_not_written(out, req.prompt, len(result.images), req.overwrite)
  try:
    os.makedirs(out, exist_ok=True)
    for i, (name, image) in enumerate(zip(files, result.images)):
      with open(os.path.join(out, name), "wb") as f:
        f.write(png_bytes(image, image_fields(req, result.candidates[i])))
    grid, drawn = grid_image(result.images, req.prompt)
    grid.save(os.path.join(out, grid_name), pnginfo=_png_info({"prompt": req.prompt}))
    index = {
      "prompt": req.prompt,
      "seed": req.seed,
      "settings": req.settings(),
      "files": files,
      "grid": grid_name,
      "prompt_drawn_on_grid": drawn,
      "candidates": [int(c) for c in result.candidates],
      "num_candidates": result.num_candidates,
      **(extra or {}),
    }
    if result.scores is not None:
      index["scores"] = [float(s) for s in result.scores]
    with open(os.path.join(out, index_name), "w", encoding="utf-8") as f:
      json.dump(index, f, ensure_ascii=False, indent=2)
  except OSError as e:
    raise GenerationError(f"cannot write to --output_dir={out}: {e}") from None
  return index
