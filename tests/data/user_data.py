"""Shared by the user-data tests: writing images and JSONL files, a small image folder."""

import io
import json

from PIL import Image

from m6_jax.data import synthetic as S

MAX_CHARS = 200


def encode(array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def write_jsonl(path, lines):
  """``lines``: dicts (written as JSON) or raw bytes (written as they are)."""
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode())
      f.write(b"\n")


def small_folder(root, n=10, bad=0):
  (root / "img").mkdir(exist_ok=True)
  lines = []
  for i in range(n):
    (root / f"img/{i}.png").write_bytes(encode(S.make_example(2, i)["image"], "PNG"))
    lines.append({"image": f"img/{i}.png", "caption": f"caption {i}", "id": f"s{i}"})
  lines += [{"image": "img/missing.png", "caption": "gone", "id": f"m{k}"} for k in range(bad)]
  write_jsonl(root / "data.jsonl", lines)
  return str(root / "data.jsonl")
