"""The synthetic world written out as a user's dataset would be: an image folder + JSONL.

  python -m m6_jax.main --mode=export_world --output_dir=/tmp/world_files

writes ``images/<split>/<i>.png`` and ``train.jsonl`` / ``validation.jsonl`` with one line per
image: its caption (``--caption_language``: ``zh`` by default, ``en`` or ``both``) and one
question about it with its answer, in the caption's language (the first language for
``both``), picked deterministically from the scene's questions. That is the shape of a
small real dataset (a folder of pictures, a caption and a question each) with known
answers, so the user-data path (``--mode=prepare_data``, ``configs/caption_user_data.py``,
``--mode=eval``) can be walked, and measured, without downloading anything. The train and
validation scenes are the world's own splits (no scene in both); the same flags write the
same files.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from m6_jax.data import synthetic


def export(
  output_dir: str,
  num_train: int,
  num_validation: int,
  image_size: int = 64,
  caption_language: str = "zh",
  seed: int = 0,
) -> dict[str, str]:
  """Writes the files; returns {split: its JSONL path}."""
  langs = ("zh", "en") if caption_language == "both" else (caption_language,)
  out = {}
  for split, n in (("train", num_train), ("validation", num_validation)):
    os.makedirs(os.path.join(output_dir, "images", split), exist_ok=True)
    lines = []
    for i in range(n):
      index = synthetic.split_index(split, i)
      ex = synthetic.make_example(seed, index, image_size)
      rel = f"images/{split}/{i}.png"
      Image.fromarray(ex["image"]).save(os.path.join(output_dir, rel))
      captions = [ex[f"caption_{lang}"] for lang in langs]
      qas = [qa for qa in ex["qa"] if qa["lang"] == langs[0]]
      qa = qas[int(np.random.default_rng([seed, index]).integers(len(qas)))]
      line = {"image": rel, "caption": captions if len(captions) > 1 else captions[0]}
      line.update(question=qa["question"], answer=qa["answer"])
      lines.append(json.dumps(line, ensure_ascii=False))
    path = os.path.join(output_dir, f"{split}.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    out[split] = path
  return out
