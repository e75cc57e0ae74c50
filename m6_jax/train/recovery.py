"""How a run recovers from a divergence (what counts as one: divergence.py), MaxText / PaLM
style.

The run rolls back to the newest *good* checkpoint (one that
`train.checkpoint_confirm_steps` finite steps followed: a checkpoint written while the run
was already drifting is never trusted), deletes the checkpoints and the metrics records after
it, skips the next `train.rollback_skip_batches` batches of its data stream (the batches that
led to the divergence, as PaLM does; each further rollback to the same step skips that many
more), multiplies the learning rate by `train.rollback_lr_factor` (a value in the optimizer
state, m6_jax/train/optim.py: nothing is rebuilt or compiled again), and continues. After
`train.max_rollbacks` rollbacks it stops with one error line, the newest good checkpoint
kept for a rerun with other settings.

    recovery = Recovery.start(ckpts, writer, config.train, state)
    ...after step `step` is dispatched:   recovery.confirm(booked=step - 1)
    ...after saving step `step`:          recovery.saved(step)
    ...on divergence.Diverged as event:   state, data_iter = recovery.roll_back(event, restart)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections
import numpy as np
from absl import logging

from m6_jax.errors import TrainingError
from m6_jax.train import optim
from m6_jax.train.divergence import Diverged


@dataclasses.dataclass
class Recovery:
  """The rollback state of one run (a rerun starts its count of rollbacks afresh)."""

  ckpts: Any  # the run's checkpoints.Checkpoints
  writer: Any  # the run's metrics_writer.MetricsWriter
  train: ml_collections.ConfigDict  # config.train
  lr_scale: float = 1.0  # the learning rate's scale now (each rollback multiplies it)
  rollbacks: int = 0  # in all
  repeats: dict[int, int] = dataclasses.field(default_factory=dict)  # to each step
  unconfirmed: list[int] = dataclasses.field(default_factory=list)  # saved, not yet good

  @classmethod
  def start(cls, ckpts, writer, train: ml_collections.ConfigDict, state: Any) -> Recovery:
    """For a run that starts from `state` (resumed, or fresh), with its learning-rate scale.
    The latest saved step is not trusted until this run confirms it (unless one did)."""
    # A replicated scalar: this process's copy (with several processes, not all are its).
    scale = float(np.asarray(optim.get_lr_scale(state.opt_state).addressable_data(0)))
    unconfirmed = [s for s in ckpts.steps()[-1:] if s not in ckpts.good_steps()]
    return cls(ckpts, writer, train, scale, unconfirmed=unconfirmed)

  def meta(self) -> dict[str, Any]:
    """What a checkpoint records of the recovery (for information; the state holds the
    learning-rate scale a resume uses)."""
    return {"lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

  def saved(self, step: int) -> None:
    """Step `step` was saved; it becomes good once enough finite steps follow it."""
    self.unconfirmed.append(step)

  def confirm(self, booked: int) -> None:
    """The steps up to `booked` were booked without a divergence: the saved steps
    `train.checkpoint_confirm_steps` (or more) before it are marked good."""
    confirm_steps = self.train.checkpoint_confirm_steps
    while self.unconfirmed and booked >= self.unconfirmed[0] + confirm_steps:
      self.ckpts.mark_good(self.unconfirmed.pop(0))

  def roll_back(self, event: Diverged, restart: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """After the divergence `event`: deletes the checkpoints and metrics records after the
    newest good step, restarts from it (`restart()` -> (state, data iterator): the loop's
    resume, which falls back to the initial state when no step is left), skips batches and
    lowers the learning rate. Returns the (state, data iterator) to continue with; raises
    TrainingError once `train.max_rollbacks` rollbacks are used up."""
    t = self.train
    self.rollbacks += 1
    self._discard_after_good(event)
    state, data_iter = restart()
    step = int(state.step)
    self.repeats[step] = self.repeats.get(step, 0) + 1
    skipped = skip_batches(data_iter, t.rollback_skip_batches * self.repeats[step])
    # Whatever scale the restored step was saved with: this run's cuts so far, and one more.
    self.lr_scale *= t.rollback_lr_factor
    state = state.replace(opt_state=optim.set_lr_scale(state.opt_state, self.lr_scale))
    self.unconfirmed = []  # the restored step is good (or the initial state)
    self._report(event, step, skipped)
    return state, data_iter

  def _discard_after_good(self, event: Diverged) -> None:
    """Deletes the checkpoints after the newest good one and the metrics after it; raises
    TrainingError once the rollbacks are used up."""
    good_steps = self.ckpts.good_steps()
    good = good_steps[-1] if good_steps else None
    dropped = self.ckpts.discard_after(good)
    if dropped:
      logging.warning("Deleted the checkpoints after the newest good one: steps %s.", dropped)
    self.writer.truncate(good if good is not None else 0)
    if self.rollbacks > self.train.max_rollbacks:
      lr = float(self.train.lr) * self.lr_scale
      raise TrainingError(stop_message(event, self.rollbacks, good, lr, self.ckpts.directory))

  def _report(self, event: Diverged, step: int, skipped: tuple[int, int]) -> None:
    """One warning line and one `metrics.jsonl` event record for a rollback to `step`."""
    self.writer.write_event(
      step,
      dict(
        event="rollback",
        rollback=self.rollbacks,
        diverged_at=event.step,
        reason=event.reason,
        skipped_batches=list(skipped),
        lr_scale=self.lr_scale,
      ),
    )
    logging.warning(
      "Diverged at %s. Rolled back to step %d (rollback %d of at most %d), skipped batches "
      "%d-%d of the data stream, learning rate x%g.",
      event,
      step,
      self.rollbacks,
      self.train.max_rollbacks,
      skipped[0],
      skipped[1] - 1,
      self.lr_scale,
    )


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


def skip_batches(data_iter, count: int) -> tuple[int, int]:
  """Advances the data stream past `count` batches; returns their [first, end) positions."""
  first = int(data_iter.get_state().get("next_index", 0))
  for _ in range(count):
    next(data_iter)
  return first, first + count
