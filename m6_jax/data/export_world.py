"""The synthetic world written out as a user's dataset would be: an image folder + JSONL, or
shards in img2dataset's layout (WebDataset tars or Parquet tables).

  python -m m6_jax.main --mode=export_world --output_dir=/tmp/world_files
  python -m m6_jax.main --mode=export_world --format=webdataset --output_dir=/tmp/world_wds

``files`` writes ``images/<split>/<i>.png`` (``.jpg``, JPEG quality 95, with
``image_format="jpg"``) and ``train.jsonl`` / ``validation.jsonl`` with one
line per image: its caption (``--caption_language``: ``zh`` by default, ``en`` or ``both``) and
one question about it with its answer, in the caption's language (the first language for
``both``), picked deterministically from the scene's questions. That is the shape of a
small real dataset (a folder of pictures, a caption and a question each) with known
answers, so the user-data path (``--mode=prepare_data``, ``configs/caption_user_data.py``,
``--mode=eval``) can be walked, and measured, without downloading anything.

``webdataset`` / ``parquet`` write the same records as ``<split>/00000.tar`` (or ``.parquet``)
shards of ``shard_size`` records (m6_jax/data/shard_writer.py): the image (PNG, or JPEG
with ``image_format="jpg"``), the caption as ``.txt``, and the question, answer and image
name in ``.json``; with ``both`` languages an image gives one record per caption (the
question on the first), as ``--mode=prepare_data`` makes of such a line. These are what
``data.source='shards'`` reads.

The train and validation scenes are the world's own splits (no scene in both); the same
flags write the same files.
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterator

import numpy as np
from PIL import Image

from m6_jax.data import shard_writer, synthetic

FORMATS = ("files", *shard_writer.FORMATS)
IMAGE_FORMATS = ("png", "jpg")
SPLITS = ("train", "validation")


def _lines(
  split: str, n: int, image_size: int, caption_language: str, seed: int, image_format: str
) -> Iterator[tuple[str, np.ndarray, dict]]:
  """(relative image path, pixels, JSONL line) of each image of a split."""
  langs = ("zh", "en") if caption_language == "both" else (caption_language,)
  for i in range(n):
    index = synthetic.split_index(split, i)
    ex = synthetic.make_example(seed, index, image_size)
    rel = f"images/{split}/{i}.{image_format}"
    captions = [ex[f"caption_{lang}"] for lang in langs]
    qas = [qa for qa in ex["qa"] if qa["lang"] == langs[0]]
    qa = qas[int(np.random.default_rng([seed, index]).integers(len(qas)))]
    line = {"image": rel, "caption": captions if len(captions) > 1 else captions[0]}
    line.update(question=qa["question"], answer=qa["answer"])
    yield rel, ex["image"], line


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
  buf = io.BytesIO()
  if image_format == "jpg":
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
  else:
    Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def export(
  output_dir: str,
  num_train: int,
  num_validation: int,
  image_size: int = 64,
  caption_language: str = "zh",
  seed: int = 0,
  fmt: str = "files",
  shard_size: int = 1000,
  image_format: str = "png",
) -> dict[str, str]:
  """Writes the files; returns {split: its JSONL path, or its shards' pattern}."""
  if fmt not in FORMATS or image_format not in IMAGE_FORMATS:
    raise ValueError(
      f"format {fmt!r} / image format {image_format!r}: expected {FORMATS} / {IMAGE_FORMATS}"
    )
  out = {}
  for split, n in (("train", num_train), ("validation", num_validation)):
    lines = _lines(split, n, image_size, caption_language, seed, image_format)
    if fmt == "files":
      out[split] = _write_files(output_dir, split, lines, image_format)
    else:
      writer = shard_writer.ShardWriter(os.path.join(output_dir, split), fmt, shard_size)
      for rel, pixels, line in lines:
        image = _encode(pixels, image_format)
        captions = line["caption"] if isinstance(line["caption"], list) else [line["caption"]]
        for k, caption in enumerate(captions):
          qa = {"question": line["question"], "answer": line["answer"]} if k == 0 else {}
          writer.add(image, caption, {"image_key": rel, **qa})
      shards = writer.close()
      ext = os.path.splitext(shards[0])[1]
      last = len(shards) - 1
      pattern = f"{{00000..{last:05d}}}{ext}" if last else f"00000{ext}"
      out[split] = os.path.join(output_dir, split, pattern)
  return out


def _write_files(output_dir: str, split: str, lines, image_format: str) -> str:
  os.makedirs(os.path.join(output_dir, "images", split), exist_ok=True)
  text = []
  for rel, pixels, line in lines:
    with open(os.path.join(output_dir, rel), "wb") as f:
      f.write(_encode(pixels, image_format))
    text.append(json.dumps(line, ensure_ascii=False))
  path = os.path.join(output_dir, f"{split}.jsonl")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write("\n".join(text) + "\n")
  os.replace(path + ".tmp", path)
  return path
