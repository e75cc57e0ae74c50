"""Reading user data for ``--mode=prepare_data``: which files feed which split, and the
records of their lines.

The input formats, the ``input_path`` forms and the rejection reasons are described in
``m6_jax.data.prepare`` (which writes the dataset). Everything here is per record and in
input order: ``iter_candidates`` turns a texts file (JSONL, or a MUGE text TSV) into
``Candidate`` records or ``BadLine`` rejections, and ``check_texts`` checks a record's
texts. The image bytes each record stores come from ``m6_jax.data.image_files``.

The texts are the columns of the registered record fields (``m6_jax.data.fields``). The
built-in ones have their own parsing here (``caption`` or ``text``, one or a list;
``question`` with ``answer`` or VQA's ``answers``); a field registered by a task module is
read as plain strings under its column names, onto the first record of each image a line
gives (so that a line with several captions still stores it once).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import re
from typing import Any, Iterator, Mapping

from m6_jax.data import fields
from m6_jax.errors import DataPreparationError

FORMATS = ("image_folder_jsonl", "muge_tsv")

SPLITS = ("train", "validation", "test")


REASONS = {
  "malformed_line": "not a JSON object / not id<TAB>value, wrong field type, no image named",
  "bad_encoding": "line is not valid UTF-8",
  "missing_image": "image file not found or unreadable; image id not in the TSV",
  "bad_base64": "TSV image is not valid base64",
  "corrupt_image": "Pillow cannot verify or fully decode the image (includes truncated files)",
  "empty_text": "empty caption/question/answer, question without answer, or no text at all",
  "text_too_long": "a caption/question/answer longer than max_text_chars characters",
  "duplicate_id": "record id (or TSV image id) seen before",
  "duplicate_record": "a text line identical to an earlier one (the same record twice)",
}


_SPLIT_WORDS = {
  "train": "train",
  "validation": "validation",
  "valid": "validation",
  "val": "validation",
  "dev": "validation",
  "test": "test",
}


# --------------------------------------------------------------------------------------
# Inputs: which files feed which split
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Input:
  texts: str  # a JSONL file, or (muge_tsv) a text TSV: <image id>\t<text>
  tsv: str | None = None  # muge_tsv only: the image TSV, <image id>\t<base64 image>


def is_text_tsv(path: str) -> bool:
  """MUGE's text TSVs (``T2I_train.text.tsv``): a ``text`` / ``texts`` part in the name."""
  if not path.endswith(".tsv"):
    return False
  stem = os.path.basename(path)[: -len(".tsv")].lower()
  return bool({"text", "texts"} & set(re.split(r"[_\-.]", stem)))


def _is_texts_file(name: str, input_format: str) -> bool:
  return name.endswith(".jsonl") or (input_format == "muge_tsv" and is_text_tsv(name))


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


def _sibling_tsv(texts: str) -> str:
  """The image TSV next to a texts file: ``x.tsv`` for ``x.jsonl``, ``x_imgs.tsv`` for
  ``x_texts.jsonl`` (Chinese-CLIP), ``x.img.tsv`` for ``x.text.tsv`` (MUGE text-to-image)."""
  stem, ext = os.path.splitext(texts)
  candidates = [] if ext == ".tsv" else [stem + ".tsv"]
  for words, images in (("_texts", "_imgs"), (".text", ".img"), (".texts", ".imgs")):
    if stem.endswith(words):
      candidates.append(stem[: -len(words)] + images + ".tsv")
  for c in candidates:
    if os.path.isfile(c):
      return c
  raise DataPreparationError(
    f"no image TSV for {texts!r} (looked for {candidates}); pair them explicitly: "
    f"input_path='train={texts}+images.tsv'"
  )


def _make_input(spec: str, input_format: str) -> Input:
  texts, _, tsv = spec.partition("+")
  texts, tsv = os.path.expanduser(texts.strip()), os.path.expanduser(tsv.strip())
  if tsv and input_format != "muge_tsv":
    raise DataPreparationError(f"'+{tsv}' pairs an image TSV, only valid for muge_tsv")
  if not os.path.isfile(texts):
    raise DataPreparationError(f"input file {texts!r} does not exist")
  if texts.endswith(".tsv") and input_format != "muge_tsv":
    raise DataPreparationError(
      f"{texts!r}: texts in a TSV (<image id>\\t<text>) are read by --input_format=muge_tsv"
    )
  if input_format == "muge_tsv":
    tsv = tsv or _sibling_tsv(texts)
    if not os.path.isfile(tsv):
      raise DataPreparationError(f"image TSV {tsv!r} does not exist")
  return Input(texts, tsv or None)


def _discover(folder: str, input_format: str) -> dict[str, Input]:
  names = sorted(os.listdir(folder))
  jsonls = [n for n in names if _is_texts_file(n, input_format)]
  if not jsonls:
    what = "*.jsonl or *.text.tsv" if input_format == "muge_tsv" else "*.jsonl"
    raise DataPreparationError(f"no {what} file in {folder!r}")
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
      image_tsvs = [n for n in names if n.endswith(".tsv") and not is_text_tsv(n)]
      tsvs = [n for n in image_tsvs if _split_word_in(n) == split]
      if len(tsvs) != 1 and len(by_split) == 1:
        tsvs = image_tsvs
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
  texts: dict[str, str | None]  # column -> its text (None: not given)
  # The line's bytes (hashed) and the record's place in it: equal for the same record twice.
  content_key: bytes = b""


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


def _answers(obj: dict) -> list[str]:
  """``answer`` (a string or a list) or VQA's ``answers`` (strings, or {"answer": ...}
  objects as in the VQA annotation files): every reference answer, repeats kept."""
  if "answer" in obj:
    return _texts(obj["answer"], "answer")
  if "answers" not in obj:
    return []
  values = obj["answers"]
  if not isinstance(values, list):
    raise Reject("malformed_line", "field 'answers' must be a list")
  return _texts(
    [v["answer"] if isinstance(v, dict) and "answer" in v else v for v in values], "answers"
  )


def _parse_line(
  obj: Any, input_format: str, default_id: str
) -> tuple[str, list[str], list[str | None], str | None, list[str], dict[str, str]]:
  """A JSON object -> (base record id, image keys, captions, question, answers, the plain
  columns of task modules' fields)."""
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
  plain = {c: _scalar_text(obj[c], c) for c in fields.plain_columns() if c in obj}
  return record_id or default_id, image_keys, captions, question, _answers(obj), plain


def _parse_text_tsv_line(text: str) -> tuple[str, list[str], list[str | None], None, list, dict]:
  """``<image id>\t<text>`` (MUGE text-to-image) -> as ``_parse_line``: the text is the
  caption, the record id the file:line default."""
  image_id, sep, caption = text.partition("\t")
  if not sep or not image_id.strip() or "\t" in caption:
    raise Reject("malformed_line", "expected <image id>\\t<text>")
  return "", [image_id.strip()], [caption], None, [], {}


def _json_error(e: json.JSONDecodeError) -> str:
  # Some messages end in "at" already ("Unterminated string starting at").
  return f"invalid JSON: {e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"


def iter_candidates(inp: Input, input_format: str) -> Iterator[Candidate | BadLine]:
  """The records of ``inp``'s texts file, in order, or the reason a line is unusable.

  A line gives one record per image it names and per caption / answer it holds: the k-th
  record has the k-th caption and the k-th answer (with the question), where there is one,
  so every text is stored once; a record with neither is not made."""
  name = os.path.basename(inp.texts)
  text_tsv = inp.texts.endswith(".tsv")
  for line_no, raw in _iter_lines(inp.texts):
    where = f"{inp.texts}:{line_no}"
    default_id = f"{name}:{line_no}"
    try:
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise Reject("bad_encoding", f"{e.reason} at byte {e.start}") from None
      if text_tsv:
        parsed = _parse_text_tsv_line(text)
      else:
        try:
          obj = json.loads(text)
        except json.JSONDecodeError as e:
          raise Reject("malformed_line", _json_error(e)) from None
        parsed = _parse_line(obj, input_format, default_id)
      base_id, image_keys, captions, question, answers, plain = parsed
    except Reject as r:
      yield BadLine(where, default_id, r.reason, r.detail)
      continue
    base_id = base_id or default_id
    line_hash = hashlib.sha256(raw.strip()).digest()
    rows = list(itertools.zip_longest(captions, answers or [None]))
    many = len(image_keys) * len(rows) > 1
    k = 0
    for image_key in image_keys:
      for j, (caption, answer) in enumerate(rows):
        record_id = f"{base_id}#{k}" if many else base_id
        # Records past the last answer (more captions than answers) carry no question.
        q = question if answer is not None or not answers else None
        texts = {"caption": caption, "question": q, "answer": answer, **(plain if j == 0 else {})}
        content_key = line_hash + k.to_bytes(4, "big")
        yield Candidate(where, record_id, image_key, texts, content_key)
        k += 1


def check_texts(c: Candidate, max_text_chars: int) -> dict[str, str]:
  """The record's text of every registered column ("" when absent), checked: no empty or
  over-long text, every column of a field or none, and at least one field."""
  texts = {}
  for column in fields.columns():
    value = c.texts.get(column)
    if value is None:
      texts[column] = ""
      continue
    value = value.strip()
    if not value:
      raise Reject("empty_text", f"{column} is empty")
    if len(value) > max_text_chars:
      raise Reject(
        "text_too_long", f"{column} has {len(value)} characters (max_text_chars={max_text_chars})"
      )
    texts[column] = value
  for field in fields.all_fields():
    have = [col for col in field.columns if texts[col]]
    if have and len(have) < len(field.columns):
      missing = [col for col in field.columns if not texts[col]]
      raise Reject("empty_text", f"{' and '.join(have)} without {' and '.join(missing)}")
  if not any(field.present(texts) for field in fields.all_fields()):
    wanted = " and no ".join("/".join(field.columns) for field in fields.all_fields())
    raise Reject("empty_text", f"no {wanted}")
  return texts
