"""Streamed shards (``data.source='shards'``): WebDataset tars or Parquet tables read in
place, as a grain random-access source, without ``--mode=prepare_data``.

At start-up every shard of this process is indexed once (``webdataset.index``: the member
headers of a tar; ``parquet_shards.footer``: a table's row groups), by at most
``INDEX_THREADS`` threads; record ``i`` is then the ``j``-th sample of shard ``s`` (shards in
sorted order), read with a positioned read per member or with its row group. So the
pipeline's MapDatasets, iterator state and resumption work as on a prepared dataset: a
position is a record index.

Record ``i`` becomes an example in ``synthetic.make_example``'s format
(``sources.record_to_example``: the caption in both languages, a question/answer pair as a
``qa`` entry, task modules' columns under their names) plus ``record_fields``: the record
fields it has, so that each task takes only the records it can use. A record that cannot feed
training is None, counted by reason in ``bad`` (``m6_jax.data.bad_records``); ``read`` gives
the train stream a ``Dropped`` instead, which the stream counts where it consumes it.

How the train split streams through them: ``m6_jax/data/streams.py``.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import io
import json
import threading
from typing import Any, Iterator

import numpy as np
from absl import logging
from PIL import Image

from m6_jax.data import fields, parquet_shards, shard_files, sources, tasks, webdataset
from m6_jax.data.bad_records import BadRecords, Dropped, Skip, dropped
from m6_jax.data.images import PILLOW_ERRORS
from m6_jax.errors import ConfigError, ImageError

INDEX_THREADS = 16


def _text(value: Any, what: str) -> str:
  if value is None:
    return ""
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise Skip("bad_text", f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
  return str(value).strip()


class ShardSource:
  """The records of a list of shards of one format (see the module docstring).

  ``image_column`` / ``text_column``: Parquet's (""; auto). ``max_image_pixels``: larger
  images are skipped (``oversized_image``). ``max_records``: only the first records."""

  def __init__(
    self,
    shards: shard_files.ShardList,
    image_size: int,
    *,
    image_column: str = "",
    text_column: str = "",
    max_image_pixels: int = 0,
    max_records: int | None = None,
  ):
    self.paths, self.format = shards.paths, shards.format
    self.image_size, self.max_image_pixels = int(image_size), int(max_image_pixels)
    self._columns = tuple(c for c in fields.columns() if c != "caption")
    workers = max(1, min(INDEX_THREADS, len(self.paths)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      if self.format == "webdataset":
        sizes = self._index_tars(pool)
      else:
        sizes = self._index_parquet(pool, image_column, text_column)
    self.offsets = np.cumsum([0] + sizes)
    total = int(self.offsets[-1])
    self.num_records = total if max_records is None else min(total, int(max_records))
    if self.num_records == 0:
      raise ConfigError(f"the shards {self.paths[0]}, ... hold no record; check the files.")
    self.bad = BadRecords()
    self._masks: dict[str, np.ndarray] | None = None
    self._masks_lock = threading.Lock()

  def _index_tars(self, pool) -> list[int]:
    self._tars = list(pool.map(webdataset.index, self.paths))
    for t in self._tars:
      if t.damaged:
        logging.warning("Shard %s is damaged (%s); its last sample is skipped.", t.path, t.damaged)
    self._reader: Any = webdataset.Reader()
    return [len(t.samples) for t in self._tars]

  def _index_parquet(self, pool, image_column: str, text_column: str) -> list[int]:
    footers = list(pool.map(parquet_shards.footer, self.paths))
    self._layout = parquet_shards.layout(
      self.paths[0],
      footers[0][0],
      image_column,
      text_column,
      self._columns,
      [names for names, _ in footers[1:]],
    )
    for path, (names, _) in zip(self.paths, footers):
      missing = [c for c in (self._layout.image, self._layout.text) if c not in names]
      if missing:
        raise ConfigError(
          f"Parquet shard {path} has no column {missing[0]!r} (its columns: {names}), "
          f"unlike {self.paths[0]}; the shards of one pattern must share their columns."
        )
    self._groups = [np.cumsum([0] + rows) for _, rows in footers]
    self._reader = parquet_shards.Reader(
      self._layout, {p: f[0] for p, f in zip(self.paths, footers)}
    )
    return [int(g[-1]) for g in self._groups]

  def __len__(self) -> int:
    return self.num_records

  @property
  def shard_sizes(self) -> np.ndarray:
    return np.diff(self.offsets)

  def locate(self, i: int) -> tuple[int, int]:
    """Record ``i`` -> (shard number, record number within it)."""
    s = bisect.bisect_right(self.offsets, i) - 1
    return s, i - int(self.offsets[s])

  def where(self, i: int) -> str:
    s, j = self.locate(i)
    return f"{self.paths[s]} record {j}"

  # -- reading -----------------------------------------------------------------------

  def _tar_record(self, s: int, j: int, with_image: bool) -> dict[str, Any]:
    sample = self._tars[s].samples[j]
    path = self.paths[s]
    if sample.truncated:
      raise Skip("truncated_tar", f"sample {sample.key} is cut off by the end of the file")
    texts: dict[str, Any] = {}
    if "json" in sample.members:
      try:
        meta = json.loads(self._reader.read(path, *sample.members["json"]))
      except (ValueError, UnicodeDecodeError) as e:
        raise Skip("bad_text", f"{sample.key}.json is not JSON ({e})") from None
      if not isinstance(meta, dict):
        raise Skip("bad_text", f"{sample.key}.json is not a JSON object")
      texts = {c: meta.get(c) for c in self._columns}
      texts["image_key"] = meta.get("image_key") or meta.get("url")
    if "txt" in sample.members:
      texts["caption"] = self._reader.read(path, *sample.members["txt"])
    image_key = str(texts.pop("image_key", None) or f"{path}:{sample.key}")
    record = {"id": sample.key, "image_key": image_key, **texts}
    if with_image:
      ext = next((e for e in webdataset.IMAGE_EXTENSIONS if e in sample.members), None)
      if ext is None:
        raise Skip("missing_image", f"sample {sample.key} has no image ({sorted(sample.members)})")
      record["image"] = self._reader.read(path, *sample.members[ext])
    return record

  def _parquet_record(self, s: int, j: int, with_image: bool) -> dict[str, Any]:
    groups = self._groups[s]
    g = bisect.bisect_right(groups, j) - 1
    row = self._reader.row(self.paths[s], g, j - int(groups[g]))
    lay = self._layout
    key = row.get(lay.key)
    key = str(j) if key is None else str(key)
    image_key = str(row.get(lay.image_key) or f"{self.paths[s]}:{key}")
    record = {"id": key, "image_key": image_key, "caption": row[lay.text]}
    record.update({c: row.get(c) for c in lay.extra})
    if with_image:
      image = parquet_shards.image_bytes(row[lay.image])
      if image is None:
        raise Skip("null_bytes", f"row {key} has null image bytes in column {lay.image!r}")
      record["image"] = image
    return record

  def record(self, i: int, with_image: bool = True) -> dict[str, Any]:
    """Record ``i``: id, image_key, the text of every registered column ("" when absent)
    and, ``with_image``, the encoded image; Skip when it is unusable."""
    i = int(i)
    if not 0 <= i < self.num_records:
      raise IndexError(f"index {i} out of range for {self!r}")
    s, j = self.locate(i)
    if self.format == "webdataset":
      record = self._tar_record(s, j, with_image)
    else:
      record = self._parquet_record(s, j, with_image)
    for column in fields.columns():
      record[column] = _text(record.get(column), column)
    if not any(field.present(record) for field in fields.all_fields()):
      raise Skip("missing_caption", f"record {record['id']} has no caption nor other text")
    return record

  def _check_size(self, data: bytes) -> None:
    if self.max_image_pixels <= 0:
      return
    try:
      with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
    except PILLOW_ERRORS:
      return  # the decoder says why
    if w * h > self.max_image_pixels:
      raise Skip(
        "oversized_image", f"{w}x{h} pixels > data.max_image_pixels={self.max_image_pixels}"
      )

  def read(self, i: int) -> dict[str, Any] | Dropped:
    """Example ``i`` with its ``record_fields``, or a ``Dropped`` saying why it is unusable
    (not counted: the train stream counts it where it consumes it)."""
    try:
      record = self.record(i)
      self._check_size(record["image"])
      try:
        example = sources.record_to_example(record, self.image_size, int(i))
      except (ImageError, Image.DecompressionBombError) as e:
        raise Skip("corrupt_image", str(e)) from None
    except Skip as skip:
      return dropped(skip, self.where(int(i)))
    example["record_fields"] = tuple(f.name for f in fields.all_fields() if f.present(record))
    return example

  def __getitem__(self, i: int) -> dict[str, Any] | None:
    """Example ``i``, or None for a bad record (counted in ``bad``)."""
    example = self.read(i)
    if isinstance(example, Dropped):
      self.bad.add(example.reason, example.example)
      return None
    self.bad.add("")
    return example

  def raw(self, i: int) -> dict[str, Any]:
    """Record ``i``'s id, image key and texts, no image ("" texts when it is unusable)."""
    try:
      return self.record(i, with_image=False)
    except Skip:
      s, j = self.locate(int(i))
      empty = {c: "" for c in fields.columns()}
      return {"id": f"{j}", "image_key": f"{self.paths[s]}:{j}", **empty}

  # -- which records have which fields (evaluation reads every record's texts once) --------

  def _field_masks(self) -> dict[str, np.ndarray]:
    with self._masks_lock:
      if self._masks is None:
        records = [self.raw(i) for i in range(self.num_records)]
        self._masks = {
          f.name: np.array([f.present(r) for r in records], bool) for f in fields.all_fields()
        }
      return self._masks

  def field_count(self, field: str) -> int:
    return int(self._field_masks()[field].sum())

  def task_indices(self, task_name: str) -> np.ndarray:
    masks = self._field_masks()
    needs = tasks.get(task_name).needs
    return np.flatnonzero(np.logical_and.reduce([masks[f] for f in needs]))

  def __repr__(self) -> str:
    return (
      f"ShardSource({len(self.paths)} {self.format} shards from {self.paths[0]!r}, "
      f"num_records={self.num_records}, image_size={self.image_size})"
    )


def _open(config, shards: shard_files.ShardList, max_records: int | None = None) -> ShardSource:
  d = config.data
  return ShardSource(
    shards,
    int(d.image_size),
    image_column=str(d.get("parquet_image_column", "")),
    text_column=str(d.get("parquet_text_column", "")),
    max_image_pixels=int(d.get("max_image_pixels", 0)),
    max_records=max_records,
  )


def open_train_sources(config, process=None) -> list[tuple[shard_files.Source, ShardSource]]:
  """Every source of ``data.shards`` with its ShardSource; ``process`` = (index, count) reads
  only that process's shards of each (every count-th)."""
  d = config.data
  out = []
  fmt = str(d.get("shard_format", "auto"))
  for spec, shards in shard_files.resolve_sources(str(d.shards), fmt):
    if process is not None:
      every = len(shards.paths)
      shards = shards.for_process(*process, spec.label)
      logging.info(
        "Process %d of %d streams %d of the %d shards of %s: %s",
        *process,
        len(shards.paths),
        every,
        spec.label,
        ", ".join(shards.paths[:3]) + (", ..." if len(shards.paths) > 3 else ""),
      )
    out.append((spec, _open(config, shards)))
  return out


def open_shards(config, split: str, max_records: int | None = None) -> ShardSource:
  """The ShardSource of ``data.eval_shards`` (validation, test) or of ``data.shards`` (train;
  one pattern: several are streamed only, ``open_train_sources``), all of their shards."""
  d = config.data
  key = "data.shards" if split == "train" else "data.eval_shards"
  pattern = str(d.get("shards" if split == "train" else "eval_shards", ""))
  if not pattern:
    raise ConfigError(
      f"data.source='shards' reads the {split} split from {key}, which is empty; set it to "
      "the shards' pattern, e.g. /data/wds/validation/*.tar."
    )
  if split == "train" and ";" in pattern:
    raise ConfigError(
      "data.shards names several sources, which training streams; this reads one pattern of "
      "the train split: name one in data.shards (or data.eval_shards)."
    )
  shards = shard_files.resolve(pattern, str(d.get("shard_format", "auto")), key)
  return _open(config, shards, max_records)


def iter_text(config) -> Iterator[str]:
  """Texts of about ``data.tokenizer_corpus_examples`` train records spread over every
  source's shards (the first records of each), for tokenizer training; no image is read."""
  opened = [source for _, source in open_train_sources(config)]
  want = int(config.data.tokenizer_corpus_examples)
  per_shard = max(1, -(-want // sum(len(source.paths) for source in opened)))
  for source in opened:
    for s, size in enumerate(source.shard_sizes):
      start = int(source.offsets[s])
      for i in range(start, min(start + min(int(size), per_shard), source.num_records)):
        record = source.raw(i)
        yield from (record[column] for column in fields.columns() if record[column])
