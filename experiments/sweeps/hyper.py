"""The vocabulary of sweep files, in the style of big_vision's `get_hyper(hyper)`:

  def get_hyper(hyper):
    return hyper.product([
      hyper.sweep("train.lr", [1e-3, 2e-3]),
      hyper.zip([hyper.sweep("train.steps", [400, 800]), hyper.sweep("train.warmup_steps", [25, 50])]),
      hyper.sweep("seed", [0, 1, 2]),
    ])

A sweep is a list of points; a point is a dict {config key: value}. Keys are config keys as
`--config.<key>` takes them (`train.lr`, `seed`); a key may be limited to one stage of a
multi-stage run with `<stage>:<key>` (e.g. `finetune:train.lr`). `seed` is the key the
results are averaged over.
"""

from __future__ import annotations

import builtins
import itertools
from typing import Any, Iterable, Sequence

Point = dict[str, Any]


class SweepError(ValueError):
  """A sweep file that cannot be expanded (bad key, clashing keys, zip of unequal lengths)."""


def sweep(key: str, values: Iterable[Any]) -> list[Point]:
  """One key over several values: [{key: v0}, {key: v1}, ...]."""
  if not isinstance(key, str) or not key:
    raise SweepError(f"hyper.sweep needs a config key (a string), got {key!r}")
  values = list(values)
  if not values:
    raise SweepError(f"hyper.sweep('{key}', ...) has no values")
  return [{key: v} for v in values]


def fixed(key: str, value: Any) -> list[Point]:
  """One key at one value, for every point it is combined with."""
  return sweep(key, [value])


def _merge(points: Sequence[Point]) -> Point:
  merged: Point = {}
  for p in points:
    clash = set(merged) & set(p)
    if clash:
      raise SweepError(f"key(s) {sorted(clash)} set twice in one point of the sweep")
    merged.update(p)
  return merged


def product(sweeps: Sequence[list[Point]]) -> list[Point]:
  """Every combination; the last sweep varies fastest (so `seed` last keeps a
  configuration's seeds together)."""
  return [_merge(combo) for combo in itertools.product(*sweeps)]


def zip(sweeps: Sequence[list[Point]]) -> list[Point]:  # noqa: A001 (big_vision's name)
  """Element-wise: the i-th points of every sweep together (all of the same length)."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise SweepError(f"hyper.zip of sweeps of different lengths {sorted(lengths)}")
  return [_merge(points) for points in builtins.zip(*sweeps)]
