"""The train split of streamed shards (``data.source='shards'``) as a grain pipeline:

    for each enabled task t:
      ShardSource -> ShardOrder(seed_t) -> window shuffle(data.shuffle_buffer) -> task t
    mix(tasks, weights) -> to_iter_dataset (data.read_threads threads) -> batch(local)

* **Per process**: each process reads its own shards (every n-th of the sorted list), so the
  stream of one process depends on the process count; a run resumes on the same count.
* **Order**: ``ShardOrder`` visits the shards of an epoch in a random order drawn from
  ``(seed, epoch)``, each shard's records in file order (a tar is read front to back, a
  Parquet row group once), and a window shuffle of ``data.shuffle_buffer`` records mixes
  records of neighbouring shards; every stage is a MapDataset, so the iterator's state is one
  position, checkpointed like the prepared path's.
* **Tasks**: a task takes the records that have every field it needs (``record_fields``);
  a bad record (None from the source, counted by reason) and a record a task cannot use are
  dropped before batching, so a task's share of the batches is its weight times the share
  of records it can use. Threads: ``data.read_threads``, however many tasks are mixed.
"""

from __future__ import annotations

import sys
import threading

import grain
import numpy as np

from m6_jax.data import tasks
from m6_jax.data.bad_records import BadRecords


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

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    e, r = divmod(int(index), self.total)
    order, ends = self._epoch(e)
    k = int(np.searchsorted(ends, r, side="right"))
    before = int(ends[k - 1]) if k else 0
    return self._parent[int(self.starts[order[k]]) + r - before]


class StreamTask:
  """``(example or None, rng) -> features or None``: task ``task_name`` on the records that
  have the fields it needs; a plain picklable object for grain."""

  def __init__(self, task_name: str, tokenizer, cfg: tasks.TaskConfig):
    self.task_name, self.tokenizer, self.cfg = task_name, tokenizer, cfg
    self.needs = set(tasks.get(task_name).needs)

  def __call__(self, example, rng: np.random.Generator):
    if example is None or not self.needs <= set(example["record_fields"]):
      return None
    return tasks.get(self.task_name).build(example, self.tokenizer, rng, self.cfg)


def task_stream(source, shuffle_buffer: int, order_seed: int, shuffle_seed: int):
  """The endless record stream of one task: shard order, then a window shuffle."""
  ds = ShardOrder(grain.MapDataset.source(source), source.shard_sizes, order_seed)
  if shuffle_buffer > 1:
    ds = grain.experimental.WindowShuffleMapDataset(
      ds, window_size=int(shuffle_buffer), seed=shuffle_seed
    )
  return ds


class _Counting(grain.DatasetIterator):
  """The batches of a stream, with its source's bad-record counts (``bad_records``)."""

  def __init__(self, parent: grain.DatasetIterator, bad_records: BadRecords):
    super().__init__(parent)
    self.bad_records = bad_records

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class CountedDataset(grain.IterDataset):
  """An IterDataset whose iterators carry ``bad_records`` (the train loop reports them)."""

  def __init__(self, parent: grain.IterDataset, bad_records: BadRecords):
    super().__init__(parent)
    self.bad_records = bad_records

  def __iter__(self) -> grain.DatasetIterator:
    return _Counting(self._parent.__iter__(), self.bad_records)

  def __str__(self) -> str:
    return "CountedDataset"
