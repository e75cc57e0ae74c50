"""Shared by the user-data tests: writing images and JSONL files, a small image folder."""

import io
import json
import tarfile

from PIL import Image

from m6_jax.data import synthetic as S

MAX_CHARS = 200
# The world as shards (tests/data/conftest.py's `world`): records, shard size, image size.
NUM_TRAIN, NUM_VALIDATION, SHARD_SIZE, IMAGE_SIZE = 12, 4, 5, 32


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


def write_tar(path, samples, cut=0):
  """A tar shard of ``samples``: (key, {ext: bytes}); ``cut`` bytes dropped from the end."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  data = buf.getvalue()
  path.write_bytes(data[: len(data) - cut] if cut else data)
