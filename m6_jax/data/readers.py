"""Reading user data for ``--mode=prepare_data``: which files feed which split, the records
of their lines, and the validated image bytes each record stores.

The input formats, the ``input_path`` forms and the rejection reasons are described in
``m6_jax.data.prepare`` (which writes the dataset). Everything here is per record and in
input order: ``iter_candidates`` turns a JSONL file into ``Candidate`` records or
``BadLine`` rejections, ``check_texts`` checks a record's texts, and ``ImageFolder`` /
``TsvImages`` with ``process_image`` give the image bytes to store, or ``Reject``.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import io
import json
import os
import re
from typing import Any, Callable, Iterator, Mapping

from PIL import Image

from m6_jax.data.images import oriented_rgb
from m6_jax.errors import DataPreparationError

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

_STORED_FORMATS = ("JPEG", "PNG")

_STORED_MODES = ("RGB", "RGBA", "L", "LA", "P", "CMYK")


# --------------------------------------------------------------------------------------
# Inputs: which files feed which split
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Input:
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


def _make_input(spec: str, input_format: str) -> Input:
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
  return Input(jsonl, tsv or None)


def _discover(folder: str, input_format: str) -> dict[str, Input]:
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
    out[split] = Input(jsonl, tsv)
  return out


def resolve_inputs(input_format: str, input_path: str | Mapping[str, str]) -> dict[str, Input]:
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
  out: dict[str, Input] = {}
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


class Reject(Exception):
  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Candidate:
  where: str  # file:line
  record_id: str
  image_key: str
  caption: str | None
  question: str | None
  answer: str | None


@dataclasses.dataclass(frozen=True)
class BadLine:
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
    raise Reject("malformed_line", f"field {field!r} must be a string, got {value!r:.60}")
  return str(value)


def _key(value: Any, field: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
    raise Reject("malformed_line", f"field {field!r} must be a non-empty string or integer")
  return str(value).strip()


def _texts(value: Any, field: str) -> list[str]:
  values = value if isinstance(value, list) else [value]
  if not values:
    raise Reject("empty_text", f"field {field!r} is an empty list")
  return [_scalar_text(v, field) for v in values]


def _parse_line(
  obj: Any, input_format: str, default_id: str
) -> tuple[str, list[str], list[str | None], str | None, str | None]:
  """A JSON object -> (base record id, image keys, captions, question, answer)."""
  if not isinstance(obj, dict):
    raise Reject("malformed_line", f"expected a JSON object, got {type(obj).__name__}")
  record_id = None
  if input_format == "image_folder_jsonl":
    if "image" not in obj:
      raise Reject("malformed_line", "no 'image' field")
    image_keys = [_key(obj["image"], "image")]
    if "id" in obj:
      record_id = _key(obj["id"], "id")
  else:
    if "image_id" in obj:
      image_keys = [_key(obj["image_id"], "image_id")]
    elif "image_ids" in obj:
      ids = obj["image_ids"]
      if not isinstance(ids, list) or not ids:
        raise Reject("malformed_line", "field 'image_ids' must be a non-empty list")
      image_keys = [_key(v, "image_ids") for v in ids]
    elif "id" in obj:
      image_keys = [_key(obj["id"], "id")]
    else:
      raise Reject("malformed_line", "no 'image_id', 'image_ids' or 'id' field")
    for field in ("id", "text_id", "query_id"):
      if field in obj and not (field == "id" and "image_id" not in obj and "image_ids" not in obj):
        record_id = _key(obj[field], field)
        break
  field = "caption" if "caption" in obj else "text" if "text" in obj else None
  captions: list[str | None] = [None] if field is None else _texts(obj[field], field)
  question = _scalar_text(obj["question"], "question") if "question" in obj else None
  answer = _scalar_text(obj["answer"], "answer") if "answer" in obj else None
  return record_id or default_id, image_keys, captions, question, answer


def iter_candidates(inp: Input, input_format: str) -> Iterator[Candidate | BadLine]:
  name = os.path.basename(inp.jsonl)
  for line_no, raw in _iter_lines(inp.jsonl):
    where = f"{inp.jsonl}:{line_no}"
    default_id = f"{name}:{line_no}"
    try:
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise Reject("bad_encoding", f"{e.reason} at byte {e.start}") from None
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise Reject("malformed_line", f"invalid JSON: {e.msg} at column {e.colno}") from None
      base_id, image_keys, captions, question, answer = _parse_line(obj, input_format, default_id)
    except Reject as r:
      yield BadLine(where, default_id, r.reason, r.detail)
      continue
    many = len(image_keys) * len(captions) > 1
    k = 0
    for image_key in image_keys:
      for caption in captions:
        record_id = f"{base_id}#{k}" if many else base_id
        yield Candidate(where, record_id, image_key, caption, question, answer)
        k += 1


def check_texts(c: Candidate, max_text_chars: int) -> dict[str, str]:
  texts = {}
  for field in ("caption", "question", "answer"):
    value = getattr(c, field)
    if value is None:
      texts[field] = ""
      continue
    value = value.strip()
    if not value:
      raise Reject("empty_text", f"{field} is empty")
    if len(value) > max_text_chars:
      raise Reject(
        "text_too_long", f"{field} has {len(value)} characters (max_text_chars={max_text_chars})"
      )
    texts[field] = value
  if bool(texts["question"]) != bool(texts["answer"]):
    have = "question" if texts["question"] else "answer"
    raise Reject("empty_text", f"{have} without {'answer' if have == 'question' else 'question'}")
  if not texts["caption"] and not texts["question"]:
    raise Reject("empty_text", "no caption and no question/answer")
  return texts


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def process_image(data: bytes, max_image_size: int) -> bytes:
  """Validated image bytes to store; raises Reject('corrupt_image') if Pillow cannot read
  them fully. See m6_jax.data.sources' docstring for when the bytes are re-encoded."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.verify()  # structure and checksums (PNG CRCs); cheap
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # full decode: catches truncated files that verify() lets through
      fmt, (w, h) = img.format, img.size
      if w < 1 or h < 1:
        raise Reject("corrupt_image", f"image has size {w}x{h}")
      animated = getattr(img, "is_animated", False)
      if (
        fmt in _STORED_FORMATS
        and img.mode in _STORED_MODES
        and max(w, h) <= max_image_size
        and not animated
      ):
        return data
      out = oriented_rgb(img)
  except Reject:
    raise
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
    raise Reject("corrupt_image", f"{type(e).__name__}: {e}") from None
  out.thumbnail((max_image_size, max_image_size), Image.Resampling.LANCZOS)
  buf = io.BytesIO()
  if fmt == "PNG":
    out.save(buf, format="PNG")
  else:
    out.save(buf, format="JPEG", quality=95)
  return buf.getvalue()


class ImageFolder:
  def __init__(self, base_dir: str):
    self.base_dir = base_dir

  def read(self, key: str) -> bytes:
    path = key if os.path.isabs(key) else os.path.join(self.base_dir, key)
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise Reject("missing_image", f"cannot read {path!r}: {e.strerror or e}") from None


class TsvImages:
  """Image id -> base64 payload of a MUGE TSV, by byte offset (the file is not loaded)."""

  def __init__(self, path: str, on_bad: Callable[[BadLine], None]):
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
          on_bad(BadLine(where, f"tsv:{line_no}", "bad_encoding", "image id is not UTF-8"))
          continue
        if not sep or not key or not payload.strip() or b"\t" in payload:
          on_bad(
            BadLine(where, f"tsv:{line_no}", "malformed_line", "expected <image id>\\t<base64>")
          )
        elif key in self.offsets:
          on_bad(BadLine(where, key, "duplicate_id", f"image id {key!r} seen before in the TSV"))
        else:
          skip = len(image_id) + 1
          self.offsets[key] = (start + skip, len(line) - skip)
    self._fd = os.open(path, os.O_RDONLY)

  def read(self, key: str) -> bytes:
    if key not in self.offsets:
      raise Reject("missing_image", f"image id {key!r} not in {self.path!r}")
    start, size = self.offsets[key]
    payload = os.pread(self._fd, size, start)  # positional read: safe from many threads
    try:
      return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
      raise Reject("bad_base64", f"image {key!r}: {e}") from None

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
