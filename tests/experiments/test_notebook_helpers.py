"""What the notebooks' helper draws and logs (experiments/notebooks/helpers.py): the world's
Chinese renders without missing glyphs, image titles leave room for each other, and library
INFO lines are filtered as on the command line."""

import logging as pylogging
import warnings

import matplotlib
import pytest
from absl import logging

from experiments.notebooks import helpers
from m6_jax.cli import bootstrap
from m6_jax.data import synthetic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture
def shown(monkeypatch):
  """The figures helpers show, drawn as a notebook's inline backend draws them."""
  figures = []

  def show():
    figures.append(plt.gcf())
    figures[-1].canvas.draw()

  monkeypatch.setattr(plt, "show", show)
  with matplotlib.rc_context():  # what the helper sets is undone after the test
    yield figures
  plt.close("all")


def _scenes(n):
  return [synthetic.make_example(0, synthetic.split_index("validation", i)) for i in range(n)]


def test_the_worlds_chinese_draws_without_missing_glyphs(shown):
  scenes = _scenes(8)
  titles = []
  for s in scenes:
    zh = [qa for qa in s["qa"] if qa["lang"] == "zh"][0]
    titles.append(f"{s['caption_zh']}\nQ: {zh['question']}\nA: {zh['answer']}")
  assert all(any(ord(c) > 0x4E00 for c in t) for t in titles)
  titles[0] += " \x10"  # a byte piece an undertrained model decodes: shown as an escape
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    helpers.show_images([s["image"] for s in scenes], titles)
  missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
  assert len(shown) == 1 and not missing, missing[:3]


def test_titles_leave_room_for_each_other(shown):
  """The fine-tuning notebook's titles (four lines, one a long caption) on two rows."""
  scenes = _scenes(8)
  titles = [
    f"{s['caption_en']}\n(true: {s['caption_en']})\nQ: {s['qa'][0]['question']}\n"
    f"A: {s['qa'][0]['answer']} (true: {s['qa'][0]['answer']})"
    for s in scenes
  ]
  helpers.show_images([s["image"] for s in scenes], titles)
  fig = shown[0]
  renderer = fig.canvas.get_renderer()
  page = fig.bbox
  boxes = [
    (ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)) for ax in fig.axes
  ]
  cols = 4
  for i, (title, image) in enumerate(boxes):
    assert title.x0 >= page.x0 - 1 and title.x1 <= page.x1 + 1, f"title {i} leaves the figure"
    assert title.y1 <= page.y1 + 1, f"title {i} is cut at the top"
    assert title.y0 >= image.y1 - 1, f"title {i} covers its image"
    if i >= cols:
      assert title.y1 <= boxes[i - cols][1].y0, f"title {i} overlaps the image above"
    if i % cols:
      assert title.x0 >= boxes[i - 1][0].x1, f"title {i} overlaps its left neighbour's"


def test_visible_escapes_control_characters():
  assert helpers.visible("红色\x10\nQ: x\x05") == "红色\\x10\nQ: x\\x05"


def test_wrap_counts_a_cjk_character_as_two_columns():
  assert helpers.wrap("a small red circle", 8) == "a small\nred\ncircle"
  assert helpers.wrap("中间有一个大的红色圆形。", 8) == "中间有一\n个大的红\n色圆形。"
  assert helpers.wrap("Q: 圆形是什么颜色的？\nA: 红色", 12) == "Q: 圆形是什\n么颜色的？\nA: 红色"


@pytest.fixture
def absl_filters():
  """absl's handler and logger filters, as they were before the test."""
  targets = (logging.get_absl_handler(), logging.get_absl_logger())
  before = [list(t.filters) for t in targets]
  yield
  for target, filters in zip(targets, before):
    target.filters[:] = filters


def test_setup_filters_library_info_lines_as_the_command_line_does(absl_filters):
  with matplotlib.rc_context():
    helpers.setup()
  logger = logging.get_absl_logger()

  def passes(path, level=pylogging.INFO):
    record = pylogging.LogRecord("absl", level, path, 1, "a line", None, None)
    return logger.filter(record)

  assert not passes("/site-packages/orbax/checkpoint/checkpoint_manager.py")
  assert not passes("/site-packages/grain/_src/python/data_loader.py")
  assert passes("/site-packages/orbax/checkpoint/checkpoint_manager.py", pylogging.WARNING)
  assert passes("/repo/m6_jax/train/loop.py")
  # The command line's own filter, added once however often the set-up runs.
  helpers.setup()
  assert sum(isinstance(f, bootstrap.QuietLibraries) for f in logger.filters) == 1
