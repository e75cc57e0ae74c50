"""Held-out drawings: what a person draws with the world's vocabulary in an image editor.

The synthetic world (m6_jax/data/synthetic.py) renders each object inside one 16 px cell of a
48 px image, in its own six colours, on a near-white tint. A user who tries a model draws
differently, and this split measures how the model fares on that. Each drawing is one
object, of any of the world's shapes and colours, drawn by its own code (not the world's
renderer, nor any training augmentation):

* a canvas of 48 to 96 px, white or a light to mid grey;
* the object 20 to 40 px across, centred anywhere it fits: its position word is the 3 x 3
  cell of the canvas that holds its centre, its size word the world's nearer size;
* colours as an editor's palette offers them (pure red, lime, "yellow" 255/255/0, ...),
  each channel moved by up to 12, edges aliased (a pencil or shape tool) or smooth;
* half of them saved as JPEG (quality 40 to 90), the others as PNG; then read as a user's
  file is (``images.load_image``: resized to the model's square, bicubic).

``DrawingsSource`` gives them as the world's examples (image, captions, questions, objects),
so ``--mode=eval --split=drawings`` scores captions and answers on them as on the
validation split. Like the world, a drawing is a pure function of (seed, index).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from m6_jax.data import images, synthetic

SPLIT = "drawings"
_INDEX_OFFSET = 5 << 40  # its own random streams, apart from every split of the world

# Colours as editors name and offer them, a few per name.
EDITOR_COLORS = {
  "red": ((255, 0, 0), (230, 25, 35), (200, 0, 0)),
  "green": ((0, 200, 0), (0, 128, 0), (60, 180, 75)),
  "blue": ((0, 0, 255), (30, 60, 230), (0, 90, 200)),
  "yellow": ((255, 255, 0), (255, 220, 0), (240, 200, 40)),
  "purple": ((128, 0, 128), (150, 60, 200), (160, 32, 240)),
  "orange": ((255, 165, 0), (255, 128, 0), (240, 110, 30)),
}
CANVAS_PX = (48, 96)
EXTENT_PX = (20, 40)
_SMOOTH = 4  # supersampling of the smooth-edged half
# The world's half-extents per cell (synthetic._draw_object): large 0.44, small 0.25.
_WORLD_EXTENT = {"small": 2 * 0.25 / 3, "large": 2 * 0.44 / 3}


def _points(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
  """The polygons of a shape of half-extent r centred at (cx, cy), drawn as editors do."""
  if shape == "square":
    return [[(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]]
  if shape == "triangle":  # the isosceles triangle tool: apex up, base the full width
    return [[(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]]
  if shape == "star":
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.4)
    return [list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))]
  if shape == "cross":  # a plus sign of two bars a third as thick as long
    w = r / 3
    return [
      [(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
      [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)],
    ]
  raise ValueError(f"unknown shape {shape!r}; expected one of {synthetic.SHAPES}")


def _draw(canvas: int, background: int, color, shape: str, cx, cy, r, smooth: bool):
  scale = _SMOOTH if smooth else 1
  img = Image.new("RGB", (canvas * scale, canvas * scale), (background,) * 3)
  draw = ImageDraw.Draw(img)
  if shape == "circle":
    box = [(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale]
    draw.ellipse(box, fill=color)
  else:
    for polygon in _points(shape, cx, cy, r):
      draw.polygon([(x * scale, y * scale) for x, y in polygon], fill=color)
  return img.resize((canvas, canvas), Image.Resampling.BOX) if smooth else img


def drawing(seed: int, index: int) -> tuple[synthetic.Scene, bytes]:
  """Drawing ``index`` of the world ``seed``: its scene (one object) and its file's bytes."""
  rng = np.random.default_rng([int(seed), _INDEX_OFFSET + int(index)])
  canvas = int(rng.integers(CANVAS_PX[0], CANVAS_PX[1] + 1))
  background = 255 if rng.random() < 0.5 else int(rng.integers(150, 236))
  shape = synthetic.SHAPES[int(rng.integers(len(synthetic.SHAPES)))]
  color_name = tuple(EDITOR_COLORS)[int(rng.integers(len(EDITOR_COLORS)))]
  base = EDITOR_COLORS[color_name][int(rng.integers(3))]
  color = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in base)
  extent = int(rng.integers(EXTENT_PX[0], EXTENT_PX[1] + 1))
  r = extent / 2
  cx, cy = (float(rng.uniform(r, canvas - r)) for _ in range(2))
  img = _draw(canvas, background, color, shape, cx, cy, r, smooth=bool(rng.random() < 0.5))
  buffer = io.BytesIO()
  if rng.random() < 0.5:
    img.save(buffer, format="JPEG", quality=int(rng.integers(40, 91)))
  else:
    img.save(buffer, format="PNG")
  cell = 3 * min(int(3 * cy / canvas), 2) + min(int(3 * cx / canvas), 2)
  size = min(_WORLD_EXTENT, key=lambda s: abs(_WORLD_EXTENT[s] - extent / canvas))
  scene = synthetic.Scene(
    (synthetic.SceneObject(shape, color_name, size, cell),), (background,) * 3
  )
  return scene, buffer.getvalue()


def make_example(seed: int, index: int, image_size: int = 48) -> dict[str, Any]:
  """Drawing ``index`` as the world's examples are (``synthetic.make_example``)."""
  scene, data = drawing(seed, index)
  example = {
    "image": images.load_image(data, image_size, name=f"drawing {index}"),
    "index": int(index),
    "objects": [o.as_dict() for o in scene.objects],
  }
  example.update(synthetic.scene_texts(scene))
  return example


class DrawingsSource:
  """grain random-access data source over drawings [0, num_examples) (as
  ``synthetic.SyntheticWorldSource`` is over a split of the world)."""

  def __init__(self, seed: int, num_examples: int, image_size: int = 48):
    if num_examples <= 0:
      raise ValueError(f"num_examples must be positive, got {num_examples}")
    self.seed, self.num_examples, self.image_size = int(seed), int(num_examples), int(image_size)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, record_key: int) -> dict[str, Any]:
    if not 0 <= record_key < self.num_examples:
      raise IndexError(f"record {record_key} out of range [0, {self.num_examples})")
    return make_example(self.seed, record_key, self.image_size)

  def __repr__(self) -> str:
    return f"DrawingsSource(seed={self.seed}, num_examples={self.num_examples})"
