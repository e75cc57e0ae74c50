"""Example -> model features for the M6 tasks.

Every task maps a synthetic-world example (see ``synthetic.make_example``) to the one
feature contract the model consumes; all arrays have fixed shapes:

    image        float32 [H, W, 3] in [0, 1]; all zeros when has_image == 0
    has_image    int32 []   1 if the image is part of the input
    src_tokens   int32 [src_len]  source text ids, right-padded with 0 (may be all padding)
    tgt_input    int32 [tgt_len]  BOS + target ids, right-padded (teacher forcing input)
    tgt_target   int32 [tgt_len]  target ids + EOS, right-padded
    tgt_weights  float32 [tgt_len] 1.0 on real target tokens (EOS included), 0.0 on padding
    task_id      int32 []   index into TASK_NAMES

A task is ``fn(example, tokenizer, rng, cfg) -> features``. All randomness (language, noise
spans, question choice) comes from ``rng``, so a seeded generator makes it reproducible.
``cfg`` is any attribute object (``TaskConfig``, an ml_collections ConfigDict, ...) with

    src_len, tgt_len                       (required)
    noise_density (0.15), mean_noise_span_length (3.0)    (optional, defaults shown)

Over-long texts are truncated so that the source fits ``src_len`` and the target fits
``tgt_len`` with room for BOS (in tgt_input) and EOS (in tgt_target).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

TASK_NAMES = ("text_to_text", "image_to_text", "multimodal_to_text", "vqa")
LANGUAGES = ("en", "zh")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The fields the tasks read (any object with these attributes works)."""

  src_len: int = 32
  tgt_len: int = 32
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0


def _noise_params(cfg) -> tuple[float, float]:
  density = float(getattr(cfg, "noise_density", TaskConfig.noise_density))
  mean_span = float(getattr(cfg, "mean_noise_span_length", TaskConfig.mean_noise_span_length))
  if not 0.0 <= density < 1.0:
    raise ValueError(f"noise_density must be in [0, 1), got {density}")
  if mean_span < 1.0:
    raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_span}")
  return density, mean_span


# --------------------------------------------------------------------------------------
# Span corruption (pure functions, T5-style)
# --------------------------------------------------------------------------------------


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """Splits ``num_items`` into ``num_segments`` non-empty parts, uniformly at random."""
  cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1)
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def _span_counts(
  length: int, noise_density: float, mean_noise_span_length: float, max_num_spans: int | None = None
) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) for a text of ``length``; deterministic."""
  if length < 2 or noise_density <= 0:
    return 0, 0
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  if max_num_spans is not None:
    num_spans = min(num_spans, max_num_spans)
  # Spans are separated by non-noise, so both kinds need at least one token per span.
  num_spans = min(num_spans, num_noise, length - num_noise)
  return num_noise, num_spans


def random_spans_noise_mask(
  length: int,
  noise_density: float,
  mean_noise_span_length: float,
  rng: np.random.Generator,
  max_num_spans: int | None = None,
) -> np.ndarray:
  """Boolean [length] mask, True on noise, as in T5's ``random_spans_noise_mask``.

  Exactly ``round(length * noise_density)`` tokens (at least 1, at most length - 1) are
  noise, split into about ``num_noise / mean_noise_span_length`` spans of random lengths
  that alternate with non-noise runs. Unlike T5 the text starts with a noise span half of
  the time, so the first token can be masked too. Texts shorter than 2 get no noise.
  """
  num_noise, num_spans = _span_counts(length, noise_density, mean_noise_span_length, max_num_spans)
  if num_spans == 0:
    return np.zeros(length, dtype=bool)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  pairs = [(keep_lengths, False), (noise_lengths, True)]
  if rng.random() < 0.5:
    pairs.reverse()
  (first, first_value), (second, second_value) = pairs
  mask = np.empty(length, dtype=bool)
  pos = 0
  for a, b in zip(first, second):
    mask[pos : pos + a] = first_value
    mask[pos + a : pos + a + b] = second_value
    pos += a + b
  return mask


def corrupt_spans(ids: Sequence[int], mask: np.ndarray, tokenizer) -> tuple[list[int], list[int]]:
  """T5 span corruption: (source, target) for ``ids`` with noise ``mask``.

  source: ids with the k-th noise span replaced by sentinel k;
  target: sentinel_0 span_0 sentinel_1 span_1 ...  (empty if there is no noise).
  """
  if len(ids) != len(mask):
    raise ValueError(f"ids and mask differ in length: {len(ids)} vs {len(mask)}")
  source, target = [], []
  k, prev = 0, False
  for tok, noise in zip(ids, mask):
    if noise:
      if not prev:
        if k >= tokenizer.num_sentinels:
          raise ValueError(
            f"mask has more than {tokenizer.num_sentinels} spans, the "
            "number of sentinels of the tokenizer"
          )
        sentinel = tokenizer.sentinel_id(k)
        source.append(sentinel)
        target.append(sentinel)
        k += 1
      target.append(int(tok))
    else:
      source.append(int(tok))
    prev = bool(noise)
  return source, target


def _strip(ids: Sequence[int], tokenizer) -> list[int]:
  """Ids up to the first EOS, without PAD / BOS."""
  out = []
  for i in ids:
    i = int(i)
    if i == tokenizer.eos_id:
      break
    if i not in (tokenizer.pad_id, tokenizer.bos_id):
      out.append(i)
  return out


def reconstruct_from_spans(
  source_ids: Sequence[int], target_ids: Sequence[int], tokenizer
) -> list[int]:
  """Inverse of ``corrupt_spans``: puts the target's spans back into the source.

  Padding, BOS and anything after EOS are ignored, so padded features work directly.
  """
  spans: dict[int, list[int]] = {}
  current = None
  for tok in _strip(target_ids, tokenizer):
    if tokenizer.is_sentinel(tok):
      current = spans.setdefault(tok, [])
    elif current is None:
      raise ValueError("target does not start with a sentinel")
    else:
      current.append(tok)
  out = []
  for tok in _strip(source_ids, tokenizer):
    if tokenizer.is_sentinel(tok):
      if tok not in spans:
        raise ValueError(f"sentinel {tokenizer.id_to_piece(tok)} missing in the target")
      out.extend(spans[tok])
    else:
      out.append(tok)
  return out


def replace_spans(ids: Sequence[int], mask: np.ndarray, replacement_id: int) -> list[int]:
  """BART-style text infilling: each noise span becomes one ``replacement_id`` token."""
  out, prev = [], False
  for tok, noise in zip(ids, mask):
    if noise and not prev:
      out.append(int(replacement_id))
    elif not noise:
      out.append(int(tok))
    prev = bool(noise)
  return out


# --------------------------------------------------------------------------------------
# Feature assembly
# --------------------------------------------------------------------------------------


def _pad(ids: Sequence[int], length: int, what: str) -> np.ndarray:
  if len(ids) > length:  # the task functions truncate first; this guards the contract
    raise ValueError(f"{what} has {len(ids)} tokens, more than its length {length}")
  out = np.zeros(length, dtype=np.int32)
  out[: len(ids)] = ids
  return out


def make_features(
  image: np.ndarray | None,
  image_shape: Sequence[int],
  src: Sequence[int],
  tgt: Sequence[int],
  task_name: str,
  tokenizer,
  cfg,
) -> dict[str, np.ndarray]:
  """Assembles the feature dict; ``tgt`` gets BOS (input) and EOS (target) added here."""
  src_len, tgt_len = int(cfg.src_len), int(cfg.tgt_len)
  if image is None:
    img = np.zeros(image_shape, dtype=np.float32)
  else:
    img = np.asarray(image, dtype=np.float32) / 255.0
  tgt = list(tgt)
  return {
    "image": img,
    "has_image": np.int32(image is not None),
    "src_tokens": _pad(src, src_len, "source"),
    "tgt_input": _pad([tokenizer.bos_id] + tgt, tgt_len, "target input"),
    "tgt_target": _pad(tgt + [tokenizer.eos_id], tgt_len, "target"),
    "tgt_weights": (np.arange(tgt_len) < len(tgt) + 1).astype(np.float32),
    "task_id": np.int32(TASK_NAMES.index(task_name)),
  }


def empty_features(image_shape: Sequence[int], cfg) -> dict[str, np.ndarray]:
  """All-zero features with zero weights: padding rows for a last, partial eval batch."""
  return {
    "image": np.zeros(image_shape, dtype=np.float32),
    "has_image": np.int32(0),
    "src_tokens": np.zeros(int(cfg.src_len), dtype=np.int32),
    "tgt_input": np.zeros(int(cfg.tgt_len), dtype=np.int32),
    "tgt_target": np.zeros(int(cfg.tgt_len), dtype=np.int32),
    "tgt_weights": np.zeros(int(cfg.tgt_len), dtype=np.float32),
    "task_id": np.int32(0),
  }


def _pick_language(rng: np.random.Generator) -> str:
  return LANGUAGES[int(rng.integers(len(LANGUAGES)))]


def _caption_ids(example, tokenizer, rng) -> list[int]:
  return tokenizer.encode(example[f"caption_{_pick_language(rng)}"])


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------


def text_to_text(example, tokenizer, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Text-only span in-filling: corrupted caption -> sentinel-delimited missing spans."""
  density, mean_span = _noise_params(cfg)
  ids = _caption_ids(example, tokenizer, rng)
  # Longest prefix whose corruption fits: the source is never longer than the text, the
  # target is num_noise + num_spans tokens plus EOS; both are known before sampling.
  length = min(len(ids), int(cfg.src_len))
  while length > 0:
    num_noise, num_spans = _span_counts(length, density, mean_span, tokenizer.num_sentinels)
    if num_noise + num_spans + 1 <= int(cfg.tgt_len):
      break
    length -= 1
  ids = ids[:length]
  mask = random_spans_noise_mask(length, density, mean_span, rng, tokenizer.num_sentinels)
  source, target = corrupt_spans(ids, mask, tokenizer)
  return make_features(None, example["image"].shape, source, target, "text_to_text", tokenizer, cfg)


def image_to_text(example, tokenizer, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Captioning: image -> caption (no source text)."""
  ids = _caption_ids(example, tokenizer, rng)[: int(cfg.tgt_len) - 1]
  return make_features(
    example["image"], example["image"].shape, [], ids, "image_to_text", tokenizer, cfg
  )


def multimodal_to_text(example, tokenizer, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Image + caption with spans replaced by <mask> -> the whole original caption."""
  density, mean_span = _noise_params(cfg)
  ids = _caption_ids(example, tokenizer, rng)
  ids = ids[: min(int(cfg.src_len), int(cfg.tgt_len) - 1)]
  mask = random_spans_noise_mask(len(ids), density, mean_span, rng)
  source = replace_spans(ids, mask, tokenizer.mask_id)
  return make_features(
    example["image"], example["image"].shape, source, ids, "multimodal_to_text", tokenizer, cfg
  )


def vqa(example, tokenizer, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Visual question answering: image + question -> answer (in the question's language)."""
  lang = _pick_language(rng)
  candidates = [qa for qa in example["qa"] if qa["lang"] == lang]
  if not candidates:
    raise ValueError(f"example {example.get('index')} has no {lang} question")
  qa = candidates[int(rng.integers(len(candidates)))]
  question = tokenizer.encode(qa["question"])[: int(cfg.src_len)]
  answer = tokenizer.encode(qa["answer"])[: int(cfg.tgt_len) - 1]
  return make_features(
    example["image"], example["image"].shape, question, answer, "vqa", tokenizer, cfg
  )


TaskFn = Callable[[dict, Any, np.random.Generator, Any], dict]
TASKS: dict[str, TaskFn] = {
  "text_to_text": text_to_text,
  "image_to_text": image_to_text,
  "multimodal_to_text": multimodal_to_text,
  "vqa": vqa,
}
assert tuple(TASKS) == TASK_NAMES


def random_features_batch(batch_size: int, config, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of this feature contract, random but valid (for tests, benchmarks and
  compilation): some examples without an image, ragged source and target lengths, padding
  id 0, BOS first. `config` is a full config (reads model.vocab_size and data.*)."""
  rng = np.random.default_rng(seed)
  d, vocab = config.data, config.model.vocab_size
  src_lens = rng.integers(0, d.src_len + 1, batch_size)
  tgt_lens = rng.integers(1, d.tgt_len + 1, batch_size)
  src = rng.integers(4, vocab, (batch_size, d.src_len))
  tgt = rng.integers(4, vocab, (batch_size, d.tgt_len + 1))
  pos_s, pos_t = np.arange(d.src_len)[None], np.arange(d.tgt_len)[None]
  src = np.where(pos_s < src_lens[:, None], src, 0)
  tgt_input = np.where(pos_t < tgt_lens[:, None], tgt[:, :-1], 0)
  tgt_input[:, 0] = 2  # BOS
  tgt_target = np.where(pos_t < tgt_lens[:, None], tgt[:, 1:], 0)
  has_image = rng.integers(0, 2, batch_size)
  # Text-only examples need some source text so that every example has a real prefix.
  src[:, 0] = np.where(has_image == 0, rng.integers(4, vocab, batch_size), src[:, 0])
  image = rng.random((batch_size, d.image_size, d.image_size, 3), dtype=np.float32)
  return {
    "image": image * has_image[:, None, None, None].astype(np.float32),
    "has_image": has_image.astype(np.int32),
    "src_tokens": src.astype(np.int32),
    "tgt_input": tgt_input.astype(np.int32),
    "tgt_target": tgt_target.astype(np.int32),
    "tgt_weights": (pos_t < tgt_lens[:, None]).astype(np.float32),
    "task_id": rng.integers(0, 4, batch_size).astype(np.int32),
  }
