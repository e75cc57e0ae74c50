"""Preemption: SIGTERM (how clusters announce it) and Ctrl-C end a run cleanly after the step."""

from __future__ import annotations

import signal
from typing import Callable

from absl import logging

from m6_jax.parallel import multihost


class PreemptionFlag:
  """SIGTERM (how clusters announce preemption) and Ctrl-C (SIGINT) make the loop finish the
  step, save and exit cleanly; a second Ctrl-C stops at once (KeyboardInterrupt) while there
  is something left to stop, and is ignored once the loop has ended (`ended`: its last state
  is saved, and the process is only exiting).

  One process: our handler sets `requested`. Several processes: JAX's preemption service
  (started by jax.distributed) catches SIGTERM on any of them and all processes agree on the
  step to stop at (`multihost.preemption_sync_point`); our handler would replace JAX's, so
  none is installed then (and Ctrl-C keeps Python's default).
  """

  def __init__(self):
    self.requested = False
    self.ended = False
    self._told_ended = False

  def stop_at(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    return self.requested or multihost.preemption_sync_point(step)

  def end(self) -> None:
    """The loop has ended with its state saved: from now on a signal has nothing to stop."""
    self.ended = True

  def install(self) -> Callable[[], None]:
    """Installs the handlers; returns the function that puts the previous ones back."""
    if multihost.uses_preemption_service():
      return lambda: None
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
      name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
      if self.ended:
        if not self._told_ended:  # once: a user may press Ctrl-C many times while it exits
          self._told_ended = True
          logging.warning("%s received: the run has already saved its state; exiting.", name)
        return
      if signum == signal.SIGINT and self.requested:
        raise KeyboardInterrupt("a second Ctrl-C: stopped without saving")
      logging.warning(
        "%s received: saving a checkpoint at the end of this step%s.",
        name,
        "; Ctrl-C again stops at once, without saving" if signum == signal.SIGINT else "",
      )
      self.requested = True

    try:
      for s in signals:
        signal.signal(s, handler)
    except ValueError:  # not the main thread (e.g. inside a notebook worker)
      return lambda: None

    def restore() -> None:
      for s, h in previous.items():
        signal.signal(s, h)

    return restore
