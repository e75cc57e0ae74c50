"""The progress bookkeeping: the device peaks behind the MFU, and the FLOPs it counts."""

import pytest

from m6_jax.config import default_config
from m6_jax.model import param_count
from m6_jax.train import progress


@pytest.mark.parametrize(
  "kind, configured, want",
  [
    ("TPU v5 lite", 0.0, 197e12),  # v5e
    ("TPU v5", 0.0, 459e12),  # v5p
    ("TPU v6 lite", 0.0, 918e12),
    ("NVIDIA H100 80GB HBM3", 0.0, 989e12),
    ("NVIDIA H100 PCIe", 0.0, 756e12),  # not the SXM part's figure
    ("NVIDIA L40S", 0.0, 362e12),  # not L4's, whose name is its prefix
    ("NVIDIA L4", 0.0, 121e12),
    ("cpu", 0.0, None),  # unknown: no MFU
    ("cpu", 2e11, 2e11),  # train.peak_flops wins
    ("TPU v4", 1e12, 1e12),
  ],
)
def test_peak_flops(kind, configured, want):
  assert progress.peak_flops(kind, configured) == want


def test_train_flops_follow_the_batch_text_columns():
  config = default_config()
  counts = param_count.count_params(config)
  full = param_count.train_flops(config, counts)
  trimmed = param_count.train_flops(config, counts, None, 8, 8)  # a length-bucketed batch
  half_batch = param_count.train_flops(config, counts, config.data.batch_size // 2)
  assert 0 < trimmed < full
  assert half_batch == pytest.approx(full / 2)
  # 6 x (non-embedding parameters) per token dominates: within 2x of the whole formula.
  seq = (48 // 16) ** 2 + 32 + 32
  dense = 6 * (counts["active per token"] - counts["embeddings"]) * config.data.batch_size * seq
  assert dense < full < 2 * dense
