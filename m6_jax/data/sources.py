"""The prepared user dataset: its TFDS definition, and reading it back for the pipeline.

``m6_jax.data.prepare.prepare_data`` (``--mode=prepare_data``) converts user files into a TFDS
dataset at ``<output_dir>/<name>/1.0.0/``: array_record shards plus TFDS's
``dataset_info.json`` / ``features.json`` / ``metadata.json``; this module defines that
dataset (features, builder class, version, metadata entry) and reads it. TensorFlow is not
needed, to write or to read: images are stored as encoded bytes and decoded with Pillow. Read
it back with ``open_builder(data_dir, name)`` (or ``tfds.builder(name, data_dir=...)`` /
``tfds.builder_from_directory``) and ``builder.as_data_source(split)``; ``PreparedSource``
wraps that as a grain data source of examples in the synthetic world's format.

Stored per record (TFDS features; all Text features read back as UTF-8 bytes)
  id, image_key (the path / image id), the text columns of every registered record field
  (``m6_jax.data.fields``: caption, question, answer, then those of task modules' fields;
  ``""`` when absent), and image: encoded bytes. JPEG and PNG files whose longer side is at most ``max_image_size``
  are stored byte for byte; anything else (other formats, larger images, animations) is
  EXIF-rotated, converted to RGB, shrunk to that longer side and re-encoded: PNG stays PNG,
  everything else becomes JPEG (quality 95). Records keep their input order
  (``disable_shuffling``; grain shuffles at training time), and ``metadata.json`` holds, per
  split, which records have each field (``has_caption``, ``has_qa``, ``has_<field>``: the
  pipeline uses them to pick each task's records without reading the data) and the
  rejection counts. A dataset prepared before a field was registered has no column and no
  mask for it: none of its records has the field.
"""

from __future__ import annotations

import base64
import os
import re
import types
from typing import Any, Iterator, Mapping

import numpy as np

from m6_jax.data import fields, images, tasks

VERSION = "1.0.0"
METADATA_KEY = "m6_user_data"  # our entry in the dataset's metadata.json
FORMAT_VERSION = 1


def mask_key(field: str) -> str:
  """The metadata entry of a split's mask of the records that have ``field``."""
  return f"has_{field}"


# --------------------------------------------------------------------------------------
# The dataset definition (shared with m6_jax.data.prepare, which writes it)
# --------------------------------------------------------------------------------------


def features():
  """The TFDS features of a stored record."""
  import tensorflow_datasets as tfds

  text = tfds.features.Text
  return tfds.features.FeaturesDict(
    {
      "id": text(),
      "image_key": text(),
      # Encoded JPEG/PNG bytes; tfds.features.Image would need TensorFlow to encode.
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      **{column: text() for column in fields.columns()},
    }
  )


def builder_class(name: str):
  """A GeneratorBasedBuilder subclass named ``name`` (not registered with TFDS).

  Its ``generator`` (``m6_jax.data.prepare``'s) has ``plan`` (the splits to write) and
  ``generate(split, metadata)`` (the split's ``(key, example)`` pairs).
  """
  import tensorflow_datasets as tfds

  def body(ns):
    ns["name"] = name
    ns["VERSION"] = tfds.core.Version(VERSION)
    ns["RELEASE_NOTES"] = {VERSION: "Prepared by m6_jax.data.prepare.prepare_data."}

    def __init__(self, *, generator, **kwargs):  # noqa: N807
      self._generator = generator
      tfds.core.GeneratorBasedBuilder.__init__(self, **kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description="User image-text data for M6 (m6_jax.data.sources).",
        features=features(),
        disable_shuffling=True,  # keep the input order: record i <-> metadata masks[i]
        metadata=tfds.core.MetadataDict(),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in self._generator.plan}

    def _generate_examples(self, split):
      yield from self._generator.generate(split, self.info.metadata)

    ns.update(
      __init__=__init__,
      _info=_info,
      _split_generators=_split_generators,
      _generate_examples=_generate_examples,
    )

  class_name = "".join(p.capitalize() for p in name.split("_")) or "UserData"
  return types.new_class(
    class_name, (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True}, body
  )


def default_data_dir() -> str:
  """TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  from tensorflow_datasets.core import constants

  return os.path.expanduser(str(constants.DATA_DIR))


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def open_builder(data_dir: str, name: str):
  """The TFDS (read-only) builder of a prepared dataset: ``data_dir/name[/version]``.

  ``name`` may carry a version ("my_caps:1.0.0"); by default the highest version present.
  """
  import tensorflow_datasets as tfds

  data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
  base, _, version = name.replace("/", ":").partition(":")
  root = os.path.join(data_dir, base)
  versions = _complete_versions(root)
  if version:
    versions = [v for v in versions if v == version]
  if not versions:
    create = (
      f"`python -m m6_jax.main --mode=prepare_data --input_format=... --input_path=... "
      f"--data_dir={data_dir} --name={base}`"
    )
    left = sorted(v for v in os.listdir(root) if "incomplete." in v) if os.path.isdir(root) else []
    if left and not version:
      raise FileNotFoundError(
        f"prepared dataset {base!r} in data_dir {data_dir!r} is not complete: a conversion "
        f"was interrupted ({left[0]} is left in {root}); run it again: {create}."
      )
    complete = [d for d in _complete_datasets(data_dir) if d != base or not version]
    raise FileNotFoundError(
      f"no prepared dataset {name!r} in data_dir {data_dir!r} (complete datasets there: "
      f"{complete or 'none'}); create it with {create}, or set config.data.data_dir / "
      "config.data.tfds_name to an existing one."
    )
  latest = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
  return tfds.builder_from_directory(os.path.join(root, latest))


def _complete_versions(root: str) -> list[str]:
  """The versions under a dataset folder that a finished preparation wrote (a version
  folder with its dataset_info.json; interrupted ones are ``incomplete.*``)."""
  if not os.path.isdir(root):
    return []
  return [
    v
    for v in os.listdir(root)
    if re.fullmatch(r"\d+\.\d+\.\d+", v)
    and os.path.isfile(os.path.join(root, v, "dataset_info.json"))
  ]


def _complete_datasets(data_dir: str) -> list[str]:
  """Names of the datasets in ``data_dir`` with at least one complete version."""
  names = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
  return [n for n in names if _complete_versions(os.path.join(data_dir, n))]


def _metadata(builder) -> dict[str, Any]:
  meta = dict(builder.info.metadata or {}).get(METADATA_KEY)
  if not meta or meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
      f"dataset {builder.data_dir} was not prepared by m6_jax.data.prepare.prepare_data "
      f"(format {FORMAT_VERSION}); prepare it again with --mode=prepare_data."
    )
  return meta


def _unpack(mask_b64: str, n: int) -> np.ndarray:
  bits = np.unpackbits(np.frombuffer(base64.b64decode(mask_b64), dtype=np.uint8))
  return bits[:n].astype(bool)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_texts(record: Mapping[str, Any]) -> dict[str, str]:
  """A stored record's text of every registered column ("" when absent, or when the dataset
  was prepared before the column's field was registered)."""
  return {column: _text(record[column]) if column in record else "" for column in fields.columns()}


def record_to_example(record: Mapping[str, Any], image_size: int, index: int) -> dict[str, Any]:
  """A stored record -> an example in ``synthetic.make_example``'s format for the tasks.

  Each field puts its columns in (``Field.to_example``): the one caption as both
  ``caption_en`` and ``caption_zh`` (whichever language a task draws, it gets the record's
  caption, in its own language), the question/answer pair as a ``qa`` entry in both
  languages likewise, a task module's field its columns under their own names. Missing
  texts are ``""`` / no ``qa`` entries; tasks that need them never see such records
  (``PreparedSource.task_indices``).
  """
  texts = record_texts(record)
  example: dict[str, Any] = {"image": images.load_image(bytes(record["image"]), image_size)}
  for field in fields.all_fields():
    example.update(field.example_entries(texts))
  example.update(index=int(index), id=_text(record["id"]))
  return example


class PreparedSource:
  """grain random-access source over one split of a prepared dataset.

  Record ``i`` is ``record_to_example(stored record i)``; images come out as uint8
  [image_size, image_size, 3]. ``max_records`` keeps only the first records of the split.
  Picklable (it holds TFDS's ArrayRecordDataSource and two small masks).
  """

  def __init__(
    self, data_dir: str, name: str, split: str, image_size: int, max_records: int | None = None
  ):
    builder = open_builder(data_dir, name)
    meta = _metadata(builder)
    if split not in builder.info.splits or split not in meta["splits"]:
      raise ValueError(
        f"dataset {builder.data_dir} has no {split!r} split (it has "
        f"{sorted(meta['splits'])}); prepare it with a {split} input or validation_fraction."
      )
    self._data = builder.as_data_source(split)
    info = meta["splits"][split]
    n = int(info["num_records"])
    if len(self._data) != n:
      raise ValueError(
        f"dataset {builder.data_dir} split {split!r} has {len(self._data)} records but its "
        f"metadata says {n}; prepare it again."
      )
    if max_records is not None:
      n = min(n, int(max_records))
    self.name, self.split, self.image_size = name, split, int(image_size)
    self.dataset_dir = os.fspath(builder.data_dir)
    self.num_records = n
    self._masks = {
      name: _unpack(info[mask_key(name)], n) if mask_key(name) in info else np.zeros(n, bool)
      for name in fields.names()
    }

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, record_key: int) -> dict[str, Any]:
    i = int(record_key)
    if not 0 <= i < self.num_records:
      raise IndexError(f"index {i} out of range for {self!r}")
    record = self._data[i]
    try:
      return record_to_example(record, self.image_size, i)
    except (OSError, ValueError) as e:
      raise ValueError(f"record {i} ({_text(record['id'])}) of {self!r}: {e}") from e

  def raw(self, record_key: int) -> dict[str, Any]:
    """The stored record (bytes values), without decoding."""
    return self._data[int(record_key)]

  def field_count(self, field: str) -> int:
    """How many records have ``field`` (a name of ``fields.names()``)."""
    return int(self._masks[field].sum())

  def task_indices(self, task_name: str) -> np.ndarray:
    """Indices of the records ``task_name`` can use (those with every field it needs)."""
    needs = tasks.get(task_name).needs
    return np.flatnonzero(np.logical_and.reduce([self._masks[field] for field in needs]))

  def __repr__(self) -> str:
    return (
      f"PreparedSource({self.dataset_dir!r}, split={self.split!r}, "
      f"num_records={self.num_records}, image_size={self.image_size})"
    )


def iter_dataset_text(config, split: str = "train") -> Iterator[str]:
  """The texts (captions, questions, answers, task modules' fields) of a prepared dataset,
  for tokenizer training.

  Reads ``config.data.tokenizer_corpus_examples`` records spread evenly over the split of
  ``config.data.{data_dir, tfds_name}`` (all records if the split is smaller); no image is
  decoded. Deterministic.
  """
  data = config.data
  source = PreparedSource(data.data_dir, data.tfds_name, split, int(data.image_size))
  n = len(source)
  want = min(n, int(data.tokenizer_corpus_examples))
  for i in np.unique(np.linspace(0, n - 1, num=max(want, 1)).round().astype(np.int64)):
    record = source.raw(int(i))
    for text in record_texts(record).values():
      if text:
        yield text
