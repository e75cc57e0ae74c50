"""The train split of streamed shards (``data.source='shards'``) as a grain pipeline:

    for each source s of data.shards (a pattern and its weight w_s), this process's shards:
      for each enabled task t (weight w_t):
        ShardSource_s -> ShardOrder(seed_st) -> window shuffle(data.shuffle_buffer) -> task t
    select(streams, WeightedSelection(w_s * w_t)) -> to_iter_dataset(data.read_threads threads)
      -> count and drop the records not trained on -> batch(local)

* **Per process**: each process reads its own shards of every source (every n-th of the
  sorted list), so the stream of one process depends on the process count.
* **Order**: ``ShardOrder`` visits the shards of an epoch in a random order drawn from
  ``(seed, epoch)``, each shard's records in file order (a tar is read front to back, a
  Parquet row group once), and a window shuffle of ``data.shuffle_buffer`` records mixes
  records of neighbouring shards. A source's share of the records is its weight (normalised),
  a task's its weight times the share of records it can use.
* **State**: every stage before ``to_iter_dataset`` is a MapDataset, a pure function of the
  index, so shard, offset within it, shuffle window and mixture turn are all one position
  (``next_index``). The saved state adds what that position depends on and the counts:
  ``salt`` (seeds of a reshuffle), ``process``, ``sources`` (patterns, weights, shards and
  records of this process: a change is logged), ``bad_records`` (the counts, which a resume
  keeps) and, for people, ``position``: each stream's next record (epoch, shard, record).
  On another process count (``adopt_states``) the shards are dealt anew: see the method.
* **Threads**: ``data.read_threads`` read and decode for all sources and tasks together;
  shard indexing at start-up uses at most ``shard_source.INDEX_THREADS`` at a time.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Callable

import grain
import numpy as np
from absl import logging

from m6_jax.data import tasks
from m6_jax.data.bad_records import BadRecords, Dropped
from m6_jax.errors import BadDataError

# The records in a row that may feed no batch before the stream gives up (every record bad,
# or none with the fields the enabled tasks need): an error instead of a silent hang.
MAX_DROPPED_IN_A_ROW = 10_000


class WeightedSelection(grain.transforms.DatasetSelectionMap):
  """Element k of a mixture of endless streams -> (stream, index in it), as grain's
  ``MapDataset.mix`` interleaves them (the same integer proportions and turns), with
  ``counts(k)``: how many elements of each stream come before k."""

  def __init__(self, weights):
    scale = 100 / min(weights)
    self.proportions = tuple(int(w * scale) for w in weights)

  def __len__(self) -> int:
    return sys.maxsize

  def counts(self, k: int) -> list[int]:
    remaining, current, out = sum(self.proportions), int(k), []
    for p in self.proportions:
      rest = current * (remaining - p) // remaining
      out.append(current - rest)
      current, remaining = rest, remaining - p
    return out

  def __getitem__(self, k: int) -> tuple[int, int]:
    before, after = self.counts(k), self.counts(k + 1)
    i = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
    return i, before[i]


class ShardOrder(grain.MapDataset):
  """An endless stream of a ShardSource's records: epoch ``e`` visits the shards in a random
  order drawn from ``(seed, e)``, each shard's records in file order. Element ``k`` is a
  pure function of ``k``: random access and iterator state as for any MapDataset."""

  def __init__(self, parent: grain.MapDataset, shard_sizes, seed: int):
    super().__init__(parent)
    self.sizes = np.asarray(shard_sizes, np.int64)
    self.starts = np.cumsum(np.concatenate([[0], self.sizes]))[:-1]
    self.total = int(self.sizes.sum())
    self.seed = int(seed)
    self._lock = threading.Lock()
    self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"ShardOrder(shards={len(self.sizes)}, records={self.total})"

  def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
    with self._lock:
      if e not in self._epochs:
        order = np.random.default_rng([self.seed, e]).permutation(len(self.sizes))
        ends = np.cumsum(self.sizes[order])
        self._epochs[e] = (order, ends)
        for old in [k for k in self._epochs if k < e - 1]:
          del self._epochs[old]
      return self._epochs[e]

  def where(self, index: int) -> tuple[int, int, int]:
    """Element ``index`` -> (epoch, shard number, record number within the shard)."""
    e, r = divmod(int(index), self.total)
    order, ends = self._epoch(e)
    k = int(np.searchsorted(ends, r, side="right"))
    return e, int(order[k]), r - (int(ends[k - 1]) if k else 0)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    _, shard, record = self.where(index)
    return self._parent[int(self.starts[shard]) + record]


class Reads:
  """A ShardSource as a grain source whose bad records come out as ``Dropped`` (uncounted)."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int):
    return self.source.read(i)


class StreamTask:
  """``(example or Dropped, rng) -> features or Dropped``: task ``task_name`` on the records
  that have the fields it needs; a plain picklable object for grain."""

  def __init__(self, task_name: str, tokenizer, cfg: tasks.TaskConfig):
    self.task_name, self.tokenizer, self.cfg = task_name, tokenizer, cfg
    self.needs = set(tasks.get(task_name).needs)

  def __call__(self, example, rng: np.random.Generator):
    if isinstance(example, Dropped):
      return example
    if not self.needs <= set(example["record_fields"]):
      return Dropped()
    return tasks.get(self.task_name).build(example, self.tokenizer, rng, self.cfg)


def task_stream(source, shuffle_buffer: int, order_seed: int, shuffle_seed: int):
  """The endless record stream of one source for one task: shard order, window shuffle."""
  order = ShardOrder(grain.MapDataset.source(Reads(source)), source.shard_sizes, order_seed)
  if shuffle_buffer > 1:
    return order, grain.experimental.WindowShuffleMapDataset(
      order, window_size=int(shuffle_buffer), seed=shuffle_seed
    )
  return order, order


class _CountDropped(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, bad: BadRecords):
    super().__init__(parent)
    self.bad = bad

  def __next__(self):
    for _ in range(MAX_DROPPED_IN_A_ROW):
      element = next(self._parent)
      if not isinstance(element, Dropped):
        self.bad.add("")
        return element
      self.bad.add(element.reason, element.example)
    raise BadDataError(
      f"{MAX_DROPPED_IN_A_ROW:,} shard records in a row fed no task ("
      f"{self.bad.summary() or 'none of them bad'}): the records of data.shards lack what the "
      "enabled tasks need (a caption, a question/answer) or are bad; check data.shards and "
      "data.task_weights."
    )

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class CountDropped(grain.IterDataset):
  """Drops the ``Dropped`` elements, counting every element in ``bad`` as it is consumed."""

  def __init__(self, parent: grain.IterDataset, bad: BadRecords):
    super().__init__(parent)
    self.bad = bad

  def __iter__(self) -> grain.DatasetIterator:
    return _CountDropped(self._parent.__iter__(), self.bad)

  def __str__(self) -> str:
    return "CountDropped"


@dataclasses.dataclass
class Built:
  """The batches of one salt, with what positions are computed from."""

  batches: grain.IterDataset
  orders: list[ShardOrder]  # each stream's, in the selection's order
  selection: WeightedSelection


@dataclasses.dataclass(frozen=True)
class StreamInfo:
  """One (source, task) stream: how the saved state names it."""

  source: str  # the pattern
  paths: tuple[str, ...]  # this process's shards of it
  task: str


class ShardStreamDataset(grain.IterDataset):
  """The train batches of streamed shards: ``build(salt, bad)`` makes them; iterators carry
  ``bad_records`` (the train loop reports them) and save the state the module docstring
  describes."""

  def __init__(
    self,
    build: Callable[[int, BadRecords], Built],
    streams: list[StreamInfo],
    sources: list[dict],
    process: tuple[int, int],
  ):
    super().__init__()
    self.build, self.streams, self.sources = build, streams, sources
    self.process = tuple(process)

  def __iter__(self) -> ShardStreamIterator:
    return ShardStreamIterator(self)

  def __str__(self) -> str:
    return f"ShardStreamDataset({len(self.streams)} streams)"


class ShardStreamIterator(grain.DatasetIterator):
  """See ShardStreamDataset; ``bad_records``: the counts of this process's stream."""

  def __init__(self, dataset: ShardStreamDataset):
    self.dataset = dataset
    self.bad_records = BadRecords()
    self._start(0)

  def _start(self, salt: int) -> None:
    if getattr(self, "_built", None) is not None:
      self._parent.close()  # the streams of the previous salt, and their reading threads
    self.salt = int(salt)
    self._built = self.dataset.build(self.salt, self.bad_records)
    super().__init__(self._built.batches.__iter__())

  def __next__(self):
    return next(self._parent)

  def position(self, next_index: int) -> list[dict]:
    """Each stream's next record in shard order (the window shuffle draws around it)."""
    out = []
    counts = self._built.selection.counts(next_index)
    for info, order, count in zip(self.dataset.streams, self._built.orders, counts):
      epoch, shard, record = order.where(count)
      where = {"epoch": epoch, "shard": info.paths[shard], "record": record}
      out.append({"source": info.source, "task": info.task, "records": count, **where})
    return out

  def get_state(self) -> dict:
    state = dict(self._parent.get_state())
    state.update(
      salt=self.salt,
      process=list(self.dataset.process),
      sources=self.dataset.sources,
      bad_records=self.bad_records.state(),
      position=self.position(int(state["next_index"])),
    )
    return state

  def set_state(self, state: dict) -> None:
    if int(state.get("salt", 0)) != self.salt:
      self._start(int(state.get("salt", 0)))
    saved = state.get("sources")
    if saved is not None and saved != self.dataset.sources:
      logging.warning(
        "The shards or weights of data.shards changed since the checkpoint (then %s, now %s); "
        "the stream goes on from the same position of the new ones, so some records may "
        "repeat or be skipped in this epoch.",
        saved,
        self.dataset.sources,
      )
    self._parent.set_state({"next_index": int(state["next_index"])})
    self.bad_records.load(state.get("bad_records"))

  def adopt_states(self, states: list[dict], index: int, count: int) -> tuple[dict, str]:
    """The state to resume from when ``states`` (one per process) were saved by another
    number of processes: the shards are dealt anew (every ``count``-th), so no saved position
    fits them; every stream starts afresh in an order no earlier salt drew (records of the
    epoch under way may come again, others wait for the next epoch). The bad-record counts
    of old process i go to process i % count, so the job's totals carry over."""
    salt = 1 + max(int(s.get("salt", 0)) for s in states)
    mine = [s.get("bad_records") or {} for i, s in enumerate(states) if i % count == index]
    state = {"next_index": 0, "salt": salt, "bad_records": BadRecords.merged(mine)}
    note = (
      "the shards are dealt anew over the processes, so each process's streams start afresh "
      f"in a new order (salt {salt}); the model, optimizer, step and bad-record totals carry over"
    )
    return state, note
