"""Metrics to a JSON-lines file and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import os
import time

from m6_jax.evaluation.tensorboard import summary_writer


class MetricsWriter:
  """Appends records to `<workdir>/metrics.jsonl` and TensorBoard. `truncate(step)` drops the
  records after `step` (a run resumed or rolled back to `step` logs the later steps again),
  so that every step is in the file exactly once."""

  def __init__(self, workdir: str, start_step: int | None = None, enabled: bool = True):
    """`start_step`: the step the run starts at (records after it are dropped)."""
    self.enabled = enabled
    self._workdir = workdir
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = self._tb = None
    self.truncate(start_step)

  def truncate(self, step: int | None) -> None:
    """Keeps the records up to `step` (None: all; 0: none), atomically, and reopens."""
    if not self.enabled:
      return
    self.close()
    if step is not None and os.path.exists(self._path):
      with open(self._path) as f:
        kept = [line for line in f if _record_step(line) <= step]
      tmp = self._path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self._path)
    self._jsonl = open(self._path, "a")
    # TensorBoard drops the events at or after purge_step when the writer starts.
    purge = None if step is None else step + 1
    self._tb = summary_writer(os.path.join(self._workdir, "tensorboard"), purge)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(f"train/{name}", value, step)
    self._tb.flush()

  def write_event(self, step: int, record: dict) -> None:
    """A record that is not a metric (e.g. a rollback), to metrics.jsonl only."""
    if self.enabled:
      self._jsonl.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
      self._jsonl.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None


def _record_step(line: str) -> float:
  """A record's step; a torn last line (a crash mid-write) sorts after every step."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")
