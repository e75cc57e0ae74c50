"""A request's body -> its fields and its image bytes, within the size limit.

Two encodings: a JSON object (the image, if any, as a base64 string in "image", optionally a
`data:` URL) or a form: multipart/form-data (the image as an uploaded file, or a base64
field, named "image"; the other fields as form fields), or a urlencoded one (`curl -d`). Every problem is a RequestError with a 4xx status
and one line: a body over the limit (413), an unknown content type (415), malformed JSON or
base64 (400), a field of the wrong shape (422).
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

IMAGE_FIELD = "image"
MAX_FORM_FIELDS = 32


class RequestError(Exception):
  """A bad request: its HTTP status and a one-line message."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


async def read_body(request: Request, max_bytes: int) -> bytes:
  """The whole body; 413 as soon as it (or its declared length) passes `max_bytes`."""
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > max_bytes:
    raise RequestError(413, f"the request has {int(declared):,} bytes; at most {max_bytes:,}.")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > max_bytes:
      raise RequestError(413, f"the request has more than {max_bytes:,} bytes.")
    chunks.append(chunk)
  return b"".join(chunks)


def _reject_constant(name: str) -> None:
  raise ValueError(f"{name} is not JSON")


def _json_object(body: bytes) -> dict[str, Any]:
  try:
    value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
  except UnicodeDecodeError:
    raise RequestError(400, "malformed JSON: the body is not UTF-8.") from None
  except ValueError as e:  # json.JSONDecodeError included
    raise RequestError(400, f"malformed JSON: {e}.") from None
  if not isinstance(value, dict):
    raise RequestError(422, f"the body must be a JSON object, not {type(value).__name__}.")
  return value


def decode_base64(text: str) -> bytes:
  """Base64 (standard alphabet, or a `data:<type>;base64,` URL) -> bytes; 400 if it is not."""
  if text.startswith("data:"):
    head, _, text = text.partition(",")
    if not head.endswith(";base64"):
      raise RequestError(400, "image: a data: URL must be base64 (data:image/png;base64,...).")
  try:
    return base64.b64decode("".join(text.split()), validate=True)
  except (binascii.Error, ValueError) as e:
    raise RequestError(400, f"image: not base64 ({e}).") from None


def _urlencoded(body: bytes) -> tuple[dict[str, Any], bytes | None]:
  """A urlencoded form, UTF-8 whether percent-encoded (browsers) or not (`curl -d`)."""
  try:
    pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
  except UnicodeDecodeError:
    raise RequestError(400, "the form is not UTF-8.") from None
  if len(pairs) > MAX_FORM_FIELDS:
    raise RequestError(422, f"the form has {len(pairs)} fields; at most {MAX_FORM_FIELDS}.")
  fields: dict[str, Any] = {}
  for name, value in pairs:
    if name in fields:
      raise RequestError(422, f"{name}: given more than once.")
    fields[name] = value
  image = fields.pop(IMAGE_FIELD, None)
  return fields, None if image is None else decode_base64(image)


async def _form(
  request: Request, body: bytes, max_bytes: int
) -> tuple[dict[str, Any], bytes | None]:
  async def receive():
    return {"type": "http.request", "body": body, "more_body": False}

  replay = Request(request.scope, receive)
  form = await replay.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=max_bytes)
  try:
    fields: dict[str, Any] = {}
    image = None
    for name, value in form.multi_items():
      if name in fields or (name == IMAGE_FIELD and image is not None):
        raise RequestError(422, f"{name}: given more than once.")
      if name == IMAGE_FIELD:
        image = await value.read() if isinstance(value, UploadFile) else decode_base64(value)
      elif isinstance(value, UploadFile):
        raise RequestError(422, f"{name}: a file; only '{IMAGE_FIELD}' may be one.")
      else:
        fields[name] = value
    return fields, image
  finally:
    await form.close()


async def read_request(
  request: Request, max_bytes: int
) -> tuple[dict[str, Any], bytes | None, bool]:
  """(the fields, the image bytes or None, whether it was a form) of a JSON or multipart
  request."""
  body = await read_body(request, max_bytes)
  kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
  if kind == "application/x-www-form-urlencoded":
    return *_urlencoded(body), True
  if kind == "multipart/form-data":
    return *(await _form(request, body, max_bytes)), True
  if kind not in ("application/json", ""):
    raise RequestError(415, f"content type {kind!r}: send application/json or multipart/form-data.")
  fields = _json_object(body)
  image = fields.pop(IMAGE_FIELD, None)
  if image is not None and not isinstance(image, str):
    raise RequestError(422, f"{IMAGE_FIELD}: a base64 string, not {type(image).__name__}.")
  return fields, None if image is None else decode_base64(image), False
