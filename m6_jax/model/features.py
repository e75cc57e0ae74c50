"""The batch the model consumes: one feature contract for the data pipeline, training,
ahead-of-time compilation and decoding (NumPy only, no JAX).

    image        float32 [b, H, W, 3] in [0, 1]; all zeros when has_image == 0
    has_image    int32   [b]   1 if the image is part of the input
    src_tokens   int32   [b, src_len]  source text ids, right-padded with PAD_ID (may be all pad)
    tgt_input    int32   [b, tgt_len]  BOS + target ids, right-padded (teacher forcing input)
    tgt_target   int32   [b, tgt_len]  target ids + EOS, right-padded
    tgt_weights  float32 [b, tgt_len]  1.0 on real target tokens (EOS included), 0.0 on padding
    task_id      int32   [b]   the task's index in the task registry (m6_jax/data/tasks.py)

A length-bucketed batch may have fewer text columns than src_len / tgt_len (see
m6_jax/model/m6.py); the other dimensions are fixed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD_ID = 0
FEATURES = ("image", "has_image", "src_tokens", "tgt_input", "tgt_target", "tgt_weights", "task_id")
# What encoding the prefix for decoding reads.
PREFIX_FEATURES = ("image", "has_image", "src_tokens")


def feature_shapes(
  image_size: int, src_len: int, tgt_len: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{feature: (shape of one example, dtype)}."""
  f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
  return {
    "image": ((image_size, image_size, 3), f32),
    "has_image": ((), i32),
    "src_tokens": ((src_len,), i32),
    "tgt_input": ((tgt_len,), i32),
    "tgt_target": ((tgt_len,), i32),
    "tgt_weights": ((tgt_len,), f32),
    "task_id": ((), i32),
  }


def config_shapes(data_config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """`feature_shapes` at the lengths of a config's `data` section."""
  d = data_config
  return feature_shapes(int(d.image_size), int(d.src_len), int(d.tgt_len))


def zeros(
  shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
  batch_size: int | None = None,
  keys: Sequence[str] = FEATURES,
) -> dict[str, np.ndarray]:
  """All-zero features (one example when `batch_size` is None, else a batch)."""
  lead = () if batch_size is None else (int(batch_size),)
  return {k: np.zeros(lead + shapes[k][0], shapes[k][1]) for k in keys}


def pixels(image: np.ndarray) -> np.ndarray:
  """uint8 RGB [..., H, W, 3] -> the model's float32 [0, 1] image feature."""
  return np.asarray(image, dtype=np.float32) / 255.0
