"""grain input pipelines: task mixture, shuffling, per-process sharding, batching.

Train (``split="train"``), an endless stream:

    for each enabled task t:   source -> shuffle(seed_t) -> repeat() -> random_map(task t)
    mix(tasks, weights) -> [process_index::process_count] -> batch(local) -> to_iter_dataset

* The *global* record stream does not depend on the number of processes: per-record
  randomness (language, noise spans, question) comes from grain's ``random_map``, which seeds
  a generator from ``(seed, position in the task's stream)``; process p of n then takes the
  global positions p, p+n, ... So within an epoch of a task the processes see disjoint
  examples that together cover it, and the pipeline is exactly reproducible from
  ``config.seed`` alone.
* Every stage is a ``grain.MapDataset`` (random access), so the iterator state is just a
  position: ``it.get_state()`` / ``it.set_state(state)`` resume bit-exactly, and grain's
  Orbax handler (``grain.checkpoint.CheckpointSave/CheckpointRestore``) checkpoints it:

      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(it)))
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_iter=grain.checkpoint.CheckpointRestore(it)))   # restores it in place

  The handler writes ``data_iter/process_<i>-of-<n>.json`` per process. Batch k of every
  process covers global records [k*B, (k+1)*B) (B = config.data.batch_size), so the state
  ``{"next_index": k}`` is the same on all processes and also valid for another process
  count with the same global batch size.

Eval (``split="validation"`` or ``"test"``), one finite pass: every eval example under every
enabled task, in order, with fixed per-record seeds. The last batch is filled with all-zero
rows whose ``tgt_weights`` are 0, so every batch has the same shape and every process yields
the same number of batches (multi-host jit needs both) while the padding adds no loss.

Config fields read: ``config.seed`` and ``config.data.{batch_size, src_len, tgt_len,
image_size, num_train_examples, num_eval_examples, task_weights, noise_density,
mean_noise_span_length}``; optional ``config.data.{read_threads (2), prefetch_batches (4)}``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import grain
import numpy as np

from m6_jax.data import synthetic, tasks

SPLITS = ("train", "validation", "test")


def _get(cfg, name: str, default: Any) -> Any:
  """``cfg.name`` or ``default`` when absent (works for ConfigDicts and plain objects)."""
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    return default


def _derive_seed(seed: int, *tags: int) -> int:
  """A 32-bit seed for one pipeline stage, derived from the run seed and stage tags."""
  return int(np.random.SeedSequence([int(seed), *tags]).generate_state(1)[0])


def task_weights(weights: Mapping[str, float]) -> list[tuple[str, float]]:
  """Enabled ``(task, weight)`` pairs in TASK_NAMES order; weight 0 disables a task."""
  weights = dict(weights)
  unknown = sorted(set(weights) - set(tasks.TASK_NAMES))
  if unknown:
    raise ValueError(
      f"config.data.task_weights has unknown task(s) {unknown}; valid "
      f"names are {list(tasks.TASK_NAMES)}"
    )
  for name, w in weights.items():
    if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
      raise ValueError(
        f"config.data.task_weights[{name!r}] must be a finite number >= 0, got {w!r}"
      )
  enabled = [(n, float(weights[n])) for n in tasks.TASK_NAMES if weights.get(n, 0) > 0]
  if not enabled:
    raise ValueError(
      f"config.data.task_weights enables no task (all weights are 0 or absent): {weights}"
    )
  return enabled


def task_config(data_cfg) -> tasks.TaskConfig:
  return tasks.TaskConfig(
    src_len=int(data_cfg.src_len),
    tgt_len=int(data_cfg.tgt_len),
    noise_density=float(data_cfg.noise_density),
    mean_noise_span_length=float(data_cfg.mean_noise_span_length),
  )


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"config.data.batch_size={global_batch_size} must be a positive "
      f"multiple of the number of processes ({process_count})"
    )
  return global_batch_size // process_count


class _TaskTransform:
  """``(example, rng) -> features`` for one task; a plain picklable object for grain."""

  def __init__(self, task_name: str, tokenizer, cfg: tasks.TaskConfig):
    self.task_name, self.tokenizer, self.cfg = task_name, tokenizer, cfg

  def __call__(self, example, rng: np.random.Generator):
    return tasks.TASKS[self.task_name](example, self.tokenizer, rng, self.cfg)


class _EvalRecord:
  """``(record index, rng) -> features``: record r is example r % N under task r // N.

  Records at or past ``num_records`` are padding rows (zero weights).
  """

  def __init__(self, source, task_names, tokenizer, cfg: tasks.TaskConfig):
    self.source, self.task_names = source, tuple(task_names)
    self.tokenizer, self.cfg = tokenizer, cfg
    self.num_records = len(source) * len(self.task_names)
    self.image_shape = (source.image_size, source.image_size, 3)

  def __call__(self, record: int, rng: np.random.Generator):
    if record >= self.num_records:
      return tasks.empty_features(self.image_shape, self.cfg)
    task, i = divmod(int(record), len(self.source))
    return tasks.TASKS[self.task_names[task]](self.source[i], self.tokenizer, rng, self.cfg)


def _process_index_and_count(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only when the caller did not say; keeps this module usable without jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  return int(process_index), int(process_count)


def make_map_dataset(
  config,
  tokenizer,
  split: str = "train",
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.MapDataset:
  """The batched, per-process ``grain.MapDataset`` behind ``make_dataset``."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
  process_index, process_count = _process_index_and_count(process_index, process_count)
  data = config.data
  seed = int(config.seed)
  batch = local_batch_size(int(data.batch_size), process_count)
  enabled = task_weights(data.task_weights)
  cfg = task_config(data)
  image_size = int(data.image_size)

  if split == "train":
    source = synthetic.SyntheticWorldSource(seed, "train", int(data.num_train_examples), image_size)
    streams = []
    for name, _ in enabled:
      t = tasks.TASK_NAMES.index(name)  # tag seeds by task id: stable if others change
      ds = grain.MapDataset.source(source).shuffle(seed=_derive_seed(seed, 1, t)).repeat()
      streams.append(
        ds.random_map(_TaskTransform(name, tokenizer, cfg), seed=_derive_seed(seed, 2, t))
      )
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [w for _, w in enabled])
    ds = ds[process_index::process_count]
    return ds.batch(batch, drop_remainder=True)

  source = synthetic.SyntheticWorldSource(seed, split, int(data.num_eval_examples), image_size)
  record_fn = _EvalRecord(source, [n for n, _ in enabled], tokenizer, cfg)
  # Pad the record count so that every process gets the same number of full batches.
  num_batches = math.ceil(record_fn.num_records / (batch * process_count))
  ds = grain.MapDataset.range(num_batches * batch * process_count)
  ds = ds.random_map(record_fn, seed=_derive_seed(seed, 3))
  ds = ds[process_index::process_count]
  return ds.batch(batch, drop_remainder=True)


def make_dataset(
  config,
  tokenizer,
  split: str = "train",
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """An ``IterDataset`` of batches (dicts of numpy arrays, leading dim = local batch).

  ``process_index`` / ``process_count`` default to ``jax.process_index()`` /
  ``jax.process_count()``. Elements are computed by ``config.data.read_threads`` threads
  (default 2) with ``config.data.prefetch_batches`` (default 4) batches read ahead; no
  worker processes.
  """
  ds = make_map_dataset(config, tokenizer, split, process_index, process_count)
  data = config.data
  read_options = grain.ReadOptions(
    num_threads=int(_get(data, "read_threads", 2)),
    prefetch_buffer_size=int(_get(data, "prefetch_batches", 4)),
  )
  return ds.to_iter_dataset(read_options)


def make_iterator(
  config,
  tokenizer,
  split: str = "train",
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """``iter(make_dataset(...))``: a ``grain.DatasetIterator`` with get_state/set_state."""
  return iter(make_dataset(config, tokenizer, split, process_index, process_count))
