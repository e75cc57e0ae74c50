"""The sweep's plots (matplotlib, no display needed):

loss_curves.png    per train stage, the sweep's CURVE key (default `loss`) against the step,
                   one line per configuration: the mean over seeds, with a band from the
                   lowest to the highest seed (few seeds: the range says more than a std)
final_metrics.png  per headline metric, the mean over seeds with its 95% interval as error
                   bars and every seed as a dot; a grid of two swept keys is drawn as one
                   line per value of the second key against the first
"""

from __future__ import annotations

import os
from typing import Any

from experiments.sweeps import results
from experiments.sweeps.spec import Sweep


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # files only; no display on clusters or in tests
  import matplotlib.pyplot as plt

  return plt


def write(sweep: Sweep, finished: list[dict], sweep_dir: str) -> list[str]:
  """Writes the plots into `sweep_dir`; returns their file names."""
  if not finished:
    return []
  plt = _pyplot()
  names = []
  for name, draw in (("loss_curves.png", _loss_curves), ("final_metrics.png", _final_metrics)):
    fig = draw(plt, sweep, finished, sweep_dir)
    if fig is not None:
      fig.savefig(os.path.join(sweep_dir, name), dpi=100, bbox_inches="tight")
      plt.close(fig)
      names.append(name)
  return names


def _curves(sweep_dir: str, record: dict, stage: str, key: str) -> dict[int, float]:
  directory = os.path.join(sweep_dir, "runs", record["id"], stage)
  return {r["step"]: r[key] for r in results.read_records(directory) if key in r}


def _loss_curves(plt, sweep: Sweep, finished: list[dict], sweep_dir: str):
  stages = [s["name"] for s in finished[0]["stages"] if s["kind"] == "train"]
  fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    label = results.labels(finished)
    for configuration, records in results.by_configuration(finished).items():
      curves = [_curves(sweep_dir, r, stage, sweep.curve) for r in records]
      steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
      if not steps:
        continue
      values = [[c[s] for c in curves] for s in steps]
      mean = [sum(v) / len(v) for v in values]
      (line,) = ax.plot(steps, mean, label=f"{label[configuration]} (n={len(curves)})")
      ax.fill_between(
        steps,
        [min(v) for v in values],
        [max(v) for v in values],
        alpha=0.25,
        color=line.get_color(),
      )
    ax.set(title=f"{stage}: {sweep.curve} (mean; band: min-max over seeds)", xlabel="step")
    ax.set_ylabel(sweep.curve)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return fig


def _final_metrics(plt, sweep: Sweep, finished: list[dict], sweep_dir: str):
  metrics = [m for m in sweep.metrics if any(m in r["metrics"] for r in finished)]
  if not metrics:
    return None
  groups = results.by_configuration(finished)
  varied = results.varied_keys(finished)
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    series = _series(groups, varied)
    for label, points in series.items():
      xs, means, lows, highs = [], [], [], []
      for x, records in points:
        values = [r["metrics"][metric] for r in records if metric in r["metrics"]]
        if not values:
          continue
        stats = results.summarize(values)
        half = stats["ci95_high"] - stats["mean"] if stats["n"] > 1 else 0.0
        xs.append(x)
        means.append(stats["mean"])
        lows.append(half)
        highs.append(half)
        ax.scatter([x] * len(values), values, s=10, alpha=0.5, color="gray", zorder=3)
      ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=4, label=label)
    ax.set(title=metric, ylabel=metric)
    ax.set_xlabel(varied[0] if len(varied) in (1, 2) else "configuration")
    ax.grid(alpha=0.3)
    if any(series):
      ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelrotation=20, labelsize=7)
  fig.suptitle("final metrics: mean over seeds, 95% interval, each seed a dot", fontsize=10)
  return fig


def _series(groups: dict[str, list[dict]], varied: list[str]) -> dict[str, list[tuple[Any, list]]]:
  """{line label: [(x, runs)]}: a grid of two keys gives one line per value of the second."""
  series: dict[str, list[tuple[Any, list]]] = {}
  label_of = results.labels([r for records in groups.values() for r in records])
  for configuration, records in groups.items():
    overrides = records[0]["overrides"]
    if len(varied) == 2:
      label, x = f"{varied[1]}={overrides.get(varied[1])}", str(overrides.get(varied[0]))
    elif len(varied) == 1:
      label, x = "", str(overrides.get(varied[0]))
    else:
      label, x = "", label_of[configuration]
    series.setdefault(label, []).append((x, records))
  return series
