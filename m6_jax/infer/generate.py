"""Generation from a trained workdir: captions, VQA answers and text continuations.

    model = load_model(workdir)                       # latest checkpoint + its config/tokenizer
    rows = generate(model, images=["cat.png"], questions=["what color is the circle?"])

An image alone is captioned; an image and a question give the answer; a text prompt (with
or without an image) is the source text whose continuation is generated. Decoding is greedy,
beam search (`beam_size`, `length_penalty`) or sampling (`temperature`, `top_k`, `top_p`,
`seed`), all with the KV cache of `m6_jax.infer.decoding`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.infer import decoding
from m6_jax.model.m6 import M6, M6Config, dummy_batch
from m6_jax.train import checkpointing

DECODINGS = ("greedy", "beam", "sample")


class GenerationError(ValueError):
  """Bad generation input (missing / unreadable image, empty prompt, ...)."""


@dataclasses.dataclass
class LoadedModel:
  config: ml_collections.ConfigDict
  model: M6
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  step: int
  workdir: str


def _saved_config(workdir: str, from_checkpoint: dict | None) -> ml_collections.ConfigDict:
  if from_checkpoint is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise checkpointing.CheckpointError(f"{workdir} has a checkpoint but no config.json.")
    with open(path) as f:
      from_checkpoint = json.load(f)
  # Keys added since the checkpoint was written take their defaults.
  from m6_jax import config as config_lib

  def merge(base: dict, saved: dict) -> dict:
    for k, v in saved.items():
      base[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base

  return ml_collections.ConfigDict(merge(config_lib.default_config().to_dict(), from_checkpoint))


def _tokenizer_for(workdir: str, config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
  path = config.data.get("tokenizer_path", "") or os.path.join(workdir, "tokenizer", "spm.model")
  if not os.path.exists(path):
    raise checkpointing.CheckpointError(
      f"no tokenizer at {path}: the workdir must hold the tokenizer its model was trained with."
    )
  return tokenizer_lib.Tokenizer.from_file(path)


def model_params_shapes(model: M6) -> Any:
  return jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), dummy_batch(model.config), deterministic=True)
  )["params"]


def unboxed_shapes(model: M6) -> Any:
  import flax.linen as nn

  return nn.unbox(model_params_shapes(model))


def load_model(
  workdir: str,
  step: int | None = None,
  config: ml_collections.ConfigDict | None = None,
  best: bool = False,
) -> LoadedModel:
  """The checkpoint `step` (None: latest; `best`: the kept best one) of `workdir` with its
  tokenizer. `config` None uses the checkpoint's own config; a given config must match the
  checkpoint's parameter shapes (else CheckpointError naming the first mismatch)."""
  source = checkpointing.best_dir(workdir) if best else workdir
  params, step, saved = checkpointing.load_params(source, step)
  if config is None:
    config = _saved_config(workdir, saved)
  model = M6(M6Config.from_config(config))
  checkpointing.check_param_shapes(unboxed_shapes(model), params, f"{source} (step {step})")
  return LoadedModel(config, model, params, _tokenizer_for(workdir, config), step, workdir)


def init_model(config: ml_collections.ConfigDict, tokenizer, seed: int = 0) -> LoadedModel:
  """Freshly initialised parameters (the "untrained model" baseline)."""
  import flax.linen as nn

  model = M6(M6Config.from_config(config))
  variables = model.init(jax.random.PRNGKey(seed), dummy_batch(model.config), deterministic=True)
  return LoadedModel(config, model, nn.unbox(variables["params"]), tokenizer, 0, "")


def read_image(path: str, image_size: int) -> np.ndarray:
  """float32 [image_size, image_size, 3] in [0, 1]; GenerationError if missing or unreadable."""
  from PIL import Image, UnidentifiedImageError

  if not os.path.isfile(path):
    raise GenerationError(f"image file not found: {path}")
  try:
    with Image.open(path) as img:
      img = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
      return np.asarray(img, dtype=np.float32) / 255.0
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise GenerationError(f"cannot read image {path}: {e}") from e


def make_inputs(
  model: LoadedModel, images: Sequence[np.ndarray | None], sources: Sequence[str]
) -> dict[str, np.ndarray]:
  """The decoding prefix features for rows (image or None, source text)."""
  d = model.config.data
  size, src_len = int(d.image_size), int(d.src_len)
  n = len(images)
  batch = {
    "image": np.zeros((n, size, size, 3), np.float32),
    "has_image": np.zeros((n,), np.int32),
    "src_tokens": np.zeros((n, src_len), np.int32),
  }
  for i, (image, text) in enumerate(zip(images, sources)):
    if image is not None:
      batch["image"][i] = image
      batch["has_image"][i] = 1
    ids = model.tokenizer.encode(text)[:src_len] if text else []
    batch["src_tokens"][i, : len(ids)] = ids
    if image is None and not ids:
      raise GenerationError("a row has neither an image nor source text; nothing to condition on.")
  return batch


def decode(
  model: LoadedModel,
  batch: dict[str, np.ndarray],
  decoding_method: str = "greedy",
  max_len: int = 0,
  beam_size: int = 4,
  length_penalty: float = 0.6,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
) -> list[str]:
  """Decodes every row of `batch`; returns the texts (EOS and padding removed)."""
  max_len = int(max_len) or int(model.config.data.tgt_len)
  tok = model.tokenizer
  args = (model.model, model.params, batch)
  if decoding_method == "greedy":
    ids = decoding.greedy_decode(*args, max_len, tok.bos_id, tok.eos_id)
  elif decoding_method == "beam":
    seqs, _ = decoding.beam_search(
      *args, beam_size, max_len, tok.bos_id, tok.eos_id, length_penalty
    )
    ids = seqs[:, 0]
  elif decoding_method == "sample":
    ids = decoding.sample(
      *args, jax.random.PRNGKey(seed), max_len, tok.bos_id, tok.eos_id, temperature, top_k, top_p
    )
  else:
    raise GenerationError(f"unknown decoding '{decoding_method}'; one of {DECODINGS}.")
  # An untrained model may pick embedding rows beyond the tokenizer's pieces: dropped.
  return [tok.decode([i for i in row if i < tok.vocab_size]) for row in np.asarray(ids)]


def decode_in_batches(
  model: LoadedModel, images, sources, batch_size: int = 64, **decode_kwargs
) -> list[str]:
  """`decode` over any number of rows, in fixed-size batches (the last one padded)."""
  out: list[str] = []
  for start in range(0, len(sources), batch_size):
    imgs, srcs = list(images[start : start + batch_size]), list(sources[start : start + batch_size])
    real = len(srcs)
    pad = batch_size - real if len(sources) > batch_size else 0
    imgs += [imgs[0]] * pad
    srcs += [srcs[0]] * pad
    out += decode(model, make_inputs(model, imgs, srcs), **decode_kwargs)[:real]
  return out


def generate(
  model: LoadedModel,
  images: Sequence[str] = (),
  questions: Sequence[str] = (),
  prompt: str | None = None,
  **decode_kwargs,
) -> list[dict[str, Any]]:
  """Rows {image, question/prompt, task, output} for the given inputs.

  images alone: captions; images + questions (one question for all images, or one per
  image): answers; a prompt: its continuation (conditioned on the images if any).
  """
  if prompt is not None and not prompt.strip():
    raise GenerationError("the prompt is empty; pass some text with --prompt.")
  if prompt is not None and questions:
    raise GenerationError("pass either --question or --prompt, not both.")
  if not images and prompt is None:
    raise GenerationError(
      "nothing to generate from: pass --image (caption), --image and --question (VQA) "
      "or --prompt (text continuation)."
    )
  questions = list(questions)
  if questions and not images:
    raise GenerationError("--question needs an --image to ask about.")
  if any(not q.strip() for q in questions):
    raise GenerationError("a question is empty; pass some text with --question.")
  if len(questions) > 1 and len(questions) != len(images):
    raise GenerationError(
      f"got {len(questions)} questions for {len(images)} images; pass one question for all "
      "images or one per image."
    )
  size = int(model.config.data.image_size)
  pixels = [read_image(p, size) for p in images] or [None]
  names = list(images) or [None]
  if prompt is not None:
    sources, task, key = [prompt] * len(pixels), "text_generation", "prompt"
  elif questions:
    sources = questions * len(pixels) if len(questions) == 1 else questions
    task, key = "vqa", "question"
  else:
    sources, task, key = [""] * len(pixels), "caption", None
  outputs = decode(model, make_inputs(model, pixels, sources), **decode_kwargs)
  rows = []
  for name, src, out in zip(names, sources, outputs):
    row: dict[str, Any] = {"task": task}
    if name is not None:
      row["image"] = name
    if key:
      row[key] = src
    row["output"] = out
    rows.append(row)
  return rows


def write_jsonl(rows: Sequence[dict], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
