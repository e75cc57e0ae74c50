"""The record fields: the texts a stored record of user data may hold, one registry entry each.

A field is a name and the text columns a record stores for it: ``caption`` -> ("caption",),
``qa`` -> ("question", "answer"). Everything about stored records derives from this registry:

  * ``--mode=prepare_data`` (``prepare.py``) reads every registered column from the input,
    stores it (``sources.features``) and keeps, per split, a ``has_<field>`` mask of the
    records that have the field (all its columns non-empty);
  * reading back (``sources.py``): the masks pick each task's records (``Task.needs`` names
    fields), and ``Field.to_example`` puts a record's columns into the example the tasks
    read (``synthetic.make_example``'s format);
  * evaluation (``evaluation/eval_kinds.py``): an eval kind names the field its held-out
    inputs come from, so a dataset without it does not offer the kind.

A field registered by a task module (``data.task_modules``) is read from a JSONL line as
plain strings under its column names, and comes into the example under the same names. The
built-in fields have their own parsing in ``readers.py`` (captions aliased ``text`` or given
as lists, VQA's ``answers``, ...). A dataset prepared before a field was registered simply
has none of its records.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

# Keys of a stored record, or of the example a record becomes, that no column may take.
RESERVED = ("id", "image_key", "image", "index", "objects", "image_codes")
RESERVED += ("caption_en", "caption_zh", "qa", "record_fields")


def _columns_as_they_are(field: "Field") -> Callable[[Mapping[str, str]], dict]:
  return lambda texts: {c: texts[c] for c in field.columns}


@dataclasses.dataclass(frozen=True)
class Field:
  """A record field: its name, the text columns a record stores for it, whether the JSONL
  reader parses it itself (the built-ins) or reads its columns as plain strings, and how its
  columns enter the example the tasks read (None: under their own names)."""

  name: str
  columns: tuple[str, ...]
  plain_json: bool = True
  to_example: Callable[[Mapping[str, str]], dict] | None = None

  def present(self, texts: Mapping[str, str]) -> bool:
    """Whether a record's texts (column -> text, "" when absent) have this field."""
    return all(texts.get(c) for c in self.columns)

  def example_entries(self, texts: Mapping[str, str]) -> dict:
    """This field's entries of the example of a record with ``texts``."""
    return (self.to_example or _columns_as_they_are(self))(texts)


_REGISTRY: dict[str, Field] = {}


def register(field: Field) -> Field:
  """Adds a field (its columns are stored after those registered before); returns it."""
  if not field.name.isidentifier() or field.name in _REGISTRY:
    raise ValueError(f"field name {field.name!r} must be a new identifier; have {names()}")
  taken = set(columns()) | set(RESERVED)
  bad = [c for c in field.columns if not c.isidentifier() or c in taken]
  if not field.columns or bad or len(set(field.columns)) != len(field.columns):
    raise ValueError(
      f"field {field.name!r} needs new, distinct identifier columns; {bad or field.columns} "
      f"clash with {sorted(taken)}"
    )
  _REGISTRY[field.name] = field
  return field


def unregister(name: str) -> None:
  """Removes a field (tests that register their own use this to clean up)."""
  del _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Field:
  if name not in _REGISTRY:
    raise ValueError(f"unknown record field {name!r}; the registered fields are {list(names())}")
  return _REGISTRY[name]


def all_fields() -> tuple[Field, ...]:
  return tuple(_REGISTRY.values())


def columns() -> tuple[str, ...]:
  """Every registered field's columns, in registration order: what a record stores."""
  return tuple(c for f in _REGISTRY.values() for c in f.columns)


def plain_columns() -> tuple[str, ...]:
  """The columns a JSONL line gives as plain strings under their own names."""
  return tuple(c for f in _REGISTRY.values() if f.plain_json for c in f.columns)


def _caption_entries(texts: Mapping[str, str]) -> dict:
  # One caption serves both languages: whichever a task draws, it gets the record's caption.
  return {"caption_en": texts["caption"], "caption_zh": texts["caption"]}


def _qa_entries(texts: Mapping[str, str]) -> dict:
  # The pair is offered in both languages likewise (question type "user").
  question, answer = texts["question"], texts["answer"]
  if not (question and answer):
    return {"qa": []}
  qa = {"question": question, "answer": answer, "qtype": "user"}
  return {"qa": [{**qa, "lang": lang} for lang in ("en", "zh")]}


register(Field("caption", ("caption",), plain_json=False, to_example=_caption_entries))
register(Field("qa", ("question", "answer"), plain_json=False, to_example=_qa_entries))
