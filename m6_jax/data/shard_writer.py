"""Writing image-text records as shards in img2dataset's layout, for
``--mode=export_world --format=...`` and ``--mode=prepare_data --output_format=...``.

``webdataset``: ``00000.tar`` (``<key>.<jpg|png|webp>``, ``<key>.txt``, ``<key>.json``),
``00000.parquet`` beside it (one metadata row per sample: key, caption, status, width,
height and the record's other texts; no image) and ``00000_stats.json`` (counts).
``parquet``: ``00000.parquet`` with the image bytes in a column named after their format
(``jpg`` / ``png``; ``image`` when a shard mixes formats), the caption in ``txt``, and the same metadata columns; plus
``00000_stats.json``. Keys are img2dataset's: the shard number (5 digits) then the sample's
number in its shard (as many digits as the shard size needs), e.g. ``000120007``.

Shards are written under a temporary name and renamed when complete, so a reader never sees
half a shard; the same records give the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import os

from PIL import Image

from m6_jax.data import parquet_shards, webdataset

FORMATS = ("webdataset", "parquet")


def image_extension(data: bytes) -> str:
  """The file extension of encoded image bytes, from their format (``jpg`` for JPEG)."""
  with Image.open(io.BytesIO(data)) as img:
    fmt = (img.format or "").lower()
  return {"jpeg": "jpg", "": "jpg"}.get(fmt, fmt)


def image_size(data: bytes) -> tuple[int, int]:
  with Image.open(io.BytesIO(data)) as img:
    return img.size


class ShardWriter:
  """Records -> shards of ``shard_size`` records in ``output_dir`` (created).

  ``add(image, caption, texts)``: encoded image bytes, the caption (None: no ``.txt``), and
  the record's other texts (question, answer, ..., and anything else worth keeping, such as
  its id), which go to the ``.json`` / metadata columns."""

  def __init__(self, output_dir: str, fmt: str, shard_size: int):
    if fmt not in FORMATS:
      raise ValueError(f"unknown shard format {fmt!r}; expected one of {FORMATS}")
    if shard_size < 1:
      raise ValueError(f"shard_size={shard_size} must be >= 1")
    os.makedirs(output_dir, exist_ok=True)
    self.output_dir, self.format, self.shard_size = output_dir, fmt, int(shard_size)
    self._digits = max(1, math.ceil(math.log10(self.shard_size)))
    self.shards: list[str] = []
    self.num_records = 0
    self._rows: list[dict] = []
    self._tar: webdataset.TarWriter | None = None

  def _path(self, ext: str, shard: int | None = None) -> str:
    shard = len(self.shards) if shard is None else shard
    return os.path.join(self.output_dir, f"{shard:05d}{ext}")

  def add(self, image: bytes, caption: str | None, texts: dict | None = None) -> str:
    """Writes one record; returns its key."""
    key = f"{len(self.shards):05d}{len(self._rows):0{self._digits}d}"
    ext = image_extension(image)
    width, height = image_size(image)
    meta = {"key": key, "status": "success", "width": width, "height": height}
    meta.update({k: v for k, v in (texts or {}).items() if v not in (None, "")})
    if self.format == "webdataset":
      if self._tar is None:
        self._tar = webdataset.TarWriter(self._path(".tar.incomplete"))
      self._tar.write(key, image, ext, caption, {**meta, "caption": caption})
      self._rows.append({**meta, "caption": caption})
    else:
      self._rows.append({"key": key, "_image": image, "_ext": ext, "txt": caption, **meta})
    self.num_records += 1
    if len(self._rows) == self.shard_size:
      self._finish_shard()
    return key

  def _finish_shard(self) -> None:
    if not self._rows:
      return
    if self.format == "webdataset":
      self._tar.close()
      self._tar = None
      os.replace(self._path(".tar.incomplete"), self._path(".tar"))
      parquet_shards.write(self._path(".parquet.incomplete"), self._rows, "")
      os.replace(self._path(".parquet.incomplete"), self._path(".parquet"))
      self.shards.append(self._path(".tar"))
    else:
      # The image column is named after the images' format, as img2dataset's ("image" if mixed).
      exts = {r.pop("_ext") for r in self._rows}
      column = exts.pop() if len(exts) == 1 else "image"
      rows = [{"key": r["key"], column: r.pop("_image"), **r} for r in self._rows]
      parquet_shards.write(self._path(".parquet.incomplete"), rows, column)
      os.replace(self._path(".parquet.incomplete"), self._path(".parquet"))
      self.shards.append(self._path(".parquet"))
    stats = {"count": len(self._rows), "successes": len(self._rows), "failed_to_resize": 0}
    with open(self._path("_stats.json", len(self.shards) - 1), "w") as f:
      json.dump(stats, f, indent=2, sort_keys=True)
    self._rows = []

  def close(self) -> list[str]:
    """Finishes the last shard; returns the shard paths."""
    self._finish_shard()
    return self.shards
