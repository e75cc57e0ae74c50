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

Length bucketing (train only; ``config.data.length_bucket`` > 0, see m6_jax/config/defaults.py):

    ... mix(...) -> [window sort] -> [process_index::process_count] -> batch -> trim

* **trim** (``TrimBatch``): each local batch's ``src_tokens`` is cut to the smallest multiple
  of the bucket holding its longest real source (last non-pad column), and ``tgt_input /
  tgt_target / tgt_weights`` likewise for the target; at least one bucket, at most
  ``src_len`` / ``tgt_len``. Only columns that are padding in every row go, and the model
  keeps the padded batch's positions, so the batch means the same. Records, order and
  iterator state are those of the unbucketed pipeline.
* **window sort** (``config.data.bucket_window`` > 0, ``WindowSortDataset``): the global
  stream is cut into windows of ``bucket_window`` global batches; each window's records are
  sorted by (target, source) length in buckets, cut into global batches, and those batches
  shuffled (seed from ``config.seed`` and the window index). It runs before the per-process
  slice, so global batch k is the same records for every process count and processes still
  get disjoint rows that together cover it; it is a pure function of the index, so
  determinism and resumption hold as above. Cost: every process computes the features of
  every record of a window once more (to learn its length), not only its own rows.
* **several processes**: each process trims its own rows, so local shapes may differ; the
  train loop pads them to the largest over processes (``pad_to_common_lengths`` with
  ``process_allgather``) before building the global batch.

The eval split is never bucketed: its batches keep src_len x tgt_len (it runs rarely and
with fixed shapes needs one compilation).

Eval (``split="validation"``, ``"test"`` or the synthetic world's ``"unseen_combinations"``
and ``"drawings"``), one finite pass: every eval example under every
enabled task, in order, with fixed per-record seeds. The last batch is filled with all-zero
rows whose ``tgt_weights`` are 0, so every batch has the same shape and every process yields
the same number of batches (multi-host jit needs both) while the padding adds no loss.

Sources (``config.data.source``):

* ``"synthetic"`` (default): the embedded world; ``num_train_examples`` /
  ``num_eval_examples`` set the split sizes.
* ``"tfds"``: a dataset made by ``prepare.prepare_data`` (``--mode=prepare_data``), named
  ``config.data.tfds_name`` in ``config.data.data_dir`` (empty: TFDS's default). Train uses
  the whole train split (``num_train_examples`` is ignored); eval uses the first
  ``num_eval_examples`` records of the split (all if <= 0). Images are decoded with Pillow
  and resized to ``image_size``. A task only sees the records that have what it needs:
  caption tasks the records with a caption, ``vqa`` those with a question/answer (the
  record lists come from the dataset's metadata, so selecting costs no reading); a task
  with a positive weight but no such record is an error. Records keep fixed positions, so
  everything said above about determinism, sharding and iterator state holds unchanged.
* ``"shards"``: WebDataset / Parquet shards read in place (``data.shards``, ``data.eval_shards``;
  m6_jax/data/shard_source.py). Evaluation reads them as above; the train split is an
  IterDataset of its own (``make_stream_dataset``, m6_jax/data/streams.py): each process reads
  its own shards of every source (``data.shards`` may mix several by weight), bad records are
  dropped and counted before batching, and the batches become global arrays in the train
  loop as every source's do (``jax.make_array_from_process_local_data``).
* With ``config.data.image_codes_dir`` (written by ``--mode=encode_images``), every example
  of either source also carries ``image_codes`` int32 [h, w], its image's VQGAN code grid,
  by record index (m6_jax/data/image_codes.py checks that the codes fit the source).

Config fields read: ``config.seed``, ``config.model.vocab_size`` (where image code ids
start) and ``config.data.{batch_size, src_len, tgt_len, image_size, num_train_examples,
num_eval_examples, task_weights, noise_density, mean_noise_span_length}``; optional
``config.data.{read_threads (2), prefetch_batches (4), source ("synthetic"), tfds_name,
data_dir, length_bucket (0), bucket_window (0), guidance_drop_rate (0.1)}``.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Any, Callable, Mapping

import grain
import numpy as np

from m6_jax.data import drawings, image_codes, shard_source, splits, streams, synthetic, tasks

SPLITS = ("train", "validation", "test", synthetic.UNSEEN_SPLIT, drawings.SPLIT)


def _get(cfg, name: str, default: Any) -> Any:
  """``cfg.name`` or ``default`` when absent (works for ConfigDicts and plain objects)."""
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    return default


def derive_seed(seed: int, *tags: int) -> int:
  """A 32-bit seed for one pipeline stage, derived from the run seed and stage tags."""
  return int(np.random.SeedSequence([int(seed), *tags]).generate_state(1)[0])


def task_weights(weights: Mapping[str, float]) -> list[tuple[str, float]]:
  """Enabled ``(task, weight)`` pairs in TASK_NAMES order; weight 0 disables a task."""
  weights = dict(weights)
  unknown = sorted(set(weights) - set(tasks.names()))
  if unknown:
    raise ValueError(
      f"config.data.task_weights has unknown task(s) {unknown}; valid "
      f"names are {list(tasks.names())}"
    )
  for name, w in weights.items():
    if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
      raise ValueError(
        f"config.data.task_weights[{name!r}] must be a finite number >= 0, got {w!r}"
      )
  enabled = [(n, float(weights[n])) for n in tasks.names() if weights.get(n, 0) > 0]
  if not enabled:
    raise ValueError(
      f"config.data.task_weights enables no task (all weights are 0 or absent): {weights}"
    )
  return enabled


def task_config(data_cfg, vocab_size: int = 0) -> tasks.TaskConfig:
  """The task settings of a config's `data` section; `vocab_size` (model.vocab_size) is
  where the image codes' token ids start."""
  return tasks.TaskConfig(
    src_len=int(data_cfg.src_len),
    tgt_len=int(data_cfg.tgt_len),
    noise_density=float(data_cfg.noise_density),
    mean_noise_span_length=float(data_cfg.mean_noise_span_length),
    code_offset=int(vocab_size),
    guidance_drop_rate=float(_get(data_cfg, "guidance_drop_rate", tasks.GUIDANCE_DROP_RATE)),
    caption_prompt=str(_get(data_cfg, "caption_prompt", "")),
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
    return tasks.get(self.task_name).build(example, self.tokenizer, rng, self.cfg)


class _Subset:
  """The records ``indices`` of ``source``, as a grain random-access source."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
    self.image_size = source.image_size

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.source[int(self.indices[int(i)])]


class _EvalRecord:
  """``(record index, rng) -> features``: every task's records, task after task.

  Task t contributes the examples ``task_indices[t]`` (None: all of the source), so with
  N examples usable by every task record r is example r % N under task r // N. Records at
  or past ``num_records`` are padding rows (zero weights).
  """

  def __init__(self, source, task_names, tokenizer, cfg: tasks.TaskConfig, task_indices=None):
    self.source, self.task_names = source, tuple(task_names)
    self.tokenizer, self.cfg = tokenizer, cfg
    self.task_indices = list(task_indices or [None] * len(self.task_names))
    sizes = [len(source) if idx is None else len(idx) for idx in self.task_indices]
    self.offsets = np.cumsum([0] + sizes)
    self.num_records = int(self.offsets[-1])
    self.image_shape = (source.image_size, source.image_size, 3)

  def __call__(self, record: int, rng: np.random.Generator):
    if record >= self.num_records:
      return tasks.empty_features(self.image_shape, self.cfg)
    task = int(np.searchsorted(self.offsets, record, side="right")) - 1
    i = int(record) - int(self.offsets[task])
    idx = self.task_indices[task]
    example = self.source[i if idx is None else int(idx[i])]
    if example is None:  # a bad record of streamed shards (counted by the source)
      return tasks.empty_features(self.image_shape, self.cfg)
    return tasks.get(self.task_names[task]).build(example, self.tokenizer, rng, self.cfg)


def open_source(config, split: str, task_names) -> tuple[Any, list[np.ndarray | None]]:
  """The split's source (eval: a prepared dataset's first ``num_eval_examples`` records)
  with the code grids of ``data.image_codes_dir`` attached when set, and, per task, the
  indices of its usable examples (None: all)."""
  data = config.data
  max_records = None
  if split != "train" and int(data.num_eval_examples) > 0:
    max_records = int(data.num_eval_examples)
  source = splits.split_source(config, split, max_records)
  if _get(data, "image_codes_dir", ""):
    source = image_codes.with_codes(source, config, split)
  if _get(data, "source", "synthetic") == "synthetic":
    return source, [None] * len(task_names)
  indices = []
  for task in task_names:
    idx = source.task_indices(task)
    if len(idx) == 0:
      fields = " and ".join(tasks.get(task).needs)
      raise ValueError(
        f"task {task!r} has a positive weight but no record of {source!r} has a {fields}; "
        f"set config.data.task_weights.{task}=0 or prepare data with them"
      )
    indices.append(idx)
  return source, indices


# --------------------------------------------------------------------------------------
# Length bucketing
# --------------------------------------------------------------------------------------

TARGET_KEYS = ("tgt_input", "tgt_target", "tgt_weights")


def _used_columns(mask: np.ndarray) -> int:
  """1 + the last column (axis -1) where `mask` is true in any row; 0 if it is nowhere."""
  cols = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
  return int(cols[-1]) + 1 if len(cols) else 0


def text_lengths(features: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """(source, target) columns holding real content in an example or a batch: everything
  after them is padding in every row (source: token 0; target: token 0 and weight 0)."""
  target = (features["tgt_input"] != 0) | (features["tgt_target"] != 0)
  target = target | (features["tgt_weights"] != 0)
  return _used_columns(features["src_tokens"] != 0), _used_columns(target)


def bucketed_length(length: int, bucket: int, maximum: int) -> int:
  """The smallest multiple of `bucket` >= length, at least one bucket, at most `maximum`."""
  return min(max(bucket, -(-length // bucket) * bucket), maximum)


class TrimBatch:
  """Batch -> the same batch with the source and target columns cut to the smallest multiple
  of `bucket` holding its longest real source / target (only padding columns go)."""

  def __init__(self, bucket: int, src_len: int, tgt_len: int):
    self.bucket, self.src_len, self.tgt_len = int(bucket), int(src_len), int(tgt_len)

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    src, tgt = text_lengths(batch)
    src = bucketed_length(src, self.bucket, self.src_len)
    tgt = bucketed_length(tgt, self.bucket, self.tgt_len)
    out = dict(batch, src_tokens=batch["src_tokens"][:, :src])
    out.update({k: batch[k][:, :tgt] for k in TARGET_KEYS})
    return out


def pad_text(batch: Mapping[str, np.ndarray], src_len: int, tgt_len: int) -> dict[str, np.ndarray]:
  """The batch with its text right-padded (token 0, weight 0) to src_len / tgt_len columns."""

  def pad(x, length, key):
    if x.shape[1] > length:
      raise ValueError(f"{key} has {x.shape[1]} columns, more than the {length} to pad to")
    return np.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

  out = dict(batch, src_tokens=pad(batch["src_tokens"], src_len, "src_tokens"))
  out.update({k: pad(batch[k], tgt_len, k) for k in TARGET_KEYS})
  return out


def pad_to_common_lengths(
  batch: Mapping[str, np.ndarray], allgather: Callable[[np.ndarray], Any]
) -> dict[str, np.ndarray]:
  """Multi-host bucketing: every process pads its local batch to the longest text columns
  of any process, so that all feed the step the same shapes. `allgather(x)` returns the
  [2] int arrays of all processes stacked (jax.experimental.multihost_utils.process_allgather).
  """
  local = np.array([batch["src_tokens"].shape[1], batch["tgt_input"].shape[1]], np.int32)
  lengths = np.asarray(allgather(local)).reshape(-1, 2).max(axis=0)
  if (lengths == local).all():
    return dict(batch)
  return pad_text(batch, int(lengths[0]), int(lengths[1]))


class _Once:
  """A value computed by the first caller; concurrent callers wait for it."""

  def __init__(self):
    self.lock, self.value = threading.Lock(), None

  def get(self, compute: Callable[[], Any]) -> Any:
    with self.lock:
      if self.value is None:
        self.value = compute()
      return self.value


class WindowSortDataset(grain.MapDataset):
  """Records sorted by bucketed length within windows of `window_batches` global batches.

  Window w is the parent's records [w*W, (w+1)*W) with W = window_batches * global_batch:
  they are sorted by (target buckets, source buckets) (stable, so ties keep stream order),
  cut into global batches, and the batches of the window put in a random order drawn from
  (seed, w), so consecutive batches do not march from short to long. Element i is a pure
  function of i: random access, iterator state and resumption work as for the parent.

  Only the order is kept (a few windows' worth of ints); records are read from the parent
  again when asked for, so sorting costs one extra feature computation of every record of
  the window, per process.
  """

  _KEEP_WINDOWS = 8

  def __init__(self, parent, window_batches: int, global_batch: int, bucket: int, seed: int):
    super().__init__(parent)
    self.window_batches, self.global_batch = int(window_batches), int(global_batch)
    self.window = self.window_batches * self.global_batch
    self.bucket, self.seed = int(bucket), int(seed)
    self._lock = threading.Lock()
    self._orders: collections.OrderedDict[int, _Once] = collections.OrderedDict()

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"WindowSortDataset(window={self.window}, bucket={self.bucket})"

  def _compute_order(self, w: int) -> np.ndarray:
    start = w * self.window
    keys = np.array(
      [text_lengths(self._parent[start + i]) for i in range(self.window)], np.int64
    ).reshape(-1, 2)
    keys = -(-keys // self.bucket)  # lengths in buckets: ties are free to reorder
    order = np.lexsort((keys[:, 0], keys[:, 1]))  # by target, then source; stable
    batches = order.reshape(self.window_batches, self.global_batch)
    rng = np.random.default_rng([self.seed, w])
    return start + batches[rng.permutation(self.window_batches)].reshape(-1)

  def _order(self, w: int) -> np.ndarray:
    with self._lock:
      entry = self._orders.get(w)
      if entry is None:
        entry = self._orders[w] = _Once()
        while len(self._orders) > self._KEEP_WINDOWS:
          self._orders.popitem(last=False)
      else:
        self._orders.move_to_end(w)
    return entry.get(lambda: self._compute_order(w))

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    w, r = divmod(int(index), self.window)
    return self._parent[int(self._order(w)[r])]


def process_index_and_count(process_index, process_count) -> tuple[int, int]:
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
  """The batched, per-process ``grain.MapDataset`` behind ``make_dataset`` (not for the
  train split of streamed shards, which drops bad records before batching)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
  if split == "train" and _streamed(config):
    raise ValueError("the train split of streamed shards is an IterDataset: use make_dataset")
  process_index, process_count = process_index_and_count(process_index, process_count)
  data = config.data
  seed = int(config.seed)
  batch = local_batch_size(int(data.batch_size), process_count)
  enabled = task_weights(data.task_weights)
  cfg = task_config(data, int(_get(_get(config, "model", None), "vocab_size", 0)))

  task_names = [n for n, _ in enabled]
  source, task_indices = open_source(config, split, task_names)

  if split == "train":
    streams = []
    for name, idx in zip(task_names, task_indices):
      t = tasks.task_id(name)  # tag seeds by task id: stable if others change
      task_source = source if idx is None else _Subset(source, idx)
      ds = grain.MapDataset.source(task_source).shuffle(seed=derive_seed(seed, 1, t)).repeat()
      streams.append(
        ds.random_map(_TaskTransform(name, tokenizer, cfg), seed=derive_seed(seed, 2, t))
      )
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [w for _, w in enabled])
    bucket = int(_get(data, "length_bucket", 0))
    window = int(_get(data, "bucket_window", 0))
    if bucket > 0 and window > 0:
      # Before the per-process slice, so global batch k is the same records for any count.
      ds = WindowSortDataset(ds, window, int(data.batch_size), bucket, derive_seed(seed, 4))
    ds = ds[process_index::process_count]
    ds = ds.batch(batch, drop_remainder=True)
    if bucket > 0:
      ds = ds.map(TrimBatch(bucket, cfg.src_len, cfg.tgt_len))
    return ds

  record_fn = _EvalRecord(source, task_names, tokenizer, cfg, task_indices)
  # Pad the record count so that every process gets the same number of full batches.
  num_batches = math.ceil(record_fn.num_records / (batch * process_count))
  ds = grain.MapDataset.range(num_batches * batch * process_count)
  ds = ds.random_map(record_fn, seed=derive_seed(seed, 3))
  ds = ds[process_index::process_count]
  return ds.batch(batch, drop_remainder=True)


def _streamed(config) -> bool:
  return _get(config.data, "source", "synthetic") == "shards"


def _read_options(data) -> grain.ReadOptions:
  return grain.ReadOptions(
    num_threads=int(_get(data, "read_threads", 2)),
    prefetch_buffer_size=int(_get(data, "prefetch_batches", 4)),
  )


def _stream_tags(task: int, source: int, salt: int) -> tuple[int, ...]:
  # The first source of a first salt keeps the seeds of one-pattern runs: their checkpoints
  # resume unchanged.
  return (task,) if (source, salt) == (0, 0) else (task, source, salt)


def make_stream_dataset(
  config, tokenizer, process_index: int | None = None, process_count: int | None = None
) -> streams.ShardStreamDataset:
  """The train batches of streamed shards (m6_jax/data/streams.py): this process's shards of
  every source, a stream per source and task, mixed by weight, the records not trained on
  dropped and counted, batched."""
  process_index, process_count = process_index_and_count(process_index, process_count)
  data = config.data
  seed = int(config.seed)
  batch = local_batch_size(int(data.batch_size), process_count)
  enabled = task_weights(data.task_weights)
  cfg = task_config(data, int(_get(_get(config, "model", None), "vocab_size", 0)))
  opened = shard_source.open_train_sources(config, (process_index, process_count))
  buffer = int(_get(data, "shuffle_buffer", 1000))
  bucket = int(_get(data, "length_bucket", 0))
  source_total = sum(spec.weight for spec, _ in opened)
  infos = [
    streams.StreamInfo(spec.pattern, tuple(source.paths), name)
    for spec, source in opened
    for name, _ in enabled
  ]

  def build(salt: int, bad) -> streams.Built:
    orders, mixed, weights = [], [], []
    for s, (spec, source) in enumerate(opened):
      for name, weight in enabled:
        tags = _stream_tags(tasks.task_id(name), s, salt)
        order, ds = streams.task_stream(
          source, buffer, derive_seed(seed, 6, *tags), derive_seed(seed, 1, *tags)
        )
        transform = streams.StreamTask(name, tokenizer, cfg)
        mixed.append(ds.random_map(transform, seed=derive_seed(seed, 2, *tags)))
        orders.append(order)
        weights.append(spec.weight / source_total * weight)
    selection = streams.WeightedSelection(weights)
    ds = grain.MapDataset.select_from_datasets(mixed, selection)
    ds = streams.CountDropped(ds.to_iter_dataset(_read_options(data)), bad)
    batches = ds.batch(batch, drop_remainder=True)
    if bucket > 0:
      batches = batches.map(TrimBatch(bucket, cfg.src_len, cfg.tgt_len))
    return streams.Built(batches, orders, selection)

  # What the saved position depends on, besides the seeds: a change is logged on resume.
  sources = [
    dict(pattern=spec.pattern, weight=spec.weight, shards=len(source.paths), records=len(source))
    for spec, source in opened
  ]
  return streams.ShardStreamDataset(build, infos, sources, (process_index, process_count))


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
  worker processes. The train split of streamed shards: ``make_stream_dataset``.
  """
  if split == "train" and _streamed(config):
    return make_stream_dataset(config, tokenizer, process_index, process_count)
  ds = make_map_dataset(config, tokenizer, split, process_index, process_count)
  return ds.to_iter_dataset(_read_options(config.data))


def make_iterator(
  config,
  tokenizer,
  split: str = "train",
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """``iter(make_dataset(...))``: a ``grain.DatasetIterator`` with get_state/set_state."""
  return iter(make_dataset(config, tokenizer, split, process_index, process_count))
