"""Span corruption for the text tasks (pure functions, T5 and BART style).

    mask = random_spans_noise_mask(len(ids), 0.15, 3.0, rng)   # which tokens are noise
    source, target = corrupt_spans(ids, mask, tokenizer)       # T5: sentinel per span
    source = replace_spans(ids, mask, tokenizer.mask_id)       # BART: one <mask> per span

All randomness comes from the `rng` argument, so a seeded generator reproduces the masks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def noise_params(cfg) -> tuple[float, float]:
  """(noise_density, mean_noise_span_length) of a task config (defaults when absent), checked."""
  density = float(getattr(cfg, "noise_density", NOISE_DENSITY))
  mean_span = float(getattr(cfg, "mean_noise_span_length", MEAN_NOISE_SPAN_LENGTH))
  if not 0.0 <= density < 1.0:
    raise ValueError(f"noise_density must be in [0, 1), got {density}")
  if mean_span < 1.0:
    raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_span}")
  return density, mean_span


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """Splits ``num_items`` into ``num_segments`` non-empty parts, uniformly at random."""
  cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1)
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def span_counts(
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
  num_noise, num_spans = span_counts(length, noise_density, mean_noise_span_length, max_num_spans)
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
