"""Span corruption: noise masks, T5 sentinels and BART masks (data/span_corruption.py)."""

import numpy as np
import pytest

from m6_jax.data import span_corruption as K


def _spans(mask):
  """Number of runs of True in a boolean mask."""
  m = np.asarray(mask, dtype=int)
  return int(np.sum(np.diff(np.concatenate([[0], m])) == 1))


def test_noise_mask_density_and_spans():
  rng = np.random.default_rng(0)
  for _ in range(200):
    mask = K.random_spans_noise_mask(100, 0.15, 3.0, rng)
    assert mask.dtype == bool and mask.shape == (100,)
    assert mask.sum() == 15 and _spans(mask) == 5
  # over many random lengths the noise fraction stays near the density
  fractions, first_noise = [], 0
  for _ in range(2000):
    length = int(rng.integers(8, 60))
    mask = K.random_spans_noise_mask(length, 0.15, 3.0, rng)
    assert 0 < mask.sum() < length
    fractions.append(mask.mean())
    first_noise += mask[0]
  assert abs(np.mean(fractions) - 0.15) < 0.02
  assert 0.35 < first_noise / 2000 < 0.65  # spans start at the first token about half the time
  # edge cases: too short to corrupt, span cap
  assert not K.random_spans_noise_mask(1, 0.15, 3.0, rng).any()
  assert _spans(K.random_spans_noise_mask(200, 0.5, 1.0, rng, max_num_spans=4)) == 4


def test_corrupt_and_reconstruct(tokenizer):
  rng = np.random.default_rng(1)
  for _ in range(300):
    ids = rng.integers(100, 300, size=int(rng.integers(2, 40))).tolist()
    mask = K.random_spans_noise_mask(len(ids), 0.3, 2.0, rng)
    source, target = K.corrupt_spans(ids, mask, tokenizer)
    n = _spans(mask)
    assert [t for t in source if tokenizer.is_sentinel(t)] == [
      tokenizer.sentinel_id(k) for k in range(n)
    ]
    assert target[0] == tokenizer.sentinel_id(0)
    assert len(source) == len(ids) - mask.sum() + n
    assert len(target) == mask.sum() + n
    assert K.reconstruct_from_spans(source, target, tokenizer) == ids
    # padding and a trailing EOS are ignored
    assert (
      K.reconstruct_from_spans(source + [0, 0], target + [tokenizer.eos_id, 0], tokenizer) == ids
    )
  with pytest.raises(ValueError, match="sentinel"):
    K.reconstruct_from_spans([tokenizer.sentinel_id(1)], [tokenizer.sentinel_id(0), 7], tokenizer)


def test_replace_spans_uses_one_mask_per_span():
  ids = [10, 11, 12, 13, 14, 15]
  mask = np.array([False, True, True, False, True, False])
  assert K.replace_spans(ids, mask, 4) == [10, 4, 13, 4, 15]
