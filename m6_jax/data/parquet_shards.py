"""Parquet shards: tables with one row per image, its encoded bytes in one column and its
caption in another, as img2dataset (``--output_format=parquet``) and LAION / COYO / Wukong-
style tables with embedded images hold them.

The columns: ``image_column`` (binary bytes, or a struct with a ``bytes`` field as Hugging
Face datasets store images; "" picks the first of ``IMAGE_COLUMNS`` present), ``text_column``
(the caption; "" picks the first of ``TEXT_COLUMNS`` present), ``key_column`` (``key`` when
present, else the row number), ``image_key`` / ``url`` when present (the image's name:
records of one image are grouped by it as references in evaluation) and, when present, a column per text column of the registered
record fields besides the caption (``question``, ``answer``, task modules' columns).

Reading is random access by row: the row counts come from each file's footer, and a row is
read with its row group (only the columns above), the last few row groups kept decoded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading

from m6_jax.errors import ConfigError

IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image", "img", "image_bytes")
TEXT_COLUMNS = ("txt", "caption", "text", "TEXT", "Caption")
KEY_COLUMN = "key"
IMAGE_KEY_COLUMNS = ("image_key", "url", "URL")  # records with the same value share an image
ROW_GROUP_SIZE = 512  # rows per row group the writer makes: a read decodes one group
_KEEP_GROUPS = 16  # decoded row groups kept (a few per task stream's window)


@contextlib.contextmanager
def _open(path: str):
  import pyarrow.parquet as pq
  from etils import epath

  with epath.Path(path).open("rb") as f:
    yield pq.ParquetFile(f)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The columns one table's rows are read from (the same for every shard of a list)."""

  image: str
  text: str
  key: str  # "" when there is no key column
  extra: tuple[str, ...]  # record field columns besides the caption
  image_key: str = ""  # the column naming the image (records of one image share it), or ""


def footer(path: str) -> tuple[list[str], list[int]]:
  """(column names, rows of each row group) of a shard, from its footer alone."""
  with _open(path) as parquet:
    meta = parquet.metadata
    rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return list(parquet.schema_arrow.names), rows


def layout(
  path: str, names, image_column: str, text_column: str, extra_columns, other_names=()
) -> Layout:
  """The columns to read from the shard at ``path`` with columns ``names``; ConfigError when
  the image or text column is missing (naming the columns there are). The optional columns
  are those of any shard (``other_names``: the other shards' columns)."""
  names = list(names)
  anywhere = set(names).union(*map(set, other_names))

  def pick(wanted: str, candidates, what: str, key: str) -> str:
    if wanted:
      if wanted not in names:
        raise ConfigError(
          f"{path} has no {what} column {wanted!r} (its columns: {names}); set {key}."
        )
      return wanted
    found = [c for c in candidates if c in names]
    if not found:
      raise ConfigError(
        f"{path} has no {what} column (looked for {list(candidates)}; its columns: {names}); "
        f"name it with {key}."
      )
    return found[0]

  image = pick(image_column, IMAGE_COLUMNS, "image", "data.parquet_image_column")
  text = pick(text_column, TEXT_COLUMNS, "caption", "data.parquet_text_column")
  extra = tuple(c for c in extra_columns if c in anywhere and c not in (image, text))
  image_key = next((c for c in IMAGE_KEY_COLUMNS if c in anywhere), "")
  return Layout(image, text, KEY_COLUMN if KEY_COLUMN in anywhere else "", extra, image_key)


class Reader:
  """Rows of Parquet shards by (path, row group, row), from many threads. A row group is read
  once by the first thread that needs it (each read opens its own file: pyarrow's readers
  are not shared between threads) and the last few are kept decoded."""

  def __init__(self, layout: Layout, names: dict[str, list[str]]):
    """``names``: each shard's columns (the optional ones may be missing from some)."""
    self.layout, self.names = layout, names
    self._lock = threading.Lock()
    self._groups: collections.OrderedDict = collections.OrderedDict()

  def _read(self, path: str, group: int) -> dict[str, list]:
    lay = self.layout
    columns = [lay.image, lay.text, *lay.extra, lay.key, lay.image_key]
    columns = [c for c in columns if c and c in self.names[path]]
    with _open(path) as parquet:
      table = parquet.read_row_group(group, columns=columns)
    return {name: table.column(name).to_pylist() for name in columns}

  def _group(self, path: str, group: int) -> dict[str, list]:
    with self._lock:
      entry = self._groups.get((path, group))
      if entry is None:
        entry = self._groups[(path, group)] = [threading.Lock(), None]
        while len(self._groups) > _KEEP_GROUPS:
          self._groups.popitem(last=False)
      else:
        self._groups.move_to_end((path, group))
    with entry[0]:  # other threads wanting this group wait for its one read
      if entry[1] is None:
        entry[1] = self._read(path, group)
      return entry[1]

  def row(self, path: str, group: int, row: int) -> dict:
    """{column: value} of one row (None for a null; a column the shard lacks is absent)."""
    entry = self._group(path, group)
    return {name: values[row] for name, values in entry.items()}

  def __getstate__(self):  # a copy (another process) keeps no decoded groups
    return {"layout": self.layout, "names": self.names}

  def __setstate__(self, state):
    self.__init__(state["layout"], state["names"])


def image_bytes(value) -> bytes | None:
  """An image column's value: bytes, or a struct with ``bytes`` (Hugging Face); None: null."""
  if isinstance(value, dict):
    value = value.get("bytes")
  return None if value is None else bytes(value)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write(path: str, rows: list[dict], image_column: str) -> None:
  """Writes one shard: ``key``, ``image_column`` (binary), ``txt`` and the other columns the
  rows have (strings and ints), in row groups of ROW_GROUP_SIZE rows."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  names = list(dict.fromkeys(k for r in rows for k in r))
  table = pa.table(
    {
      n: pa.array([r.get(n) for r in rows], type=pa.binary() if n == image_column else None)
      for n in names
    }
  )
  pq.write_table(table, path, row_group_size=ROW_GROUP_SIZE)
