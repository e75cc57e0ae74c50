"""A deterministic, bilingual (English + Simplified Chinese) image-text world.

This is the embedded default dataset: it needs no download, is small enough to learn on a
CPU, and is exactly reproducible. A *scene* puts 1 to 3 coloured shapes into distinct cells
of a 3x3 grid; the image is rendered with PIL and every text (captions, questions, answers,
in both languages) is derived from the scene, so every question has one right answer.

Everything is a pure function of ``(seed, index)``:

    scene = sample_scene(seed, index)          # attributes only, cheap
    image = render_scene(scene, image_size)    # uint8 [H, W, 3]
    ex = make_example(seed, index)             # image + texts + attributes

With ``image_size=48`` each grid cell is 16x16 px, i.e. one cell is one 16 px image patch.

Splits (train / validation / test / unseen_combinations) are disjoint ranges of ``index``
(see ``SPLIT_OFFSETS``), so the same ``seed`` gives non-overlapping example streams.

Composition is tested by ``UNSEEN_COMBINATIONS``: nine (colour, shape, cell) combinations, one
per cell, that no scene of train, validation or test holds (so no caption, question or answer
of them names one), while every colour, shape and cell, and every (colour, shape) pair
elsewhere, occurs. Every object of the ``unseen_combinations`` split is one of them.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import re
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------
# Vocabulary of the world. Each attribute value has an English and a Chinese surface form.
# --------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "cross")
SHAPES_PLURAL_EN = {
  "circle": "circles",
  "square": "squares",
  "triangle": "triangles",
  "star": "stars",
  "cross": "crosses",
}
SHAPES_ZH = {
  "circle": "圆形",
  "square": "正方形",
  "triangle": "三角形",
  "star": "星形",
  "cross": "十字形",
}

# Saturated colours that stay distinct after anti-aliasing and on a light background.
COLORS = {
  "red": (220, 30, 30),
  "green": (30, 160, 40),
  "blue": (30, 70, 220),
  "yellow": (235, 190, 0),
  "purple": (140, 40, 180),
  "orange": (250, 120, 0),
}
COLORS_ZH = {
  "red": "红色",
  "green": "绿色",
  "blue": "蓝色",
  "yellow": "黄色",
  "purple": "紫色",
  "orange": "橙色",
}

SIZES = ("small", "large")
SIZES_ZH = {"small": "小的", "large": "大的"}

# Cells in reading order; index = row * 3 + col.
CELLS = (
  "top left",
  "top",
  "top right",
  "left",
  "center",
  "right",
  "bottom left",
  "bottom",
  "bottom right",
)
# English caption phrase for "<object> <where>".
CELL_PHRASE_EN = {
  "top left": "at the top left",
  "top": "at the top",
  "top right": "at the top right",
  "left": "on the left",
  "center": "in the center",
  "right": "on the right",
  "bottom left": "at the bottom left",
  "bottom": "at the bottom",
  "bottom right": "at the bottom right",
}
CELLS_ZH = {
  "top left": "左上角",
  "top": "上方",
  "top right": "右上角",
  "left": "左侧",
  "center": "中间",
  "right": "右侧",
  "bottom left": "左下角",
  "bottom": "下方",
  "bottom right": "右下角",
}

NUMBERS_EN = {1: "one", 2: "two", 3: "three"}
NUMBERS_ZH = {1: "一个", 2: "两个", 3: "三个"}

MAX_OBJECTS = 3
QTYPES = ("color", "shape", "count", "position")

# Index offsets that make the splits disjoint: example i of split s is world index
# SPLIT_OFFSETS[s] + i. Splits are far apart so any realistic size fits.
SPLIT_OFFSETS = {"train": 0, "validation": 1 << 40, "test": 2 << 40, "unseen_combinations": 3 << 40}
MAX_SPLIT_SIZE = 1 << 40
UNSEEN_SPLIT = "unseen_combinations"

# Cell k holds colour k mod 6 and shape 2k mod 5: each colour and each shape held out in one
# or two cells, each (colour, shape) pair in at most one, so all of it is seen elsewhere.
UNSEEN_COMBINATIONS = tuple(
  (tuple(COLORS)[cell % len(COLORS)], SHAPES[2 * cell % len(SHAPES)], cell) for cell in range(9)
)
_UNSEEN_BY_CELL = {cell: (color, shape) for color, shape, cell in UNSEEN_COMBINATIONS}


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str
  color: str
  size: str
  cell: int  # 0..8, row-major

  @property
  def cell_name(self) -> str:
    return CELLS[self.cell]

  def as_dict(self) -> dict[str, Any]:
    return {
      "shape": self.shape,
      "color": self.color,
      "size": self.size,
      "cell": self.cell,
      "cell_name": self.cell_name,
    }


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[SceneObject, ...]  # sorted by cell (reading order)
  background: tuple[int, int, int]  # light RGB tint


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def _rng(seed: int, index: int) -> np.random.Generator:
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
  return np.random.default_rng([int(seed), int(index)])


def _is_unseen_split(index: int) -> bool:
  return SPLIT_OFFSETS[UNSEEN_SPLIT] <= index < SPLIT_OFFSETS[UNSEEN_SPLIT] + MAX_SPLIT_SIZE


def _place(color: str, shape: str, cell: int, unseen_split: bool) -> tuple[str, str]:
  """The (colour, shape) drawn in ``cell``: the cell's unseen combination in the
  unseen_combinations split; elsewhere the draw, with the colour moved on by one where the
  draw is the cell's unseen combination (the random stream stays the same)."""
  if unseen_split:
    return _UNSEEN_BY_CELL[cell]
  if (color, shape) == _UNSEEN_BY_CELL[cell]:
    names = list(COLORS)
    color = names[(names.index(color) + 1) % len(names)]
  return color, shape


def sample_scene(seed: int, index: int) -> Scene:
  """Samples the scene attributes for world index ``index``; depends only on (seed, index)."""
  rng = _rng(seed, index)
  num = int(rng.integers(1, MAX_OBJECTS + 1))
  cells = sorted(int(c) for c in rng.choice(9, size=num, replace=False))
  color_names = list(COLORS)
  unseen_split = _is_unseen_split(index)
  objects = []
  for cell in cells:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = color_names[int(rng.integers(len(color_names)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    color, shape = _place(color, shape, cell, unseen_split)
    objects.append(SceneObject(shape=shape, color=color, size=size, cell=cell))
  objects = tuple(objects)
  # A faint per-scene background tint: images differ even for identical object sets,
  # while shapes stay far from the background colour.
  background = tuple(int(v) for v in rng.integers(225, 256, size=3))
  return Scene(objects=objects, background=background)


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

_SUPERSAMPLE = 4  # draw large, then downsample: smooth edges keep small shapes recognisable


def _star_points(cx: float, cy: float, r: float, inner: float = 0.45) -> list[tuple[float, float]]:
  points = []
  for k in range(10):
    radius = r if k % 2 == 0 else r * inner
    angle = -np.pi / 2 + k * np.pi / 5
    points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
  return points


def _draw_shape(draw, shape: str, cx, cy, r, fill, inner: float = 0.45, bar: float = 0.36):
  """A shape of half-extent ``r`` centred at (cx, cy); ``inner`` is a star's inner radius and
  ``bar`` a cross's bar half-width, both relative to ``r``."""
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == "square":
    s = r * 0.9  # visually balance the area against the circle
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
  elif shape == "star":
    draw.polygon(_star_points(cx, cy + r * 0.08, r * 1.05, inner), fill=fill)
  elif shape == "cross":
    w = r * bar
    draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
  else:  # pragma: no cover - guarded by SHAPES
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, cell_px: int) -> None:
  row, col = divmod(obj.cell, 3)
  # Half-extent of the shape: large nearly fills its cell, small is about half of that.
  r = cell_px * (0.44 if obj.size == "large" else 0.25)
  _draw_shape(draw, obj.shape, (col + 0.5) * cell_px, (row + 0.5) * cell_px, r, COLORS[obj.color])


def render_scene(scene: Scene, image_size: int = 48) -> np.ndarray:
  """Renders ``scene`` to a uint8 RGB array of shape [image_size, image_size, 3].

  The grid occupies the top-left ``3 * (image_size // 3)`` pixels; with a size divisible
  by 3 (the default 48) that is the whole image.
  """
  if image_size < 9:
    raise ValueError(f"image_size must be at least 9 (3 px per grid cell), got {image_size}")
  cell = image_size // 3
  big = image_size * _SUPERSAMPLE
  img = Image.new("RGB", (big, big), scene.background)
  draw = ImageDraw.Draw(img)
  for obj in scene.objects:
    _draw_object(draw, obj, cell * _SUPERSAMPLE)
  img = img.resize((image_size, image_size), Image.Resampling.BOX)
  return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------------------
# Varied looks (data.world_variety): the same scenes, drawn as people draw them
# --------------------------------------------------------------------------------------

# The hues (degrees) people pick for each colour name, and the lowest saturation and value
# (a dark yellow or orange reads as olive or brown).
HUES = {
  "red": (-12, 10),
  "orange": (18, 42),
  "yellow": (46, 64),
  "green": (85, 150),
  "blue": (200, 245),
  "purple": (265, 305),
}
_MIN_SATURATION_VALUE = {"yellow": (0.7, 0.85), "orange": (0.7, 0.8)}


@dataclasses.dataclass(frozen=True)
class Look:
  """How a scene is drawn when the world varies its looks (``sample_look``)."""

  canvas: int  # px it is drawn at, then resized to the image size (bicubic), as a file is
  background: tuple[int, int, int]
  boxes: tuple[tuple[float, float, float], ...]  # per object: centre x, y, half-extent (cells)
  colors: tuple[tuple[int, int, int], ...]  # per object
  inner: float  # a star's inner radius, relative to its half-extent
  bar: float  # a cross's bar half-width, relative to its half-extent
  aliased: bool  # drawn without smoothing, as a pencil or shape tool does
  jpeg_quality: int  # saved as JPEG at this quality; 0: losslessly


def _reach(k: int) -> float:
  """The largest half-extent (in cells) whose box fits the canvas with its centre in row or
  column k."""
  return 1.45 if k == 1 else 0.95


def _look_color(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
  if rng.random() < 0.4:  # the world's own colour, slightly off
    return tuple(int(np.clip(c + rng.normal(0, 8), 0, 255)) for c in COLORS[name])
  low, high = HUES[name]
  min_s, min_v = _MIN_SATURATION_VALUE.get(name, (0.65, 0.6))
  hue = (rng.uniform(low, high) % 360) / 360
  rgb = colorsys.hsv_to_rgb(hue, rng.uniform(min_s, 1.0), rng.uniform(min_v, 1.0))
  return tuple(int(round(255 * c)) for c in rgb)


def sample_look(seed: int, index: int, scene: Scene, image_size: int) -> Look:
  """A varied look of the scene of world index ``index``, from its own random stream (the
  scene's own draws stay as they are). Each object keeps its centre in its cell, so its
  position word holds: in a scene of several it stays inside its cell, at any offset, small
  (half-extent 0.18-0.32 of a cell) or large (0.36-0.5); a scene's only object may be large
  up to the whole image. Colours anywhere in their name's hues, backgrounds white, tinted
  or light to mid grey, canvases of 1 to 2 times the image size, some edges aliased and some
  images saved as JPEG."""
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
  rng = np.random.default_rng([int(seed), int(index), 1])
  single = len(scene.objects) == 1
  boxes, colors = [], []
  for obj in scene.objects:
    row, col = divmod(obj.cell, 3)
    if obj.size == "small":
      r = rng.uniform(0.18, 0.32)
    else:
      r = rng.uniform(0.36, 1.45 if single else 0.5)
    if single:
      r = min(r, _reach(col), _reach(row))
      bounds = [(max(k, r), min(k + 0.999, 3 - r)) for k in (col, row)]
    else:
      bounds = [(k + r, k + 1 - r) for k in (col, row)]
    cx, cy = (float(rng.uniform(lo, hi)) for lo, hi in bounds)
    boxes.append((cx, cy, float(r)))
    colors.append(_look_color(rng, obj.color))
  u = rng.random()
  if u < 0.35:
    background = scene.background
  elif u < 0.65:
    background = (255, 255, 255)
  else:
    grey = int(rng.integers(140, 236))
    background = tuple(int(np.clip(grey + rng.integers(-5, 6), 0, 255)) for _ in range(3))
  return Look(
    canvas=int(rng.integers(image_size, 2 * image_size + 1)),
    background=background,
    boxes=tuple(boxes),
    colors=tuple(colors),
    inner=float(rng.uniform(0.38, 0.5)),
    bar=float(rng.uniform(0.25, 0.4)),
    aliased=bool(rng.random() < 0.3),
    jpeg_quality=int(rng.integers(35, 91)) if rng.random() < 0.3 else 0,
  )


def render_look(scene: Scene, look: Look, image_size: int = 48) -> np.ndarray:
  """Renders ``scene`` as ``look`` says to a uint8 RGB array [image_size, image_size, 3]."""
  scale = 1 if look.aliased else _SUPERSAMPLE
  px = look.canvas * scale
  img = Image.new("RGB", (px, px), look.background)
  draw = ImageDraw.Draw(img)
  cell = px / 3
  for obj, (cx, cy, r), fill in zip(scene.objects, look.boxes, look.colors):
    _draw_shape(draw, obj.shape, cx * cell, cy * cell, r * cell, fill, look.inner, look.bar)
  if scale > 1:
    img = img.resize((look.canvas, look.canvas), Image.Resampling.BOX)
  if look.jpeg_quality:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=look.jpeg_quality)
    img = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
  if look.canvas != image_size:
    img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------


def _describe_en(obj: SceneObject) -> str:
  return f"a {obj.size} {obj.color} {obj.shape} {CELL_PHRASE_EN[obj.cell_name]}"


def _describe_zh(obj: SceneObject, sep: str) -> str:
  return sep.join(
    [
      CELLS_ZH[obj.cell_name],
      "有",
      "一个",
      SIZES_ZH[obj.size],
      COLORS_ZH[obj.color],
      SHAPES_ZH[obj.shape],
    ]
  )


def caption_en(scene: Scene) -> str:
  parts = [_describe_en(o) for o in scene.objects]
  text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  return text + "."


def caption_zh(scene: Scene, sep: str = "") -> str:
  """Chinese caption; ``sep`` is put between words (only used to train the tokenizer)."""
  return sep.join([f"{sep}，{sep}".join(_describe_zh(o, sep) for o in scene.objects), "。"])


# Each attribute's words in either language, longest first so "top left" wins over "top".
def _words(*tables: Mapping[str, str]) -> list[tuple[str, str]]:
  pairs = [(word, value) for table in tables for value, word in table.items()]
  return sorted(pairs, key=lambda pair: -len(pair[0]))


_READ_WORDS = {
  "size": _words({s: s for s in SIZES}, SIZES_ZH),
  "color": _words({c: c for c in COLORS}, COLORS_ZH),
  "shape": _words({s: s for s in SHAPES}, SHAPES_ZH),
  "cell": _words({c: c for c in CELLS}, CELLS_ZH),
}


def read_caption(text: str) -> list[dict[str, Any]]:
  """The objects a caption in the world's grammar describes, in order: one dict per
  description ("a large red circle at the top left", "左上角有一个大的红色圆形") with its
  ``size``, ``color``, ``shape`` and ``cell`` (index), None for what the description does
  not say. Reads English, Chinese or a mix (evaluation reads generated captions with it)."""
  # A decoder may put spaces between Chinese pieces: drop whitespace next to a Han character.
  text = re.sub(r"\s+(?=[\u4e00-\u9fff，。])|(?<=[\u4e00-\u9fff，。])\s+", "", text)
  objects = []
  for clause in re.split(r",|，| and |。|\.", text):
    found: dict[str, Any] = {}
    for attribute, words in _READ_WORDS.items():
      found[attribute] = next((value for word, value in words if word in clause), None)
    if any(v is not None for v in found.values()):
      found["cell"] = None if found["cell"] is None else CELLS.index(found["cell"])
      objects.append(found)
  return objects


def _unique(objects, key) -> dict:
  """Maps attribute value -> object for values held by exactly one object in the scene."""
  counts: dict = {}
  for o in objects:
    counts.setdefault(key(o), []).append(o)
  return {k: v[0] for k, v in counts.items() if len(v) == 1}


def _qa(question: str, answer: str, qtype: str, lang: str) -> dict[str, str]:
  return {"question": question, "answer": answer, "qtype": qtype, "lang": lang}


def questions(scene: Scene, zh_sep: str = "") -> list[dict[str, str]]:
  """All question/answer pairs the scene answers unambiguously, in English and Chinese.

  A question that names an attribute (e.g. "the circle") is only asked when exactly one
  object has that attribute, so each question has exactly one correct answer.
  ``zh_sep`` is put between Chinese words (only used to train the tokenizer).
  """

  def zh(*words: str) -> str:
    return zh_sep.join(words)

  objs = scene.objects
  qa: list[dict[str, str]] = []
  by_shape = _unique(objs, lambda o: o.shape)
  by_color = _unique(objs, lambda o: o.color)
  by_color_shape = _unique(objs, lambda o: (o.color, o.shape))

  # colour
  for shape, o in by_shape.items():
    qa.append(_qa(f"what color is the {shape}?", o.color, "color", "en"))
    qa.append(
      _qa(zh(SHAPES_ZH[shape], "是", "什么", "颜色", "的", "？"), COLORS_ZH[o.color], "color", "zh")
    )
  for o in objs:  # cells are distinct, so "the shape at <cell>" is always unique
    where = CELL_PHRASE_EN[o.cell_name]
    qa.append(_qa(f"what color is the shape {where}?", o.color, "color", "en"))
    qa.append(
      _qa(
        zh(CELLS_ZH[o.cell_name], "的", "图形", "是", "什么", "颜色", "的", "？"),
        COLORS_ZH[o.color],
        "color",
        "zh",
      )
    )
  # shape
  for o in objs:
    qa.append(_qa(f"what shape is {CELL_PHRASE_EN[o.cell_name]}?", o.shape, "shape", "en"))
    qa.append(
      _qa(zh(CELLS_ZH[o.cell_name], "是", "什么", "形状", "？"), SHAPES_ZH[o.shape], "shape", "zh")
    )
  for color, o in by_color.items():
    qa.append(_qa(f"what shape is {color}?", o.shape, "shape", "en"))
    qa.append(
      _qa(
        zh(COLORS_ZH[color], "的", "图形", "是", "什么", "形状", "？"),
        SHAPES_ZH[o.shape],
        "shape",
        "zh",
      )
    )
  # count
  n = len(objs)
  qa.append(_qa("how many shapes are there?", NUMBERS_EN[n], "count", "en"))
  qa.append(_qa(zh("图", "中", "有", "几个", "图形", "？"), NUMBERS_ZH[n], "count", "zh"))
  for shape in sorted({o.shape for o in objs}, key=SHAPES.index):
    k = sum(o.shape == shape for o in objs)
    qa.append(_qa(f"how many {SHAPES_PLURAL_EN[shape]} are there?", NUMBERS_EN[k], "count", "en"))
    qa.append(
      _qa(zh("图", "中", "有", "几个", SHAPES_ZH[shape], "？"), NUMBERS_ZH[k], "count", "zh")
    )
  # position
  for (color, shape), o in by_color_shape.items():
    qa.append(_qa(f"where is the {color} {shape}?", o.cell_name, "position", "en"))
    qa.append(
      _qa(
        zh(COLORS_ZH[color], SHAPES_ZH[shape], "在", "哪里", "？"),
        CELLS_ZH[o.cell_name],
        "position",
        "zh",
      )
    )
  return qa


def scene_texts(scene: Scene, zh_sep: str = "") -> dict[str, Any]:
  return {
    "caption_en": caption_en(scene),
    "caption_zh": caption_zh(scene, zh_sep),
    "qa": questions(scene, zh_sep),
  }


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def make_example(
  seed: int, index: int, image_size: int = 48, varied: bool = False
) -> dict[str, Any]:
  """One example of the world; a pure function of ``(seed, index, image_size, varied)``
  (``varied``: drawn in a varied look, ``sample_look``; the texts are the same).

  Returns a dict with
    image:      uint8 [image_size, image_size, 3]
    caption_en, caption_zh: str
    qa:         list of {question, answer, qtype, lang}
    objects:    list of {shape, color, size, cell, cell_name} (for evaluation)
    index:      the world index (int)
  """
  scene = sample_scene(seed, index)
  if varied:
    image = render_look(scene, sample_look(seed, index, scene, image_size), image_size)
  else:
    image = render_scene(scene, image_size)
  example = {
    "image": image,
    "index": int(index),
    "objects": [o.as_dict() for o in scene.objects],
  }
  example.update(scene_texts(scene))
  return example


def split_index(split: str, i: int) -> int:
  """World index of example ``i`` of ``split``."""
  if split not in SPLIT_OFFSETS:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
  return SPLIT_OFFSETS[split] + i


class SyntheticWorldSource:
  """grain random-access data source over examples [0, num_examples) of one split.

  Implements ``__len__`` and ``__getitem__`` (grain's RandomAccessDataSource protocol);
  record ``i`` is ``make_example(seed, SPLIT_OFFSETS[split] + i, image_size, varied)``.
  Holds no state besides its arguments, so it pickles trivially.
  """

  def __init__(
    self, seed: int, split: str, num_examples: int, image_size: int = 48, varied: bool = False
  ):
    if split not in SPLIT_OFFSETS:
      raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    if not 0 < num_examples <= MAX_SPLIT_SIZE:
      raise ValueError(f"num_examples must be in (0, {MAX_SPLIT_SIZE}], got {num_examples}")
    self.seed = int(seed)
    self.split = split
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.varied = bool(varied)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, record_key: int) -> dict[str, Any]:
    i = int(record_key)
    if not 0 <= i < self.num_examples:
      raise IndexError(f"index {i} out of range for {self!r}")
    return make_example(self.seed, split_index(self.split, i), self.image_size, self.varied)

  def __repr__(self) -> str:
    return (
      f"SyntheticWorldSource(seed={self.seed}, split={self.split!r}, "
      f"num_examples={self.num_examples}, image_size={self.image_size}, varied={self.varied})"
    )


def iter_corpus_text(seed: int, num_examples: int, zh_word_delimiter: str = "") -> Iterator[str]:
  """Yields every text of the first ``num_examples`` train scenes (for tokenizer training).

  Captions, questions and answers in both languages; no images are rendered.
  ``zh_word_delimiter`` (e.g. "\t") is put between Chinese words. Chinese has no spaces,
  and on this tiny, repetitive corpus a subword trainer would otherwise learn whole
  clauses ("右上角有一个小的蓝色正方形") as single pieces; with the delimiter passed to
  sentencepiece as ``pretokenization_delimiter`` pieces stay within words, as they would
  on natural text.
  """
  for i in range(num_examples):
    texts = scene_texts(sample_scene(seed, split_index("train", i)), zh_word_delimiter)
    yield texts["caption_en"]
    yield texts["caption_zh"]
    for qa in texts["qa"]:
      yield qa["question"]
      yield qa["answer"]
