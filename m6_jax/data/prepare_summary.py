"""What ``prepare_data`` did: per-split counts and the table it prints."""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping

from m6_jax.data.readers import REASONS


@dataclasses.dataclass
class SplitStats:
  read: int = 0  # records (or unusable lines) looked at
  written: int = 0
  rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class PrepareSummary:
  """What ``prepare_data`` did; ``format()`` is the table it prints."""

  name: str
  dataset_dir: str
  splits: dict[str, SplitStats]
  seconds: float
  # {task: {split: records it can use}}: those that have every field the task needs.
  task_records: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

  @property
  def written(self) -> dict[str, int]:
    return {s: st.written for s, st in self.splits.items()}

  @property
  def rejected(self) -> collections.Counter:
    return sum((st.rejected for st in self.splits.values()), collections.Counter())

  def format(self) -> str:
    lines = [format_summary(self.splits, f"Dataset '{self.name}' in {self.dataset_dir}")]
    if self.task_records:
      lines.append("  records each task can use (data.task_weights.<task>):")
      for task, per_split in self.task_records.items():
        counts = ", ".join(f"{s} {n}" for s, n in per_split.items())
        lines.append(f"    {task:<20}{counts}")
    return "\n".join(lines)


def format_summary(splits: Mapping[str, SplitStats], title: str) -> str:
  lines = [title, f"  {'split':<12}{'read':>10}{'written':>10}{'rejected':>10}"]
  for split, st in splits.items():
    rejected = sum(st.rejected.values())
    lines.append(f"  {split:<12}{st.read:>10}{st.written:>10}{rejected:>10}")
  total = sum((st.rejected for st in splits.values()), collections.Counter())
  if total:
    lines.append("  rejected by reason:")
    for reason in REASONS:
      if total[reason]:
        per = ", ".join(f"{s} {st.rejected[reason]}" for s, st in splits.items())
        lines.append(f"    {reason:<15}{total[reason]:>8}  ({per}) - {REASONS[reason]}")
  else:
    lines.append("  no records rejected")
  return "\n".join(lines)
