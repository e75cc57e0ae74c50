"""The CJK font subset shipped with the package: it covers every character the synthetic
world writes, and a text-to-image grid draws a Chinese prompt with it where no system font
has the glyphs."""

import os

import numpy as np
from PIL import ImageFont

from m6_jax.data import synthetic
from m6_jax.infer import fonts, image_outputs

PROMPT = "左上角有一个大的紫色三角形，右下角有一个小的橙色圆形。"


def _world_characters() -> set[str]:
  chars = set()
  for seed in (0, 7):
    for split in ("train", "validation"):
      for i in range(150):
        texts = synthetic.scene_texts(synthetic.sample_scene(seed, synthetic.split_index(split, i)))
        chars |= set(texts["caption_en"] + texts["caption_zh"])
        chars |= {c for qa in texts["qa"] for c in qa["question"] + qa["answer"]}
  return chars


def test_the_subset_covers_every_character_the_world_writes():
  from fontTools.ttLib import TTFont  # installed with matplotlib

  world = _world_characters()
  assert any(ord(c) > 0x4E00 for c in world)  # the world does write Chinese
  assert world <= fonts.subset_characters(), sorted(world - fonts.subset_characters())
  cmap = TTFont(fonts.CJK_SUBSET).getBestCmap()
  assert {chr(c) for c in cmap} >= fonts.subset_characters()
  assert os.path.getsize(fonts.CJK_SUBSET) < 100_000  # a subset, not the 20 MB font


def test_a_chinese_prompt_is_drawn_without_a_system_font(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))  # no fc-list: no system font is found
  images = np.full((8, 48, 48, 3), 200, np.uint8)  # a 3 x 3 grid, under a band with the prompt
  grid, drawn = image_outputs.grid_image(images, PROMPT)
  assert drawn
  band = np.asarray(grid)[: grid.height - 3 * (image_outputs.GRID_CELL + 4) - 4]
  ink = np.where((band < 128).all(-1).any(0))[0]
  assert ink.size and ink.max() - ink.min() > 18 * len(PROMPT)  # the whole line, not a box
  # Real glyphs, not one missing-glyph box repeated.
  font = ImageFont.truetype(fonts.font_file(PROMPT), 20)
  masks = {bytes(font.getmask(ch)) for ch in "左上角紫色三"}
  assert len(masks) == 6


def test_a_long_prompt_wraps_within_the_grid():
  prompt = "a large green star on the right and a small yellow cross at the bottom."
  images = np.full((8, 48, 48, 3), 200, np.uint8)
  grid, drawn = image_outputs.grid_image(images, prompt)
  band = np.asarray(grid)[: grid.height - 3 * (image_outputs.GRID_CELL + 4) - 4]
  ink = (band < 128).all(-1)
  columns, rows = np.where(ink.any(0))[0], np.where(ink.any(1))[0]
  assert drawn and columns.max() < grid.width - 4  # nothing runs past the right edge
  assert np.diff(rows).max() > 4  # two lines, blank rows between them
  lines = fonts.wrap(prompt, lambda line: len(line) <= 40)
  assert " ".join(lines) == prompt and len(lines) == 2
  assert fonts.wrap("左上角有一个大的紫色三角形", lambda line: len(line) <= 5) == [
    "左上角有一",
    "个大的紫色",
    "三角形",
  ]
