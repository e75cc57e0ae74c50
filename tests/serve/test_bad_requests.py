"""Bad requests never hurt the server: each is a 4xx with a one-line message, and a valid
request sent after it gets its right answer."""

import base64
import io
import json
import struct
import zlib

import pytest
from http_utils import b64, get, post
from PIL import Image


def _png_header(width: int, height: int) -> bytes:
  """A PNG whose header declares width x height pixels (its pixel data cut short)."""
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  chunk = b"IHDR" + ihdr
  header = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
  return b"\x89PNG\r\n\x1a\n" + header + b"\x00\x00\x10\x00IDAT" + b"\x78\x9c" + b"\x00" * 64


def _png(size=(48, 48)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
  return buffer.getvalue()


def _b64(data: bytes) -> str:
  return base64.b64encode(data).decode("ascii")


def _json(path, body):
  return path, {"json": body}


def _raw(path, content: bytes, content_type="application/json"):
  return path, {"content": content, "headers": {"content-type": content_type}}


PNG = _png()
CASES = {
  # images
  "not_an_image": _json("/v1/caption", {"image": _b64(b"hello, I am no picture")}),
  "truncated_png": _json("/v1/caption", {"image": _b64(PNG[: len(PNG) // 2])}),
  "50_megapixels": _json("/v1/caption", {"image": _b64(_png_header(10_000, 5_000))}),
  "bomb_header": _json("/v1/caption", {"image": _b64(_png_header(60_000, 60_000))}),
  "image_not_base64": _json("/v1/caption", {"image": "%%% not base64 %%%"}),
  "image_a_server_path": _json("/v1/caption", {"image": "/etc/passwd"}),
  "image_a_number": _json("/v1/caption", {"image": 12345}),
  "image_missing": _json("/v1/caption", {}),
  "image_empty": _json("/v1/caption", {"image": ""}),
  "form_not_an_image": ("/v1/caption", {"files": {"image": ("a.png", b"GIF89a broken")}}),
  "form_two_files": (
    "/v1/caption",
    {"files": [("image", ("a.png", PNG)), ("image", ("b.png", PNG))]},
  ),
  "form_other_file": ("/v1/answer", {"files": {"question": ("q.txt", b"what?")}}),
  "drawing_given_an_image": _json("/v1/image", {"prompt": "a", "image": _b64(PNG)}),
  # bodies
  "malformed_json": _raw("/v1/continue", b'{"prompt": "a small'),
  "empty_body": _raw("/v1/continue", b""),
  "json_array": _raw("/v1/continue", b'["a small red"]'),
  "json_nan": _raw("/v1/image", b'{"prompt": "a", "guidance_scale": NaN}'),
  "json_infinity_by_overflow": _raw("/v1/image", b'{"prompt": "a", "temperature": 1e999}'),
  "not_utf8": _raw("/v1/continue", b'{"prompt": "\xff\xfe"}'),
  "text_plain": _raw("/v1/continue", b"a small red", "text/plain"),
  "form_not_utf8": _raw("/v1/continue", b"prompt=\xff\xfe", "application/x-www-form-urlencoded"),
  "form_field_twice": _raw(
    "/v1/continue", b"prompt=a&prompt=b", "application/x-www-form-urlencoded"
  ),
  "too_large": _raw("/v1/continue", b'{"prompt": "' + b"a" * (2**20 + 10) + b'"}'),
  # fields
  "unknown_field": _json("/v1/continue", {"prompt": "a", "output_dir": "/tmp/x"}),
  "server_path_field": _json("/v1/image", {"prompt": "a", "vqgan_workdir": "/etc"}),
  "prompt_a_number": _json("/v1/continue", {"prompt": 5}),
  "prompt_empty": _json("/v1/continue", {"prompt": ""}),
  "prompt_blank": _json("/v1/continue", {"prompt": " \n\t "}),
  "prompt_10000_chars": _json("/v1/continue", {"prompt": "红" * 10_000}),
  "question_missing": _json("/v1/answer", {"image": _b64(PNG)}),
  "max_len_a_string": _json("/v1/continue", {"prompt": "a", "max_len": "ten"}),
  "max_len_too_long": _json("/v1/continue", {"prompt": "a", "max_len": 1000}),
  "unknown_decoding": _json("/v1/continue", {"prompt": "a", "decoding": "telepathy"}),
  "unknown_language": _json("/v1/continue", {"prompt": "a", "language": "fr"}),
  "beam_size_zero": _json("/v1/continue", {"prompt": "a", "decoding": "beam", "beam_size": 0}),
  "top_p_zero": _json("/v1/continue", {"prompt": "a", "top_p": 0}),
  "seed_negative": _json("/v1/continue", {"prompt": "a", "seed": -1}),
  "seed_huge": _json("/v1/continue", {"prompt": "a", "seed": 2**70}),
  "temperature_a_list": _json("/v1/continue", {"prompt": "a", "temperature": [1]}),
  "form_guidance_nan": ("/v1/image", {"data": {"prompt": "a", "guidance_scale": "nan"}}),
  "multipart_guidance_nan": (
    "/v1/image",
    {"files": {"prompt": (None, "a"), "guidance_scale": (None, "nan")}},
  ),
  "num_images_zero": _json("/v1/image", {"prompt": "a", "num_images": 0}),
  "num_images_1000": _json("/v1/image", {"prompt": "a", "num_images": 1000}),
  "rerank_below_num_images": _json("/v1/image", {"prompt": "a", "num_images": 4, "rerank": 2}),
  "guidance_negative": _json("/v1/image", {"prompt": "a", "guidance_scale": -1}),
}


@pytest.fixture(scope="module")
def valid(app, scene_files):
  """A valid request and its answer (sent before any bad one)."""
  request = ("/v1/caption", {"json": {"image": b64(scene_files[0])}})
  response = post(app, request[0], **request[1])
  assert response.status_code == 200, response.text
  return request, response.json()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_request_is_a_4xx_and_the_server_goes_on(app, valid, case):
  path, kw = CASES[case]
  response = post(app, path, **kw)
  assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
  error = response.json()["error"]
  assert error and "\n" not in error and "Traceback" not in error, error
  request, answer = valid
  again = post(app, request[0], **request[1])
  assert again.status_code == 200 and again.json() == answer


def test_the_statuses_say_what_was_wrong(app):
  status = lambda case: post(app, CASES[case][0], **CASES[case][1]).status_code
  assert status("too_large") == 413
  assert status("text_plain") == 415
  assert status("malformed_json") == 400 and status("not_an_image") == 400
  assert status("unknown_field") == 422 and status("form_guidance_nan") == 422
  error = post(app, CASES["unknown_language"][0], **CASES["unknown_language"][1])
  assert error.status_code == 422 and error.json()["error"].startswith("language: "), error.text
  assert get(app, "/v1/nothing").status_code == 404
  assert get(app, "/v1/caption").status_code == 405
  error = post(app, *CASES["50_megapixels"][:1], **CASES["50_megapixels"][1]).json()["error"]
  assert "50,000,000 pixels" in error, error
  error = post(app, *CASES["prompt_10000_chars"][:1], **CASES["prompt_10000_chars"][1])
  assert "10,000 characters" in error.json()["error"]


def test_new_decoding_settings_stop_at_the_limit(app, service, monkeypatch):
  import dataclasses

  used = len(service._settings)
  monkeypatch.setattr(service, "limits", dataclasses.replace(service.limits, max_settings=used))
  body = {"prompt": "a", "decoding": "sample", "temperature": 0.123}
  response = post(app, "/v1/continue", json=body)
  assert response.status_code == 422 and "decoding settings" in response.json()["error"]
  assert post(app, "/v1/continue", json={"prompt": "a"}).status_code == 200  # a known one


def test_no_field_is_read_as_a_path(tmp_path):
  """The request bodies have no field for a file: unknown fields are refused."""
  from m6_jax.serve import schemas

  for model in (schemas.Caption, schemas.Answer, schemas.Continue, schemas.Draw):
    fields = set(model.model_fields)
    assert not fields & {"output_dir", "vqgan_workdir", "workdir", "output", "path"}, model
  assert json.loads(json.dumps(CASES["unknown_field"][1]["json"]))["output_dir"] == "/tmp/x"
