"""Tests for the synthetic bilingual image-text world."""

import colorsys
import pickle
import re

import grain
import numpy as np
import pytest

from m6_jax.config import default_config
from m6_jax.data import splits
from m6_jax.data import synthetic as S


def _same(a, b):
  return (
    np.array_equal(a["image"], b["image"])
    and a["caption_en"] == b["caption_en"]
    and a["caption_zh"] == b["caption_zh"]
    and a["qa"] == b["qa"]
    and a["objects"] == b["objects"]
  )


def test_make_example_is_deterministic():
  for index in (0, 7, 123456789):
    assert _same(S.make_example(3, index), S.make_example(3, index))
  assert not _same(S.make_example(3, 0), S.make_example(3, 1))
  assert not _same(S.make_example(3, 0), S.make_example(4, 0))


def test_example_fields():
  ex = S.make_example(0, 5, image_size=60)
  assert ex["image"].shape == (60, 60, 3) and ex["image"].dtype == np.uint8
  assert 1 <= len(ex["objects"]) <= S.MAX_OBJECTS
  cells = [o["cell"] for o in ex["objects"]]
  assert len(set(cells)) == len(cells), "objects must be in distinct cells"
  assert ex["caption_en"].endswith(".") and ex["caption_zh"].endswith("。")
  for o in ex["objects"]:
    assert f"{o['size']} {o['color']} {o['shape']}" in ex["caption_en"]
    zh = S.SIZES_ZH[o["size"]] + S.COLORS_ZH[o["color"]] + S.SHAPES_ZH[o["shape"]]
    assert S.CELLS_ZH[o["cell_name"]] + "有一个" + zh in ex["caption_zh"]


def test_render_puts_each_colour_in_its_cell():
  bg = (240, 240, 240)
  for shape in S.SHAPES:
    for size in S.SIZES:
      scene = S.Scene(
        objects=(
          S.SceneObject(shape, "red", size, 0),
          S.SceneObject(shape, "blue", size, 4),
          S.SceneObject(shape, "yellow", size, 8),
        ),
        background=bg,
      )
      img = S.render_scene(scene, 48).astype(int)
      for obj in scene.objects:
        row, col = divmod(obj.cell, 3)
        centre = img[row * 16 + 8, col * 16 + 8]
        assert np.abs(centre - S.COLORS[obj.color]).max() <= 40, (shape, size, obj)
      # empty cells keep the background; the shape does not spill over its cell
      assert np.abs(img[16 + 8, 8] - bg).max() <= 2
      assert np.abs(img[16:32, 0:16] - bg).max() <= 2

  # Large shapes cover more pixels than small ones.
  def coverage(size):
    scene = S.Scene((S.SceneObject("circle", "green", size, 4),), bg)
    return (np.abs(S.render_scene(scene).astype(int) - bg).max(-1) > 30).sum()

  assert coverage("large") > 2 * coverage("small") > 0


def test_images_are_not_trivial():
  img = S.make_example(0, 0)["image"]
  assert len(np.unique(img.reshape(-1, 3), axis=0)) > 3


def _answer_en(question, objects):
  """An independent answerer: the single object a question refers to, or a count."""

  def only(pred):
    matches = [o for o in objects if pred(o)]
    assert len(matches) == 1, f"ambiguous or unanswerable: {question!r} {objects}"
    return matches[0]

  cell_of_phrase = {v: k for k, v in S.CELL_PHRASE_EN.items()}
  if m := re.fullmatch(r"what color is the shape (.+)\?", question):
    return only(lambda o: o["cell_name"] == cell_of_phrase[m[1]])["color"]
  if m := re.fullmatch(r"what color is the (\w+)\?", question):
    return only(lambda o: o["shape"] == m[1])["color"]
  if m := re.fullmatch(r"what shape is (\w+)\?", question):
    return only(lambda o: o["color"] == m[1])["shape"]
  if m := re.fullmatch(r"what shape is (.+)\?", question):
    return only(lambda o: o["cell_name"] == cell_of_phrase[m[1]])["shape"]
  if question == "how many shapes are there?":
    return S.NUMBERS_EN[len(objects)]
  if m := re.fullmatch(r"how many (\w+) are there\?", question):
    shape = {v: k for k, v in S.SHAPES_PLURAL_EN.items()}[m[1]]
    return S.NUMBERS_EN[sum(o["shape"] == shape for o in objects)]
  if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
    return only(lambda o: (o["color"], o["shape"]) == (m[1], m[2]))["cell_name"]
  raise AssertionError(f"unexpected question {question!r}")


def test_questions_are_unambiguous_and_bilingual():
  seen_types = set()
  for index in range(300):
    scene = S.sample_scene(1, index)
    objects = [o.as_dict() for o in scene.objects]
    qa = S.questions(scene)
    en = [q for q in qa if q["lang"] == "en"]
    zh = [q for q in qa if q["lang"] == "zh"]
    # every English question has a Chinese twin of the same type (emitted in pairs)
    assert [q["qtype"] for q in en] == [q["qtype"] for q in zh]
    for q in en:
      assert _answer_en(q["question"], objects) == q["answer"], q
      seen_types.add(q["qtype"])
    for q in zh:
      assert re.search(r"[\u4e00-\u9fff]", q["question"] + q["answer"]), q
  assert seen_types == set(S.QTYPES)


def test_splits_are_disjoint():
  n = 50
  sources = {s: S.SyntheticWorldSource(0, s, n) for s in ("train", "validation", "test")}
  indices = {s: {src[i]["index"] for i in range(n)} for s, src in sources.items()}
  assert all(len(v) == n for v in indices.values())
  assert not indices["train"] & indices["validation"]
  assert not indices["train"] & indices["test"]
  assert not indices["validation"] & indices["test"]
  images = {s: {src[i]["image"].tobytes() for i in range(n)} for s, src in sources.items()}
  assert not images["train"] & images["test"]
  assert not images["train"] & images["validation"]


def test_source_protocol_and_errors():
  src = S.SyntheticWorldSource(0, "train", 10)
  assert len(src) == 10
  assert _same(src[3], S.make_example(0, 3))
  with pytest.raises(IndexError):
    src[10]
  with pytest.raises(ValueError, match="unknown split"):
    S.SyntheticWorldSource(0, "dev", 10)
  # picklable, and usable as a grain source
  clone = pickle.loads(pickle.dumps(src))
  assert _same(clone[4], src[4])
  ds = grain.MapDataset.source(src)
  assert _same(ds[2], src[2])


def test_corpus_text_covers_all_texts():
  texts = list(S.iter_corpus_text(0, 3))
  for i in range(3):
    ex = S.make_example(0, i)
    for t in [ex["caption_en"], ex["caption_zh"]] + [
      q[k] for q in ex["qa"] for k in ("question", "answer")
    ]:
      assert t in texts
  # the word delimiter only marks Chinese word boundaries, the text is otherwise the same
  delimited = list(S.iter_corpus_text(0, 3, zh_word_delimiter="\t"))
  assert [t.replace("\t", "") for t in delimited] == texts
  assert any("\t" in t for t in delimited)


def test_no_seen_split_holds_an_unseen_combination_and_the_unseen_split_holds_only_them():
  unseen = set(S.UNSEEN_COMBINATIONS)
  assert len(unseen) == 9 and {cell for _, _, cell in unseen} == set(range(9))
  seen_triples, seen_pairs = set(), set()
  for split in ("train", "validation", "test"):
    for i in range(3000 if split == "train" else 500):
      for o in S.sample_scene(0, S.split_index(split, i)).objects:
        seen_triples.add((o.color, o.shape, o.cell))
        seen_pairs.add((o.color, o.shape))
  assert not seen_triples & unseen
  # Everything else is seen: each of the 270 - 9 other triples, so every pair and cell too.
  assert len(seen_triples) == len(S.COLORS) * len(S.SHAPES) * 9 - len(unseen)
  assert {(c, s) for c, s, _ in unseen} <= seen_pairs
  train = [S.scene_texts(S.sample_scene(0, S.split_index("train", i))) for i in range(3000)]
  captions = " ".join(t["caption_en"] for t in train)
  answers = {(q["question"], q["answer"]) for t in train for q in t["qa"]}

  def caption_phrase(o):  # ends where the object's phrase ends, "top" never "top left"
    return (
      re.escape(f"{o['color']} {o['shape']} {S.CELL_PHRASE_EN[o['cell_name']]}") + "(?= and|[,.])"
    )

  sizes = set()
  for i in range(200):
    ex = S.make_example(0, S.split_index(S.UNSEEN_SPLIT, i))
    for o in ex["objects"]:
      assert (o["color"], o["shape"], o["cell"]) in unseen, o
      sizes.add(o["size"])
      assert re.search(caption_phrase(o), ex["caption_en"]), ex["caption_en"]
      assert not re.search(caption_phrase(o), captions)
      where = (f"where is the {o['color']} {o['shape']}?", o["cell_name"])
      assert where not in answers
  assert sizes == set(S.SIZES)
  assert S.SyntheticWorldSource(0, S.UNSEEN_SPLIT, 3)[0]["objects"][0]["cell"] >= 0


def test_read_caption_reads_back_every_caption_of_the_world():
  for index in range(300):
    scene = S.sample_scene(3, index)
    truth = [dict(size=o.size, color=o.color, shape=o.shape, cell=o.cell) for o in scene.objects]
    assert S.read_caption(S.caption_en(scene)) == truth
    assert S.read_caption(S.caption_zh(scene)) == truth
    assert S.read_caption(S.caption_zh(scene, sep=" ")) == truth  # spaced pieces


def test_read_caption_leaves_unsaid_attributes_empty():
  assert S.read_caption("a red star.") == [dict(size=None, color="red", shape="star", cell=None)]
  # "top left" is one place, not "top" and "left"; a half-Chinese caption reads both halves.
  assert S.read_caption("triangle at the top left，右下角有一个大的蓝色三角形") == [
    dict(size=None, color=None, shape="triangle", cell=0),
    dict(size="large", color="blue", shape="triangle", cell=8),
  ]
  assert S.read_caption("nothing here.") == []


def _hue(rgb):
  h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
  return 360 * h


def test_a_varied_look_keeps_every_object_s_centre_in_its_cell():
  single_sizes, backgrounds, jpeg, aliased, canvases = [], set(), 0, 0, set()
  for index in range(300):
    scene = S.sample_scene(0, index)
    look = S.sample_look(0, index, scene, 48)
    assert look == S.sample_look(0, index, scene, 48)  # a pure function
    for obj, (cx, cy, r), color in zip(scene.objects, look.boxes, look.colors):
      row, col = divmod(obj.cell, 3)
      assert int(cx) == col and int(cy) == row  # the position word holds
      assert r <= cx <= 3 - r and r <= cy <= 3 - r  # inside the canvas
      if len(scene.objects) > 1:  # several: each stays inside its cell
        assert col <= cx - r and cx + r <= col + 1 and row <= cy - r and cy + r <= row + 1
      else:
        single_sizes.append(r)
      assert (r >= 0.36) == (obj.size == "large")
      low, high = S.HUES[obj.color]
      hue = _hue(color)
      assert low - 15 <= hue <= high + 15 or low - 15 <= hue - 360 <= high + 15, (obj, color)
    backgrounds.add(look.background)
    jpeg += look.jpeg_quality > 0
    aliased += look.aliased
    canvases.add(look.canvas)
  assert max(single_sizes) > 1.0  # a lone object may fill most of the image
  assert min(min(b) for b in backgrounds) < 180 and (255, 255, 255) in backgrounds
  assert 40 < jpeg < 150 and 40 < aliased < 150
  assert min(canvases) < 56 and max(canvases) > 88


def test_a_varied_image_shows_its_scene_where_its_texts_say():
  for index in range(40):
    clean, varied = S.make_example(0, index), S.make_example(0, index, varied=True)
    assert {k: v for k, v in clean.items() if k != "image"} == {
      k: v for k, v in varied.items() if k != "image"
    }
    assert not np.array_equal(clean["image"], varied["image"])
    scene = S.sample_scene(0, index)
    look = S.sample_look(0, index, scene, 48)
    image = varied["image"].astype(np.int32)
    for obj, (cx, cy, r), color in zip(scene.objects, look.boxes, look.colors):
      x, y = int(cx * 16), int(cy * 16)  # the box's centre, in pixels of the 48 px image
      if obj.shape in ("star", "cross") and r < 0.3:
        continue  # a thin small shape may leave its centre pixel half covered
      assert np.abs(image[y, x] - np.array(color)).max() < 60, (index, obj, image[y, x], color)


def test_world_variety_reaches_the_sources():
  config = default_config()
  config.data.world_variety = True
  varied = splits.split_source(config, "train")[0]
  assert np.array_equal(varied["image"], S.make_example(0, 0, 48, varied=True)["image"])
  config.data.world_variety = False
  assert np.array_equal(
    splits.split_source(config, "train")[0]["image"], S.make_example(0, 0)["image"]
  )
