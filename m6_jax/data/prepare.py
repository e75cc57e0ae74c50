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
  or absolute. ``caption`` (alias ``text``) may be a string or a list of strings (one record
  per caption); ``question`` + ``answer`` come as a pair; ``id`` is optional.

``muge_tsv``: MUGE / Chinese-CLIP style; images in a TSV ``<image id>\\t<base64 image>``,
texts in a JSONL that names them::

    {"image_id": "1006938", "text": ["春秋季新款女装连衣裙", "..."]}      (MUGE captioning)
    {"text_id": 8428, "text": "高级感托特包斜挎", "image_ids": [1076345, 517602]}  (retrieval)
    {"id": "1006938", "caption": "...", "question": "...", "answer": "..."}

  The image is named by ``image_id``, else ``image_ids`` (a list: one record per image),
  else ``id``. The record id is ``id`` (when not used for the image), ``text_id`` or
  ``query_id``. Texts as for ``image_folder_jsonl``. Ids may be strings or integers.

Every record needs a caption or a question/answer pair. Record ids default to
``<jsonl file name>:<line>``; a line expanded into several records (a list of captions or
images) gives ``<id>#<k>``. Ids must be unique across the input (a repeat is rejected).

``input_path`` (one of)
  * a JSONL file: everything goes to ``train`` (for ``muge_tsv`` the TSV is the file with the
    same stem and suffix ``.tsv``, or ``<x>_imgs.tsv`` for ``<x>_texts.jsonl``);
  * ``"train=a.jsonl,validation=b.jsonl,test=c.jsonl"`` (or a dict): one file per split;
    ``muge_tsv`` may pair files explicitly, ``"train=texts.jsonl+images.tsv"``;
  * a folder: each ``*.jsonl`` whose name contains a split word (``train``; ``validation``,
    ``valid``, ``val``, ``dev``; ``test``) as a ``_``/``-``/``.``-separated part, e.g.
    ``IC_train.jsonl``, ``valid_texts.jsonl``; a folder with one unlabelled JSONL is train.
    ``muge_tsv`` pairs each with the one ``*.tsv`` of the same split.

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
import binascii
import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from m6_jax.data.sources import (
  FORMAT_VERSION,
  METADATA_KEY,
  VERSION,
  builder_class,
  default_data_dir,
  to_rgb,
)

FORMATS = ("image_folder_jsonl", "muge_tsv")
SPLITS = ("train", "validation", "test")

REASONS = {
  "malformed_line": "not a JSON object / not id<TAB>base64, wrong field type, no image named",
  "bad_encoding": "line is not valid UTF-8",
  "missing_image": "image file not found or unreadable; image id not in the TSV",
  "bad_base64": "TSV image is not valid base64",
  "corrupt_image": "Pillow cannot verify or fully decode the image (includes truncated files)",
  "empty_text": "empty caption/question/answer, question without answer, or no text at all",
  "text_too_long": "a caption/question/answer longer than max_text_chars characters",
  "duplicate_id": "record id (or TSV image id) seen before",
}

_SPLIT_WORDS = {
  "train": "train",
  "validation": "validation",
  "valid": "validation",
  "val": "validation",
  "dev": "validation",
  "test": "test",
}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_STORED_FORMATS = ("JPEG", "PNG")
_STORED_MODES = ("RGB", "RGBA", "L", "LA", "P", "CMYK")
_IMAGE_CACHE_SIZE = 256  # validated images kept (texts of one image are usually adjacent)
_CHUNK = 256  # input lines whose images are validated together by the worker threads


class DataPreparationError(ValueError):
  """Preparation cannot go on (bad arguments, too many bad records); the message says why."""


# --------------------------------------------------------------------------------------
# Inputs: which files feed which split
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Input:
  jsonl: str
  tsv: str | None = None  # muge_tsv only


def _split_of(word: str, what: str) -> str:
  split = _SPLIT_WORDS.get(word.strip().lower())
  if split is None:
    raise DataPreparationError(
      f"unknown split {word!r} in {what}; use one of {sorted(_SPLIT_WORDS)}"
    )
  return split


def _split_word_in(filename: str) -> str | None:
  stem = os.path.basename(filename).rsplit(".", 1)[0].lower()
  found = {_SPLIT_WORDS[p] for p in re.split(r"[_\-.]", stem) if p in _SPLIT_WORDS}
  if len(found) > 1:
    raise DataPreparationError(
      f"{filename!r} names several splits ({sorted(found)}); name the files explicitly: "
      "input_path='train=a.jsonl,validation=b.jsonl'"
    )
  return found.pop() if found else None


def _sibling_tsv(jsonl: str) -> str:
  stem = jsonl[: -len(".jsonl")] if jsonl.endswith(".jsonl") else jsonl
  candidates = [stem + ".tsv"]
  if stem.endswith("_texts"):
    candidates.append(stem[: -len("_texts")] + "_imgs.tsv")
  for c in candidates:
    if os.path.isfile(c):
      return c
  raise DataPreparationError(
    f"no image TSV for {jsonl!r} (looked for {candidates}); pair them explicitly: "
    f"input_path='train={jsonl}+images.tsv'"
  )


def _make_input(spec: str, input_format: str) -> _Input:
  jsonl, _, tsv = spec.partition("+")
  jsonl, tsv = os.path.expanduser(jsonl.strip()), os.path.expanduser(tsv.strip())
  if tsv and input_format != "muge_tsv":
    raise DataPreparationError(f"'+{tsv}' pairs an image TSV, only valid for muge_tsv")
  if not os.path.isfile(jsonl):
    raise DataPreparationError(f"input file {jsonl!r} does not exist")
  if input_format == "muge_tsv":
    tsv = tsv or _sibling_tsv(jsonl)
    if not os.path.isfile(tsv):
      raise DataPreparationError(f"image TSV {tsv!r} does not exist")
  return _Input(jsonl, tsv or None)


def _discover(folder: str, input_format: str) -> dict[str, _Input]:
  names = sorted(os.listdir(folder))
  jsonls = [n for n in names if n.endswith(".jsonl")]
  if not jsonls:
    raise DataPreparationError(f"no *.jsonl file in {folder!r}")
  by_split: dict[str, list[str]] = collections.defaultdict(list)
  for n in jsonls:
    by_split[_split_word_in(n) or ("train" if len(jsonls) == 1 else "?")].append(n)
  if "?" in by_split:
    raise DataPreparationError(
      f"cannot tell the split of {by_split['?']} in {folder!r}: name files like "
      "train.jsonl / validation.jsonl, or pass input_path='train=a.jsonl,validation=b.jsonl'"
    )
  out = {}
  for split, files in by_split.items():
    if len(files) > 1:
      raise DataPreparationError(
        f"several {split} files in {folder!r}: {files}; pass them explicitly"
      )
    jsonl = os.path.join(folder, files[0])
    tsv = None
    if input_format == "muge_tsv":
      tsvs = [n for n in names if n.endswith(".tsv") and _split_word_in(n) == split]
      if len(tsvs) != 1 and len(by_split) == 1:
        tsvs = [n for n in names if n.endswith(".tsv")]
      if len(tsvs) != 1:
        raise DataPreparationError(
          f"expected one {split} image TSV in {folder!r}, found {tsvs or 'none'}; pair "
          f"them explicitly: input_path='{split}=texts.jsonl+images.tsv'"
        )
      tsv = os.path.join(folder, tsvs[0])
    out[split] = _Input(jsonl, tsv)
  return out


def resolve_inputs(input_format: str, input_path: str | Mapping[str, str]) -> dict[str, _Input]:
  """``input_path`` (see the module docstring) -> {split: input files}."""
  if input_format not in FORMATS:
    raise DataPreparationError(f"unknown input_format {input_format!r}; expected one of {FORMATS}")
  if isinstance(input_path, Mapping):
    items = [(_split_of(k, "input_path"), v) for k, v in input_path.items()]
  elif "=" in input_path:
    items = []
    for part in input_path.split(","):
      word, sep, spec = part.partition("=")
      if not sep or not spec.strip():
        raise DataPreparationError(
          f"bad input_path part {part!r}; expected 'split=file.jsonl' parts joined by commas"
        )
      items.append((_split_of(word, "input_path"), spec))
  else:
    path = os.path.expanduser(input_path)
    if os.path.isdir(path):
      return _discover(path, input_format)
    items = [("train", path)]
  out: dict[str, _Input] = {}
  for split, spec in items:
    if split in out:
      raise DataPreparationError(f"split {split!r} is given twice in input_path")
    out[split] = _make_input(spec, input_format)
  return out


def validation_share(image_key: str) -> float:
  """A uniform number in [0, 1) from the image key; < validation_fraction -> validation."""
  digest = hashlib.sha256(image_key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


class _Reject(Exception):
  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class _Candidate:
  where: str  # file:line
  record_id: str
  image_key: str
  caption: str | None
  question: str | None
  answer: str | None


@dataclasses.dataclass(frozen=True)
class _Bad:
  """A line rejected before its image (and so its split) is known."""

  where: str
  record_id: str
  reason: str
  detail: str


def _iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte order mark
      raw = raw.rstrip(b"\r\n")
      if raw.strip():
        yield line_no, raw


def _scalar_text(value: Any, field: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise _Reject("malformed_line", f"field {field!r} must be a string, got {value!r:.60}")
  return str(value)


def _key(value: Any, field: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
    raise _Reject("malformed_line", f"field {field!r} must be a non-empty string or integer")
  return str(value).strip()


def _texts(value: Any, field: str) -> list[str]:
  values = value if isinstance(value, list) else [value]
  if not values:
    raise _Reject("empty_text", f"field {field!r} is an empty list")
  return [_scalar_text(v, field) for v in values]


def _parse_line(
  obj: Any, input_format: str, default_id: str
) -> tuple[str, list[str], list[str | None], str | None, str | None]:
  """A JSON object -> (base record id, image keys, captions, question, answer)."""
  if not isinstance(obj, dict):
    raise _Reject("malformed_line", f"expected a JSON object, got {type(obj).__name__}")
  record_id = None
  if input_format == "image_folder_jsonl":
    if "image" not in obj:
      raise _Reject("malformed_line", "no 'image' field")
    image_keys = [_key(obj["image"], "image")]
    if "id" in obj:
      record_id = _key(obj["id"], "id")
  else:
    if "image_id" in obj:
      image_keys = [_key(obj["image_id"], "image_id")]
    elif "image_ids" in obj:
      ids = obj["image_ids"]
      if not isinstance(ids, list) or not ids:
        raise _Reject("malformed_line", "field 'image_ids' must be a non-empty list")
      image_keys = [_key(v, "image_ids") for v in ids]
    elif "id" in obj:
      image_keys = [_key(obj["id"], "id")]
    else:
      raise _Reject("malformed_line", "no 'image_id', 'image_ids' or 'id' field")
    for field in ("id", "text_id", "query_id"):
      if field in obj and not (field == "id" and "image_id" not in obj and "image_ids" not in obj):
        record_id = _key(obj[field], field)
        break
  field = "caption" if "caption" in obj else "text" if "text" in obj else None
  captions: list[str | None] = [None] if field is None else _texts(obj[field], field)
  question = _scalar_text(obj["question"], "question") if "question" in obj else None
  answer = _scalar_text(obj["answer"], "answer") if "answer" in obj else None
  return record_id or default_id, image_keys, captions, question, answer


def _iter_candidates(inp: _Input, input_format: str) -> Iterator[_Candidate | _Bad]:
  name = os.path.basename(inp.jsonl)
  for line_no, raw in _iter_lines(inp.jsonl):
    where = f"{inp.jsonl}:{line_no}"
    default_id = f"{name}:{line_no}"
    try:
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise _Reject("bad_encoding", f"{e.reason} at byte {e.start}") from None
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise _Reject("malformed_line", f"invalid JSON: {e.msg} at column {e.colno}") from None
      base_id, image_keys, captions, question, answer = _parse_line(obj, input_format, default_id)
    except _Reject as r:
      yield _Bad(where, default_id, r.reason, r.detail)
      continue
    many = len(image_keys) * len(captions) > 1
    k = 0
    for image_key in image_keys:
      for caption in captions:
        record_id = f"{base_id}#{k}" if many else base_id
        yield _Candidate(where, record_id, image_key, caption, question, answer)
        k += 1


def _check_texts(c: _Candidate, max_text_chars: int) -> dict[str, str]:
  texts = {}
  for field in ("caption", "question", "answer"):
    value = getattr(c, field)
    if value is None:
      texts[field] = ""
      continue
    value = value.strip()
    if not value:
      raise _Reject("empty_text", f"{field} is empty")
    if len(value) > max_text_chars:
      raise _Reject(
        "text_too_long", f"{field} has {len(value)} characters (max_text_chars={max_text_chars})"
      )
    texts[field] = value
  if bool(texts["question"]) != bool(texts["answer"]):
    have = "question" if texts["question"] else "answer"
    raise _Reject("empty_text", f"{have} without {'answer' if have == 'question' else 'question'}")
  if not texts["caption"] and not texts["question"]:
    raise _Reject("empty_text", "no caption and no question/answer")
  return texts


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def process_image(data: bytes, max_image_size: int) -> bytes:
  """Validated image bytes to store; raises _Reject('corrupt_image') if Pillow cannot read
  them fully. See m6_jax.data.sources' docstring for when the bytes are re-encoded."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.verify()  # structure and checksums (PNG CRCs); cheap
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # full decode: catches truncated files that verify() lets through
      fmt, (w, h) = img.format, img.size
      if w < 1 or h < 1:
        raise _Reject("corrupt_image", f"image has size {w}x{h}")
      animated = getattr(img, "is_animated", False)
      if (
        fmt in _STORED_FORMATS
        and img.mode in _STORED_MODES
        and max(w, h) <= max_image_size
        and not animated
      ):
        return data
      out = to_rgb(ImageOps.exif_transpose(img))
  except _Reject:
    raise
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
    raise _Reject("corrupt_image", f"{type(e).__name__}: {e}") from None
  out.thumbnail((max_image_size, max_image_size), Image.Resampling.LANCZOS)
  buf = io.BytesIO()
  if fmt == "PNG":
    out.save(buf, format="PNG")
  else:
    out.save(buf, format="JPEG", quality=95)
  return buf.getvalue()


class _ImageFolder:
  def __init__(self, base_dir: str):
    self.base_dir = base_dir

  def read(self, key: str) -> bytes:
    path = key if os.path.isabs(key) else os.path.join(self.base_dir, key)
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise _Reject("missing_image", f"cannot read {path!r}: {e.strerror or e}") from None


class _TsvImages:
  """Image id -> base64 payload of a MUGE TSV, by byte offset (the file is not loaded)."""

  def __init__(self, path: str, on_bad: Callable[[_Bad], None]):
    self.path = path
    self.offsets: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f:
      line_no, offset = 0, 0
      for raw in f:
        line_no += 1
        start, offset = offset, offset + len(raw)
        line = raw.rstrip(b"\r\n")
        if not line.strip():
          continue
        where = f"{path}:{line_no}"
        image_id, sep, payload = line.partition(b"\t")
        try:
          key = image_id.decode("utf-8").strip()
        except UnicodeDecodeError:
          on_bad(_Bad(where, f"tsv:{line_no}", "bad_encoding", "image id is not UTF-8"))
          continue
        if not sep or not key or not payload.strip() or b"\t" in payload:
          on_bad(_Bad(where, f"tsv:{line_no}", "malformed_line", "expected <image id>\\t<base64>"))
        elif key in self.offsets:
          on_bad(_Bad(where, key, "duplicate_id", f"image id {key!r} seen before in the TSV"))
        else:
          skip = len(image_id) + 1
          self.offsets[key] = (start + skip, len(line) - skip)
    self._fd = os.open(path, os.O_RDONLY)

  def read(self, key: str) -> bytes:
    if key not in self.offsets:
      raise _Reject("missing_image", f"image id {key!r} not in {self.path!r}")
    start, size = self.offsets[key]
    payload = os.pread(self._fd, size, start)  # positional read: safe from many threads
    try:
      return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
      raise _Reject("bad_base64", f"image {key!r}: {e}") from None

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


# --------------------------------------------------------------------------------------
# Generation: counts, checks, and the examples handed to TFDS
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SplitStats:
  read: int = 0  # records (or unusable lines) looked at
  written: int = 0
  rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class PrepareSummary:
  """What ``prepare_data`` did; ``format()`` is the table it prints."""

  name: str
  dataset_dir: str
  splits: dict[str, SplitStats]
  seconds: float

  @property
  def written(self) -> dict[str, int]:
    return {s: st.written for s, st in self.splits.items()}

  @property
  def rejected(self) -> collections.Counter:
    return sum((st.rejected for st in self.splits.values()), collections.Counter())

  def format(self) -> str:
    return _format_summary(self.splits, f"Dataset '{self.name}' in {self.dataset_dir}")


def _format_summary(splits: Mapping[str, SplitStats], title: str) -> str:
  lines = [title, f"  {'split':<12}{'read':>10}{'written':>10}{'rejected':>10}"]
  for split, st in splits.items():
    rejected = sum(st.rejected.values())
    lines.append(f"  {split:<12}{st.read:>10}{st.written:>10}{rejected:>10}")
  total = sum((st.rejected for st in splits.values()), collections.Counter())
  if total:
    lines.append("  rejected by reason:")
    for reason in REASONS:
      if total[reason]:
        per = ", ".join(f"{s} {st.rejected[reason]}" for s, st in splits.items())
        lines.append(f"    {reason:<15}{total[reason]:>8}  ({per}) - {REASONS[reason]}")
  else:
    lines.append("  no records rejected")
  return "\n".join(lines)


class _Generator:
  """Reads the inputs and yields ``(key, example)`` per split; one object per preparation."""

  def __init__(
    self,
    input_format: str,
    inputs: dict[str, _Input],
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
    self.plan: dict[str, list[tuple[_Input, bool, Callable[[str], bool] | None]]] = {}
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
    self._tsv: dict[str, _TsvImages] = {}

  def _reject(self, split: str, bad: _Bad) -> None:
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

  def _images(self, inp: _Input, split: str):
    if self.input_format == "image_folder_jsonl":
      return _ImageFolder(self.image_dir or os.path.dirname(os.path.abspath(inp.jsonl)))
    if inp.tsv not in self._tsv:
      logging.info("Indexing image TSV %s", inp.tsv)
      # TSV lines that are unusable count once, in the split that reads the file first.
      self._tsv[inp.tsv] = _TsvImages(inp.tsv, lambda bad: self._reject(split, bad))
    return self._tsv[inp.tsv]

  def _load(self, images, key: str) -> bytes | _Reject:
    try:
      return process_image(images.read(key), self.max_image_size)
    except _Reject as r:
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
    has_caption, has_qa = [], []
    cache: collections.OrderedDict[str, bytes | _Reject] = collections.OrderedDict()
    next_progress = self.progress_every
    with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
      for inp, owner, keep in self.plan[split]:
        images = self._images(inp, split)
        logging.info("Split %s: reading %s", split, inp.jsonl)
        candidates = _iter_candidates(inp, self.input_format)
        while chunk := list(itertools.islice(candidates, _CHUNK)):
          items: list[_Bad | tuple[_Candidate, dict[str, str]]] = []
          for c in chunk:
            if isinstance(c, _Bad):
              if owner:  # else another split of this file has counted it
                items.append(c)
              continue
            if keep is not None and not keep(c.image_key):
              continue
            try:
              texts = _check_texts(c, self.max_text_chars)
              if c.record_id in self._seen_ids:
                raise _Reject("duplicate_id", f"record id {c.record_id!r} seen before")
            except _Reject as r:
              items.append(_Bad(c.where, c.record_id, r.reason, r.detail))
              continue
            self._seen_ids.add(c.record_id)
            items.append((c, texts))
          keys = [
            k
            for k in dict.fromkeys(x[0].image_key for x in items if isinstance(x, tuple))
            if k not in cache
          ]
          loaded = dict(zip(keys, pool.map(lambda k: self._load(images, k), keys)))
          for item in items:
            if isinstance(item, _Bad):
              self._reject(split, item)
            else:
              c, texts = item
              image = loaded[c.image_key] if c.image_key in loaded else cache[c.image_key]
              if isinstance(image, _Reject):
                self._reject(split, _Bad(c.where, c.record_id, image.reason, image.detail))
              else:
                st.read += 1
                st.written += 1
                has_caption.append(bool(texts["caption"]))
                has_qa.append(bool(texts["question"]))
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
    self.masks[split] = {"caption": has_caption, "qa": has_qa}
    metadata[METADATA_KEY] = self.metadata()
    self._progress(split, start)

  def _check_split(self, split: str) -> None:
    st = self.stats[split]
    rejected = sum(st.rejected.values())
    table = _format_summary({split: st}, f"Split {split}:")
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
          "num_records": len(m["caption"]),
          "has_caption": pack(m["caption"]),
          "has_qa": pack(m["qa"]),
        }
        for split, m in self.masks.items()
      },
      "rejected": {split: dict(st.rejected) for split, st in self.stats.items()},
    }

  def close(self) -> None:
    for tsv in self._tsv.values():
      tsv.close()


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
  if not _NAME_RE.match(name or ""):
    raise DataPreparationError(
      f"dataset name {name!r} must be lower_snake_case (letters, digits, '_'), e.g. 'my_captions'"
    )
  if name in tfds.list_builders(with_community_datasets=False):
    raise DataPreparationError(
      f"dataset name {name!r} is a TFDS catalogue dataset; pick another so that "
      "tfds.builder(name, data_dir=...) finds your data"
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

  generator = _Generator(
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
      logging.info("Split %s <- %s%s%s", split, inp.jsonl, extra, share)
  tfds.display_progress_bar(False)  # our own progress lines instead of tqdm bars
  try:
    builder = builder_class(name)(
      generator=generator, data_dir=output_dir, file_format="array_record"
    )
    with tempfile.TemporaryDirectory(prefix="m6_prepare_") as download_dir:
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
  summary = PrepareSummary(name, dataset_dir, generator.stats, time.time() - start)
  if print_fn is not None:
    print_fn(summary.format() + f"\n  ({summary.seconds:.1f} s)")
  return summary
