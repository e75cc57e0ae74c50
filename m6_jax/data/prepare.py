"""User image-text data -> a TFDS dataset (array_record), for ``--mode=prepare_data``.

``prepare_data`` converts user files into the TFDS dataset ``<output_dir>/<name>/1.0.0/``
defined in ``m6_jax.data.sources`` (which also describes what is stored per record and how to
read it back).

Input formats
-------------
``image_folder_jsonl``: JSON Lines, one record per line, images as files::

    {"image": "cats/001.jpg", "caption": "a cat on a sofa", "id": "c1"}
    {"image": "cats/001.jpg", "question": "what is on the sofa?", "answer": "a cat"}

  ``image`` (required) is a path relative to ``image_dir`` (default: the JSONL's folder)
  or absolute. ``caption`` (alias ``text``) may be a string or a list of strings;
  ``question`` comes with ``answer`` (a string or a list of reference answers) or VQA's
  ``answers`` (a list of strings or of ``{"answer": ...}``); ``id`` is optional. A line with
  several captions / answers gives one record per caption and per answer (the k-th record
  holds the k-th of each), so every text is stored once; evaluation groups them again, the
  captions by image and the answers by image and question, as the references.

``muge_tsv``: MUGE / Chinese-CLIP style; images in a TSV ``<image id>\\t<base64 image>``
(standard or URL-safe base64, as MUGE's ``base64.urlsafe_b64encode``; padding optional),
texts in a JSONL that names them::

    {"image_id": "1006938", "text": ["春秋季新款女装连衣裙", "..."]}      (MUGE captioning)
    {"text_id": 8428, "text": "高级感托特包斜挎", "image_ids": [1076345, 517602]}  (retrieval)
    {"id": "1006938", "caption": "...", "question": "...", "answer": "..."}

  or in a text TSV ``<image id>\\t<text>`` (MUGE text-to-image: ``T2I_train.text.tsv``
  beside ``T2I_train.img.tsv``; a ``text``/``texts`` part in the name marks a text TSV).
  The image is named by ``image_id``, else ``image_ids`` (a list: one record per image),
  else ``id``. The record id is ``id`` (when not used for the image), ``text_id`` or
  ``query_id``. Texts as for ``image_folder_jsonl``. Ids may be strings or integers.

Every record needs a caption or a question/answer pair, or the columns of a record field
that a task module registered (``m6_jax.data.fields``; given as plain strings under their
column names, e.g. ``{"image": ..., "phrase": "the red circle", "location": "top left"}``;
``--task_modules`` names the modules). Record ids default to
``<texts file name>:<line>``; a line expanded into several records (a list of captions,
answers or images) gives ``<id>#<k>``. Ids must be unique across the input, and a line must
not repeat an earlier line exactly (``duplicate_id`` / ``duplicate_record``).

``input_path`` (one of)
  * a JSONL file: everything goes to ``train`` (for ``muge_tsv`` the TSV is the file with the
    same stem and suffix ``.tsv``, or ``<x>_imgs.tsv`` for ``<x>_texts.jsonl``, or
    ``<x>.img.tsv`` for the text TSV ``<x>.text.tsv``);
  * ``"train=a.jsonl,validation=b.jsonl,test=c.jsonl"`` (or a dict): one file per split;
    ``muge_tsv`` may pair files explicitly, ``"train=texts.jsonl+images.tsv"``;
  * a folder: each ``*.jsonl`` whose name contains a split word (``train``; ``validation``,
    ``valid``, ``val``, ``dev``; ``test``) as a ``_``/``-``/``.``-separated part, e.g.
    ``IC_train.jsonl``, ``valid_texts.jsonl``; a folder with one unlabelled JSONL is train.
    ``muge_tsv`` also takes text TSVs, and pairs each texts file with the one image
    ``*.tsv`` of the same split.

``validation_fraction`` > 0 (only without a validation input) moves that fraction of the
train input to ``validation``, decided by a hash of the record's *image* key (path or image
id): deterministic, stable when records are added, and all texts of one image land in the
same split, so there is no image leakage between train and validation.
Bad input is counted, logged and skipped (reasons in ``REASONS``; the first
``log_limit`` per reason are logged with file:line, record id and why). Each split may
reject at most ``max_rejected_fraction`` of its records, else ``DataPreparationError``.
A summary (records per split, rejections by reason) is printed at the end.

Atomicity: TFDS writes into ``<output_dir>/<name>/incomplete.<random>_1.0.0/`` and renames
it to ``1.0.0`` only after every split is written, so an interrupted or failed run never
leaves a dataset that looks complete (a failed run removes its temporary folder; one killed
outright leaves it behind and the next run of the same name deletes it). An existing
complete dataset is an error unless ``overwrite=True``: then it is moved aside to
``<name>/replaced.1.0.0.<random>/`` during the rebuild, deleted when the rebuild succeeds
and moved back when it fails (after a kill it stays there, out of the readers' sight).
Only one preparation per ``name`` may run at a time.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import io
import itertools
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from absl import logging

from m6_jax.data import fields, tasks
from m6_jax.data.image_files import ImageFolder, TsvImages, process_image
from m6_jax.data.prepare_summary import PrepareSummary, SplitStats, format_summary
from m6_jax.data.readers import (
  SPLITS,
  BadLine,
  Candidate,
  Input,
  Reject,
  check_texts,
  iter_candidates,
  resolve_inputs,
  validation_share,
)
from m6_jax.data.sources import (
  FORMAT_VERSION,
  METADATA_KEY,
  VERSION,
  builder_class,
  default_data_dir,
  mask_key,
)
from m6_jax.errors import DataPreparationError

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_IMAGE_CACHE_SIZE = 256  # validated images kept (texts of one image are usually adjacent)
_CHUNK = 256  # input lines whose images are validated together by the worker threads


# --------------------------------------------------------------------------------------
# Generation: counts, checks, and the examples handed to TFDS
# --------------------------------------------------------------------------------------


class Generator:
  """Reads the inputs and yields ``(key, example)`` per split; one object per preparation."""

  def __init__(
    self,
    input_format: str,
    inputs: dict[str, Input],
    validation_fraction: float,
    image_dir: str | None,
    max_text_chars: int,
    max_image_size: int,
    max_rejected_fraction: float,
    progress_every: int,
    log_limit: int,
    num_workers: int,
  ):
    self.input_format, self.validation_fraction = input_format, validation_fraction
    self.num_workers = num_workers
    self.image_dir = image_dir
    self.max_text_chars, self.max_image_size = max_text_chars, max_image_size
    self.max_rejected_fraction = max_rejected_fraction
    self.progress_every, self.log_limit = progress_every, log_limit
    # split -> [(input, owns unattributable rejections, keep(image_key) or None)]
    self.plan: dict[str, list[tuple[Input, bool, Callable[[str], bool] | None]]] = {}
    for split in SPLITS:
      if split in inputs:
        keep = None
        if split == "train" and validation_fraction > 0:
          keep = lambda key: validation_share(key) >= validation_fraction  # noqa: E731
        self.plan[split] = [(inputs[split], True, keep)]
      if split == "validation" and validation_fraction > 0:
        keep = lambda key: validation_share(key) < validation_fraction  # noqa: E731
        self.plan[split] = [(inputs["train"], False, keep)]
    self.stats = {split: SplitStats() for split in self.plan}
    self.masks: dict[str, dict[str, list[bool]]] = {}
    self._logged: collections.Counter = collections.Counter()
    self._seen_ids: set[str] = set()
    self._seen_records: set[bytes] = set()
    self._tsv: dict[str, TsvImages] = {}

  def _reject(self, split: str, bad: BadLine) -> None:
    self.stats[split].rejected[bad.reason] += 1
    self.stats[split].read += 1
    self._logged[bad.reason] += 1
    n = self._logged[bad.reason]
    if n <= self.log_limit:
      logging.warning(
        "Skipped %s (id %s): %s: %s", bad.where, bad.record_id, bad.reason, bad.detail
      )
      if n == self.log_limit:
        logging.warning("Further '%s' rejections are counted but not logged.", bad.reason)

  def _images(self, inp: Input, split: str):
    if self.input_format == "image_folder_jsonl":
      return ImageFolder(self.image_dir or os.path.dirname(os.path.abspath(inp.texts)))
    if inp.tsv not in self._tsv:
      logging.info("Indexing image TSV %s", inp.tsv)
      # TSV lines that are unusable count once, in the split that reads the file first.
      self._tsv[inp.tsv] = TsvImages(inp.tsv, lambda bad: self._reject(split, bad))
    return self._tsv[inp.tsv]

  def _load(self, images, key: str) -> bytes | Reject:
    try:
      return process_image(images.read(key), self.max_image_size)
    except Reject as r:
      return r

  def _progress(self, split: str, start: float) -> None:
    st = self.stats[split]
    logging.info(
      "Split %s: %d records read, %d written, %d rejected (%.0f records/s)",
      split,
      st.read,
      st.written,
      sum(st.rejected.values()),
      st.read / max(time.time() - start, 1e-9),
    )

  def generate(self, split: str, metadata: dict) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields the split's ``(key, example)``; keys 0, 1, ... in input order.

    Lines are read in chunks; within a chunk texts and ids are checked in order, then the
    chunk's images are validated by ``num_workers`` threads (Pillow releases the GIL), then
    records are yielded / rejections logged in input order, so the output is the same for
    any number of workers.
    """
    st, start = self.stats[split], time.time()
    has = {field.name: [] for field in fields.all_fields()}
    cache: collections.OrderedDict[str, bytes | Reject] = collections.OrderedDict()
    next_progress = self.progress_every
    with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
      for inp, owner, keep in self.plan[split]:
        images = self._images(inp, split)
        logging.info("Split %s: reading %s", split, inp.texts)
        candidates = iter_candidates(inp, self.input_format)
        while chunk := list(itertools.islice(candidates, _CHUNK)):
          items: list[BadLine | tuple[Candidate, dict[str, str]]] = []
          for c in chunk:
            if isinstance(c, BadLine):
              if owner:  # else another split of this file has counted it
                items.append(c)
              continue
            if keep is not None and not keep(c.image_key):
              continue
            try:
              texts = check_texts(c, self.max_text_chars)
              if c.content_key in self._seen_records:
                raise Reject("duplicate_record", "the same line appears earlier in the input")
              if c.record_id in self._seen_ids:
                raise Reject("duplicate_id", f"record id {c.record_id!r} seen before")
            except Reject as r:
              items.append(BadLine(c.where, c.record_id, r.reason, r.detail))
              continue
            self._seen_ids.add(c.record_id)
            self._seen_records.add(c.content_key)
            items.append((c, texts))
          keys = [
            k
            for k in dict.fromkeys(x[0].image_key for x in items if isinstance(x, tuple))
            if k not in cache
          ]
          loaded = dict(zip(keys, pool.map(lambda k: self._load(images, k), keys)))
          for item in items:
            if isinstance(item, BadLine):
              self._reject(split, item)
            else:
              c, texts = item
              image = loaded[c.image_key] if c.image_key in loaded else cache[c.image_key]
              if isinstance(image, Reject):
                self._reject(split, BadLine(c.where, c.record_id, image.reason, image.detail))
              else:
                st.read += 1
                st.written += 1
                for field in fields.all_fields():
                  has[field.name].append(field.present(texts))
                yield (
                  st.written - 1,
                  {
                    "id": c.record_id,
                    "image_key": c.image_key,
                    "image": image,
                    **texts,
                  },
                )
            if st.read >= next_progress:
              self._progress(split, start)
              next_progress += self.progress_every
          cache.update(loaded)
          while len(cache) > _IMAGE_CACHE_SIZE:
            cache.popitem(last=False)
    self._check_split(split)
    self.masks[split] = has
    metadata[METADATA_KEY] = self.metadata()
    self._progress(split, start)

  def _check_split(self, split: str) -> None:
    st = self.stats[split]
    rejected = sum(st.rejected.values())
    table = format_summary({split: st}, f"Split {split}:")
    if st.written == 0:
      hint = (
        " (raise validation_fraction or give a validation file)"
        if split == "validation" and not rejected
        else ""
      )
      raise DataPreparationError(f"split {split!r} has no valid record{hint}.\n{table}")
    if rejected > self.max_rejected_fraction * st.read:
      raise DataPreparationError(
        f"split {split!r}: {rejected} of {st.read} records rejected "
        f"({rejected / st.read:.1%}), more than max_rejected_fraction="
        f"{self.max_rejected_fraction:g}. Fix the input (see the skipped records in the log) "
        f"or raise max_rejected_fraction. Nothing was written.\n{table}"
      )

  def task_records(self) -> dict[str, dict[str, int]]:
    """{task: {split: records with every field the task needs}} (from the task registry)."""
    out = {}
    for name in tasks.names():
      needs = tasks.get(name).needs
      out[name] = {
        split: int(np.logical_and.reduce([np.asarray(m[f], bool) for f in needs]).sum())
        for split, m in self.masks.items()
      }
    return out

  def metadata(self) -> dict[str, Any]:
    def pack(mask: list[bool]) -> str:
      return base64.b64encode(np.packbits(np.asarray(mask, dtype=bool)).tobytes()).decode()

    return {
      "format_version": FORMAT_VERSION,
      "input_format": self.input_format,
      "validation_fraction": self.validation_fraction,
      "max_text_chars": self.max_text_chars,
      "max_image_size": self.max_image_size,
      "splits": {
        split: {
          "num_records": self.stats[split].written,
          **{mask_key(name): pack(mask) for name, mask in m.items()},
        }
        for split, m in self.masks.items()
      },
      "rejected": {split: dict(st.rejected) for split, st in self.stats.items()},
    }

  def close(self) -> None:
    for tsv in self._tsv.values():
      tsv.close()


def checked_inputs(
  input_format: str,
  input_path: str | Mapping[str, str],
  name: str,
  validation_fraction: float,
  max_text_chars: int,
  max_image_size: int,
  max_rejected_fraction: float,
  progress_every: int,
) -> dict[str, Input]:
  """The inputs of each split, after checking the arguments (DataPreparationError)."""
  if not _NAME_RE.match(name or ""):
    raise DataPreparationError(
      f"dataset name {name!r} must be lower_snake_case (letters, digits, '_'), e.g. 'my_captions'"
    )
  if not 0.0 <= validation_fraction < 1.0:
    raise DataPreparationError(f"validation_fraction={validation_fraction} must be in [0, 1)")
  if not 0.0 <= max_rejected_fraction <= 1.0:
    raise DataPreparationError(f"max_rejected_fraction={max_rejected_fraction} must be in [0, 1]")
  if max_text_chars < 1 or max_image_size < 16 or progress_every < 1:
    raise DataPreparationError(
      "max_text_chars and progress_every must be >= 1, max_image_size >= 16"
    )
  inputs = resolve_inputs(input_format, input_path)
  if validation_fraction > 0:
    if "validation" in inputs:
      raise DataPreparationError(
        "validation_fraction > 0 splits the train input, but a validation input is given "
        "too; use one or the other"
      )
    if "train" not in inputs:
      raise DataPreparationError("validation_fraction > 0 needs a train input")
  return inputs


def prepare_data(
  input_format: str,
  input_path: str | Mapping[str, str],
  output_dir: str,
  name: str,
  *,
  validation_fraction: float = 0.0,
  image_dir: str | None = None,
  max_text_chars: int = 1000,
  max_image_size: int = 512,
  max_rejected_fraction: float = 0.1,
  overwrite: bool = False,
  progress_every: int = 1000,
  log_limit: int = 100,
  num_workers: int = 0,
  print_fn: Callable[[str], None] | None = print,
) -> PrepareSummary:
  """Converts user data into the TFDS dataset ``<output_dir>/<name>/1.0.0`` (array_record).

  Args (formats, splits and checks are described in the module docstring):
    input_format: "image_folder_jsonl" or "muge_tsv".
    input_path: a JSONL file, a folder, "split=file,..." or a {split: file} dict.
    output_dir: the TFDS data_dir to write into ("" -> TFDS's default data_dir).
    name: the dataset name (lower_snake_case; not the name of a TFDS catalogue dataset).
    validation_fraction: share of the train input moved to "validation" by image hash.
    image_dir: base folder of relative image paths (image_folder_jsonl; default: the
      JSONL's folder).
    max_text_chars: longer captions / questions / answers are rejected.
    max_image_size: larger images are shrunk to this longer side and re-encoded.
    max_rejected_fraction: most rejected records a split may have (0.1 = 10%).
    overwrite: replace an existing dataset of this name (else it is an error).
    progress_every: log progress every this many records.
    log_limit: log at most this many rejected records per reason (all are counted).
    num_workers: threads validating / re-encoding images (0: min(8, CPU count)); the
      result does not depend on it.
    print_fn: prints the summary at the end (None: don't).

  Returns the summary. Raises DataPreparationError (a ValueError) with a one-paragraph
  explanation when the arguments or the data are unusable; nothing is left behind then.
  """
  import tensorflow_datasets as tfds

  start = time.time()
  if name in tfds.list_builders(with_community_datasets=False):
    raise DataPreparationError(
      f"dataset name {name!r} is a TFDS catalogue dataset; pick another so that "
      "tfds.builder(name, data_dir=...) finds your data"
    )
  inputs = checked_inputs(
    input_format,
    input_path,
    name,
    validation_fraction,
    max_text_chars,
    max_image_size,
    max_rejected_fraction,
    progress_every,
  )

  output_dir = os.path.expanduser(output_dir) if output_dir else default_data_dir()
  dataset_root = os.path.join(output_dir, name)
  dataset_dir = os.path.join(dataset_root, VERSION)
  if os.path.exists(os.path.join(dataset_dir, "dataset_info.json")) and not overwrite:
    raise DataPreparationError(
      f"dataset {dataset_dir} already exists; pass overwrite=True (--overwrite) to rebuild it"
    )
  if os.path.isdir(dataset_root):  # leftovers of a killed run of this name
    for entry in os.listdir(dataset_root):
      if entry.startswith("incomplete."):
        logging.info("Removing %s left by an interrupted preparation.", entry)
        shutil.rmtree(os.path.join(dataset_root, entry), ignore_errors=True)
  replaced = None
  if os.path.exists(dataset_dir):  # overwrite: keep the old copy until the new one is done
    replaced = tempfile.mkdtemp(prefix=f"replaced.{VERSION}.", dir=dataset_root)
    os.rename(dataset_dir, os.path.join(replaced, VERSION))

  generator = Generator(
    input_format,
    inputs,
    validation_fraction,
    image_dir,
    max_text_chars,
    max_image_size,
    max_rejected_fraction,
    progress_every,
    log_limit,
    num_workers or min(8, os.cpu_count() or 1),
  )
  for split, entries in generator.plan.items():
    for inp, _, keep in entries:
      extra = f" + {inp.tsv}" if inp.tsv else ""
      share = "" if keep is None else " (hash split)"
      logging.info("Split %s <- %s%s%s", split, inp.texts, extra, share)
  tfds.display_progress_bar(False)  # our own progress lines instead of tqdm bars
  try:
    builder = builder_class(name)(
      generator=generator, data_dir=output_dir, file_format="array_record"
    )
    # TFDS prints "Downloading and preparing dataset Unknown size (download: ...)": nothing
    # is downloaded here, so its stdout is dropped (the summary says what was written).
    with (
      tempfile.TemporaryDirectory(prefix="m6_prepare_") as download_dir,
      contextlib.redirect_stdout(io.StringIO()),
    ):
      builder.download_and_prepare(download_dir=download_dir)
  except BaseException:
    if replaced is not None and not os.path.exists(dataset_dir):
      os.rename(os.path.join(replaced, VERSION), dataset_dir)  # the old dataset is back
      shutil.rmtree(replaced, ignore_errors=True)
    raise
  finally:
    generator.close()
  if replaced is not None:
    shutil.rmtree(replaced, ignore_errors=True)
  summary = PrepareSummary(
    name, dataset_dir, generator.stats, time.time() - start, generator.task_records()
  )
  if print_fn is not None:
    print_fn(summary.format() + f"\n  ({summary.seconds:.1f} s)")
  return summary
