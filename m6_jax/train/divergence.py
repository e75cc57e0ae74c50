"""Divergence: what counts as one, and how a run recovers (MaxText / PaLM style).

Each step's update is applied only when its loss, gradients, new parameters and optimizer
state are all finite (m6_jax/train/step.py), so no state, and no checkpoint, ever holds a
non-finite array. The loop then watches the per-step losses (`Monitor`):

- more than `train.max_nan_steps` non-finite steps in a row, or
- a loss above `train.spike_factor` x the median of the last `train.spike_window` losses
  and above it by more than `train.spike_min_increase` (a near-zero loss, e.g. of a model
  that has learned its captions by heart, moves by large factors without diverging)

is a divergence. The run rolls back to the newest *good* checkpoint (one that
`train.checkpoint_confirm_steps` finite steps followed: a checkpoint written while the run
was already drifting is never trusted), deletes the checkpoints after it, skips the next
`train.rollback_skip_batches` batches of its data stream (the batches that led to the
divergence, as PaLM does), multiplies the learning rate by `train.rollback_lr_factor`, and
continues. After `train.max_rollbacks` rollbacks it stops with one error line, the newest
good checkpoint kept for a rerun with other settings.
"""

from __future__ import annotations

import collections
import dataclasses

import ml_collections
import numpy as np
from absl import logging

from m6_jax.errors import TrainingError


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


def scaled_lr_config(
  config: ml_collections.ConfigDict, lr_scale: float
) -> ml_collections.ConfigDict:
  """`config` with train.lr multiplied by `lr_scale` (the rollbacks' learning-rate cuts)."""
  if lr_scale == 1.0:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.lr = float(config.train.lr) * lr_scale
  return config


def stop_message(event: Diverged, rollbacks: int, good_step: int | None, lr: float, where: str):
  kept = (
    f"the newest good checkpoint (step {good_step}) is kept in {where}; rerun to resume from it"
    if good_step is not None
    else "no checkpoint was confirmed good, so a rerun starts afresh"
  )
  return (
    f"training diverged at {event} and had already rolled back {rollbacks - 1} time(s) "
    f"(train.max_rollbacks={rollbacks - 1}); {kept}, with a lower train.lr (it was {lr:g}), "
    "a longer train.warmup_steps or a larger train.rollback_skip_batches."
  )


def roll_back_checkpoints(event, ckpts, writer, rollbacks: int, t, lr_scale: float) -> int | None:
  """Deletes the checkpoints after the newest good one and the metrics after it; raises
  TrainingError once the rollbacks are used up. Returns the good step (None: none)."""
  good_steps = ckpts.good_steps()
  good = good_steps[-1] if good_steps else None
  dropped = ckpts.discard_after(good)
  if dropped:
    logging.warning("Deleted the checkpoints after the newest good one: steps %s.", dropped)
  writer.truncate(good if good is not None else 0)
  if rollbacks > t.max_rollbacks:
    raise TrainingError(
      stop_message(event, rollbacks, good, float(t.lr) * lr_scale, ckpts.directory)
    )
  return good


def skip_batches(data_iter, count: int) -> tuple[int, int]:
  """Advances the data stream past `count` batches; returns their [first, end) positions."""
  first = int(data_iter.get_state().get("next_index", 0))
  for _ in range(count):
    next(data_iter)
  return first, first + count


def report(event, writer, step: int, rollbacks: int, max_rollbacks: int, skipped, lr_scale):
  """One warning line and one `metrics.jsonl` event record for a rollback to `step`."""
  writer.write_event(
    step,
    dict(
      event="rollback",
      rollback=rollbacks,
      diverged_at=event.step,
      reason=event.reason,
      skipped_batches=list(skipped),
      lr_scale=lr_scale,
    ),
  )
  logging.warning(
    "Diverged at %s. Rolled back to step %d (rollback %d of at most %d), skipped batches "
    "%d-%d of the data stream, learning rate x%g.",
    event,
    step,
    rollbacks,
    max_rollbacks,
    skipped[0],
    skipped[1] - 1,
    lr_scale,
  )
