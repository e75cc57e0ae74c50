"""Divergence: what counts as one (how a run recovers: recovery.py).

Each step's update is applied only when its loss, gradients, new parameters and optimizer
state are all finite (m6_jax/train/step.py), so no state, and no checkpoint, ever holds a
non-finite array. The loop then watches the per-step losses (`Monitor`):

- more than `train.max_nan_steps` non-finite steps in a row, or
- a loss above `train.spike_factor` x the median of the last `train.spike_window` losses
  and above it by more than `train.spike_min_increase` (a near-zero loss, e.g. of a model
  that has learned its captions by heart, moves by large factors without diverging)

is a divergence (`Diverged`). `poison` is the fault injection that tests it.
"""

from __future__ import annotations

import collections
import dataclasses

import ml_collections
import numpy as np


class Diverged(Exception):
  """Raised by the loop's bookkeeping when a step is a divergence (see `Monitor`)."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"step {step}: {reason}")
    self.step, self.reason = step, reason


@dataclasses.dataclass
class Monitor:
  """Watches each step's loss; `observe` says whether the step is a divergence."""

  max_nan_steps: int
  spike_factor: float  # 0: no spike check
  spike_window: int
  spike_min_increase: float = 0.0
  nan_streak: int = 0
  recent: collections.deque = dataclasses.field(default_factory=collections.deque)

  @classmethod
  def from_config(cls, train: ml_collections.ConfigDict) -> Monitor:
    return cls(
      int(train.max_nan_steps),
      float(train.spike_factor),
      int(train.spike_window),
      float(train.spike_min_increase),
    )

  def observe(self, loss: float, finite: bool) -> str | None:
    """The reason this step is a divergence, or None."""
    if not finite:
      self.nan_streak += 1
      if self.nan_streak > self.max_nan_steps:
        return (
          f"non-finite loss, gradients or update ({self.nan_streak} step(s) in a row, "
          f"train.max_nan_steps={self.max_nan_steps}; the update was not applied)"
        )
      return None
    self.nan_streak = 0
    if self.spike_factor and len(self.recent) == self.spike_window:
      median = float(np.median(self.recent))
      if loss > self.spike_factor * median and loss - median > self.spike_min_increase:
        return (
          f"loss spike: {loss:.4g} > train.spike_factor={self.spike_factor:g} x the median "
          f"{median:.4g} of the last {self.spike_window} steps (and more than "
          f"train.spike_min_increase={self.spike_min_increase:g} above it)"
        )
    self.recent.append(loss)
    if len(self.recent) > self.spike_window:
      self.recent.popleft()
    return None

  def reset(self) -> None:
    self.nan_streak = 0
    self.recent.clear()


def poison(host_batch: dict, data_iter, positions: set[int]) -> dict:
  """Fault injection (train.debug_nonfinite_batches): the batch at one of `positions` of
  the data stream gets NaN images, as a corrupt batch would; others pass unchanged."""
  if positions and int(data_iter.get_state().get("next_index", 0)) - 1 in positions:
    host_batch = dict(host_batch, image=np.full_like(host_batch["image"], np.nan))
  return host_batch
