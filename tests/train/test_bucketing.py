"""Length bucketing in the train loop: config validation, the multi-host re-pad, a short run."""

import json

import numpy as np
import pytest

from m6_jax import config as config_lib
from m6_jax.train import loop, progress


def test_bucket_config_is_validated(tiny_config):
  c = tiny_config  # src_len 12, tgt_len 10
  c.data.length_bucket = 2
  config_lib.validate(c, 1)
  for bucket, window, match in [
    (4, 0, "multiples of data.length_bucket=4"),
    (-1, 0, "length_bucket=-1 must be >= 0"),
    (0, 2, "needs data.length_bucket > 0"),
    (2, -1, "bucket_window=-1 must be >= 0"),
  ]:
    c.data.length_bucket, c.data.bucket_window = bucket, window
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(c, 1)


def _local_batch(rows, src, tgt, fill):
  return {
    "image": np.zeros((rows, 2, 2, 3), np.float32),
    "src_tokens": np.full((rows, src), fill, np.int32),
    "tgt_input": np.full((rows, tgt), fill, np.int32),
    "tgt_target": np.full((rows, tgt), fill, np.int32),
    "tgt_weights": np.ones((rows, tgt), np.float32),
    "task_id": np.zeros((rows,), np.int32),
  }


def test_agree_text_lengths_pads_every_process_to_the_longest():
  """Two fake processes trimmed to (8, 16) and (16, 8) both feed the step (16, 16)."""
  local = [_local_batch(2, 8, 16, 5), _local_batch(2, 16, 8, 7)]
  sent = []

  def allgather(x):
    sent.append(np.asarray(x).tolist())
    return np.stack([[8, 16], [16, 8]])

  out = [loop.agree_text_lengths(b, allgather) for b in local]
  assert sent == [[8, 16], [16, 8]]  # each process sends its own lengths
  for o, b in zip(out, local):
    assert o["src_tokens"].shape == o["tgt_input"].shape == (2, 16)
    assert o["tgt_target"].shape == o["tgt_weights"].shape == (2, 16)
    s, t = b["src_tokens"].shape[1], b["tgt_input"].shape[1]
    np.testing.assert_array_equal(o["src_tokens"][:, :s], b["src_tokens"])
    assert not o["src_tokens"][:, s:].any() and not o["tgt_weights"][:, t:].any()
    np.testing.assert_array_equal(o["image"], b["image"])
  # One process and no gather function: nothing to agree on, the batch is returned as is.
  assert loop.agree_text_lengths(local[0]) is local[0]


def test_text_counts_count_real_tokens_over_computed_positions():
  batch = _local_batch(2, 4, 4, 5)
  batch["src_tokens"][:, 2:] = 0
  batch["tgt_weights"][1, 1:] = 0
  np.testing.assert_array_equal(progress.text_counts(batch, 1), [4 + 5, 16])
  np.testing.assert_array_equal(progress.text_counts(batch, 2), [18, 32])


@pytest.mark.slow
def test_short_training_run_with_bucketing(tiny_config, tokenizer_path, tmp_path):
  c = tiny_config
  c.data.tokenizer_path = tokenizer_path
  c.data.src_len, c.data.tgt_len = 16, 16
  c.data.batch_size = 8
  c.data.num_train_examples = 64
  c.data.length_bucket, c.data.bucket_window = 8, 2
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 4, 2, 100
  c.mesh.data = 2  # fewer devices: quicker compiles of the (at most 4) shapes
  result = loop.train(c, str(tmp_path))
  assert result.final_step == 4 and len(result.losses) == 4
  assert np.isfinite(result.losses).all() and result.losses[-1] < result.losses[0]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  for line in lines:
    # Real tokens only: the fill is below 1 (some padding is left) but well above the
    # unbucketed fill (the synthetic texts fill about a third of 16 + 16 columns).
    assert 0.4 < line["text_fill"] < 1.0, line
    assert line["tokens_per_sec"] > 0 and line["examples_per_sec"] > 0
