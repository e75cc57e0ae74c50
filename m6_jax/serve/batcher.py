"""Dynamic batching: work items wait in a queue, and worker threads run them together.

    batcher = Batcher(run, max_batch=16, max_wait_s=0.005)
    future = batcher.submit(key, payload)      # a concurrent.futures.Future of its result

Items with the same `key` (what must be equal for rows to share one compiled call: the
decoding options) can share a batch. The worker takes the group of the oldest waiting item
and runs it once `max_batch` items of that group wait or the oldest has waited `max_wait_s`,
calling `run(key, payloads) -> results` (one result per payload, in order). While a batch
runs, new items queue up, so under load batches fill without waiting. An item whose future
was cancelled before its batch started (its client went away) is dropped. `workers` threads
take batches, so that one batch can run while another does; `lock` (a lock, or a semaphore
of as many slots as batches may run at once) is held around each call to `run` and shared
by the batchers of one device.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable, Hashable, Sequence


@dataclasses.dataclass
class _Item:
  key: Hashable
  payload: Any
  future: concurrent.futures.Future
  arrived: float


class Closed(RuntimeError):
  """The batcher takes no new items (the server is shutting down)."""


class Batcher:
  def __init__(
    self,
    run: Callable[[Hashable, list[Any]], Sequence[Any]],
    max_batch: int,
    max_wait_s: float,
    lock: threading.Lock | threading.Semaphore | None = None,
    name: str = "batcher",
    workers: int = 1,
  ):
    if max_batch < 1 or max_wait_s < 0 or workers < 1:
      raise ValueError(
        f"need max_batch >= 1, max_wait_s >= 0 and workers >= 1, got {max_batch}, "
        f"{max_wait_s}, {workers}"
      )
    self._run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
    self._lock = lock or threading.Lock()
    self._cond = threading.Condition()
    self._waiting: list[_Item] = []
    self._closed = False
    self.batch_sizes: collections.Counter[int] = collections.Counter()  # size -> batches run
    self._threads = [
      threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(workers)
    ]
    for thread in self._threads:
      thread.start()

  def submit(self, key: Hashable, payload: Any) -> concurrent.futures.Future:
    item = _Item(key, payload, concurrent.futures.Future(), time.monotonic())
    with self._cond:
      if self._closed:
        raise Closed("the server is shutting down")
      self._waiting.append(item)
      self._cond.notify()
    return item.future

  @property
  def pending(self) -> int:
    with self._cond:
      return len(self._waiting)

  def _next_batch(self) -> list[_Item] | None:
    """The next batch to run (None: closed and nothing waits)."""
    with self._cond:
      while True:
        if not self._waiting:
          if self._closed:
            return None
          self._cond.wait()
          continue
        first = self._waiting[0]
        group = [i for i in self._waiting if i.key == first.key][: self.max_batch]
        wait = first.arrived + self.max_wait_s - time.monotonic()
        if len(group) >= self.max_batch or wait <= 0 or self._closed:
          taken = {id(i) for i in group}
          self._waiting = [i for i in self._waiting if id(i) not in taken]
          return group
        self._cond.wait(wait)

  def _loop(self) -> None:
    while (batch := self._next_batch()) is not None:
      live = [i for i in batch if i.future.set_running_or_notify_cancel()]
      if not live:
        continue
      try:
        with self._lock:
          results = self._run(live[0].key, [i.payload for i in live])
      except BaseException as e:  # the requests get the error; the worker goes on
        for item in live:
          item.future.set_exception(e)
        continue
      with self._cond:
        self.batch_sizes[len(live)] += 1
      for item, result in zip(live, results):
        item.future.set_result(result)

  def close(self, timeout: float | None = None) -> None:
    """Takes no new items, runs those waiting, and stops the workers."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    deadline = None if timeout is None else time.monotonic() + timeout
    for thread in self._threads:
      thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
