"""What the notebooks share: configs with overrides, metrics.jsonl curves, image grids and
markdown tables. Kept out of the notebooks so that each reads as the steps it shows."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Iterable, Mapping, Sequence


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


def show_images(images: Sequence, titles: Sequence[str], cols: int = 4, size: float = 2.6):
  """A grid of images (arrays or file paths) with a title under each."""
  import matplotlib.pyplot as plt
  from PIL import Image

  rows = (len(images) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * (size + 0.6)), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, image, title in zip(axes.flat, images, titles):
    ax.imshow(Image.open(image) if isinstance(image, str) else image)
    ax.set_title(title, fontsize=7, wrap=True)
  plt.tight_layout()
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
