"""Held-out drawings: a pure function of (seed, index), the object where and as the scene
says, the variety a person's drawings have, and examples shaped as the world's."""

import io

import numpy as np
from PIL import Image

from m6_jax.data import drawings, synthetic


def _canvas(data):
  with Image.open(io.BytesIO(data)) as img:
    return img.format, np.asarray(img.convert("RGB"), dtype=np.int32)


def test_a_drawing_is_a_pure_function_of_seed_and_index():
  assert drawings.drawing(0, 3)[1] == drawings.drawing(0, 3)[1]
  assert drawings.drawing(0, 3)[1] != drawings.drawing(0, 4)[1]
  assert drawings.drawing(0, 3)[1] != drawings.drawing(1, 3)[1]


def test_the_object_is_where_and_as_the_scene_says():
  palette = {name: np.array(colors) for name, colors in drawings.EDITOR_COLORS.items()}
  formats, canvases, backgrounds = set(), set(), set()
  for index in range(64):
    scene, data = drawings.drawing(0, index)
    (obj,) = scene.objects
    fmt, pixels = _canvas(data)
    formats.add(fmt)
    canvases.add(pixels.shape[0])
    backgrounds.add(scene.background[0])
    ink = np.abs(pixels - np.array(scene.background)).sum(-1) > 120
    ys, xs = np.nonzero(ink)
    extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    assert drawings.EXTENT_PX[0] - 2 <= extent <= drawings.EXTENT_PX[1] + 2, (index, extent)
    # The cell holds the centre of the object's box (a star's or triangle's ink centroid
    # lies off it; the box's centre is what "where" means for a person).
    size = pixels.shape[0]
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    cell = 3 * min(int(3 * cy / size), 2) + min(int(3 * cx / size), 2)
    near_border = min(abs((3 * c / size) % 1 - 0.5) for c in (cx, cy)) > 0.45
    assert cell == obj.cell or near_border, (index, cell, obj.cell)
    mean = pixels[ink].mean(0)
    nearest = min(palette, key=lambda n: np.abs(palette[n] - mean).sum(-1).min())
    assert nearest == obj.color, (index, mean, obj.color)
  assert formats == {"JPEG", "PNG"}
  assert min(canvases) < 60 and max(canvases) > 84
  assert 255 in backgrounds and min(backgrounds) < 200


def test_drawings_are_examples_of_the_world_s_form():
  source = drawings.DrawingsSource(0, 8, image_size=48)
  ex = source[5]
  world = synthetic.make_example(0, 0)
  assert set(ex) == set(world)
  assert ex["image"].shape == (48, 48, 3) and ex["image"].dtype == np.uint8
  (obj,) = ex["objects"]
  said = synthetic.read_caption(ex["caption_en"])
  assert said == [{k: obj[k] for k in ("size", "color", "shape", "cell")}]
  assert {qa["qtype"] for qa in ex["qa"]} == set(synthetic.QTYPES)
  assert len(source) == 8
