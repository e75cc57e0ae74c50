"""What the notebooks share: their set-up (what to install, quiet logging, a font for Chinese),
configs with overrides, metrics.jsonl curves, image grids and markdown tables. Kept out of
the notebooks so that each reads as the steps it shows."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import unicodedata
from typing import Any, Iterable, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pins(*names: str) -> list[str]:
  """The pins of `names` in requirements-experiments.txt (e.g. `matplotlib==3.11.2`): what
  a notebook installs beyond requirements.txt, so that a Colab runtime keeps its own Jupyter
  packages (ipykernel, jupyter-client, tornado) while it runs."""
  with open(os.path.join(REPO, "requirements-experiments.txt")) as f:
    lines = [line.split("#", 1)[0].strip() for line in f]
  found = [line for line in lines if re.split(r"[=<>~!\[ ]", line, maxsplit=1)[0] in names]
  if len(found) != len(names):
    raise KeyError(f"requirements-experiments.txt pins {found}, not all of {names}")
  return found


def setup() -> None:
  """What every notebook does once its packages are installed: INFO logging with the
  libraries' INFO lines (checkpointing, data loading) dropped, by the command line's own
  filter (m6_jax/cli/bootstrap.py), and Chinese drawable in figures (`use_cjk_font`). Call
  it before JAX starts: it initialises nothing of JAX."""
  from m6_jax.cli import bootstrap

  bootstrap.quiet_libraries()
  if importlib.util.find_spec("matplotlib"):  # pod_scale draws no figure and installs none
    use_cjk_font()


def use_cjk_font() -> None:
  """Registers the package's CJK subset (m6_jax/infer/fonts.py) with matplotlib as the
  fallback after its default sans-serif font (DejaVu Sans, which has no Chinese glyphs)."""
  import matplotlib.pyplot as plt
  from matplotlib import font_manager

  from m6_jax.infer import fonts

  if fonts.CJK_SUBSET_FAMILY not in {f.name for f in font_manager.fontManager.ttflist}:
    font_manager.fontManager.addfont(fonts.CJK_SUBSET)
  family = list(plt.rcParams["font.family"])
  if fonts.CJK_SUBSET_FAMILY not in family:
    plt.rcParams["font.family"] = family + [fonts.CJK_SUBSET_FAMILY]


def load_config(spec: str, overrides: Mapping[str, Any] | None = None):
  """`configs/x.py[:variant]` -> its get_config(variant), with `{"train.steps": 50}`-style
  overrides applied (unknown keys fail here, as on the command line)."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_notebook_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return apply_overrides(module.get_config(variant or None), overrides or {})


def apply_overrides(config, overrides: Mapping[str, Any]):
  """Sets dotted keys (`train.steps`) as `--config.train.steps=` does; unknown keys fail."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise KeyError(f"unknown config key {key!r}")
    setattr(node, leaf, value)
  return config


def read_metrics(workdir: str) -> list[dict]:
  """The metric records of a run's metrics.jsonl (events such as rollbacks left out)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "event" not in r]


def plot_curves(workdir: str, keys: Iterable[str], title: str = ""):
  """Each key of metrics.jsonl against the step (records that lack a key are skipped)."""
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for key in keys:
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      ax.plot(*zip(*points), label=key)
  ax.set(xlabel="step", ylabel="loss", title=title or workdir)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  plt.show()


def visible(text: str) -> str:
  """`text` with control characters (no font draws them; an undertrained model's byte
  pieces decode to them) written as escapes, e.g. `\\x10`; newlines kept."""
  return "".join(
    c if c == "\n" or unicodedata.category(c) != "Cc" else c.encode("unicode_escape").decode()
    for c in text
  )


def wrap(text: str, width: int) -> str:
  """`text` with each line cut to at most `width` columns (a CJK character counts two), at
  spaces or between CJK characters (m6_jax/infer/fonts.py `wrap`)."""
  from m6_jax.infer import fonts

  columns = lambda line: sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)
  return "\n".join(fonts.wrap(text, lambda line: columns(line) <= width))


def show_images(
  images: Sequence, titles: Sequence[str], cols: int = 4, size: float = 2.6, fontsize: int = 7
):
  """A grid of images (arrays or file paths), each under its title, the titles wrapped to
  the image's width and each row as tall as its longest title needs."""
  import matplotlib.pyplot as plt
  from PIL import Image

  use_cjk_font()
  rows = (len(images) + cols - 1) // cols
  width = int(size * 72 / (0.6 * fontsize))  # columns of a title line: a glyph is ~0.6 em
  titles = [wrap(visible(t), width) for t in titles]
  lines = [
    max((t.count("\n") + 1 for t in titles[r * cols : (r + 1) * cols]), default=1)
    for r in range(rows)
  ]
  heights = [size + 1.35 * fontsize * n / 72 + 0.1 for n in lines]  # inches: image + title
  fig, axes = plt.subplots(
    rows,
    cols,
    figsize=(cols * size, sum(heights)),
    squeeze=False,
    gridspec_kw={"height_ratios": heights},
    layout="constrained",
  )
  for ax in axes.flat:
    ax.axis("off")
    ax.set_anchor("S")  # a square image sits at the bottom of its cell, its title just above
  for ax, image, title in zip(axes.flat, images, titles):
    ax.imshow(Image.open(image) if isinstance(image, str) else image)
    ax.set_title(title, fontsize=fontsize)
  plt.show()


def markdown_table(rows: Sequence[Mapping[str, Any]], digits: int = 3):
  """Rows of dicts as a markdown table (displayed in a notebook, plain text elsewhere)."""
  from IPython.display import Markdown

  columns = list(dict.fromkeys(k for row in rows for k in row))

  def cell(v):
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
  lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
  return Markdown("\n".join(lines))
