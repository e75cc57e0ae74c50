"""Image bytes of user data for ``--mode=prepare_data``: validated (and re-encoded where
needed) by ``process_image``, read from a folder (``ImageFolder``) or from a base64 TSV
(``TsvImages``; standard or URL-safe base64). Failures are ``Reject``s with a reason of
``readers.REASONS``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Callable

from PIL import Image

from m6_jax.data.images import error_reason, oriented_rgb
from m6_jax.data.readers import BadLine, Reject

_STORED_FORMATS = ("JPEG", "PNG")

_STORED_MODES = ("RGB", "RGBA", "L", "LA", "P", "CMYK")


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
    raise Reject("corrupt_image", f"{type(e).__name__}: {error_reason(e)}") from None
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


_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def decode_base64(payload: bytes) -> bytes:
  """Standard or URL-safe base64 (MUGE and Chinese-CLIP write images with
  ``base64.urlsafe_b64encode``: ``-`` and ``_`` for ``+`` and ``/``), padding optional;
  anything else in it is an error (``binascii.Error``)."""
  payload = payload.strip().translate(_URLSAFE_TO_STANDARD)
  return base64.b64decode(payload + b"=" * (-len(payload) % 4), validate=True)


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
      return decode_base64(payload)
    except (binascii.Error, ValueError) as e:
      raise Reject("bad_base64", f"image {key!r}: {e}") from None

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
