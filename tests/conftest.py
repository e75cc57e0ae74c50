"""Test set-up: 8 fake CPU devices so that sharding is really exercised.

XLA reads the flag when the backend starts, so it must be set before jax is imported.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main_cli(*args: str, devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python -m m6_jax.main ARGS` from the repository root on `devices` CPU devices."""
  flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  return subprocess.run(
    [sys.executable, "-m", "m6_jax.main", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture
def run_main():
  return run_main_cli


def make_random_batch(batch_size: int, config, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch with the feature contract of m6_jax/data/tasks.py, random but valid: some
  examples without an image, ragged source and target lengths, padding id 0."""
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


@pytest.fixture
def random_batch():
  return make_random_batch


@pytest.fixture
def tiny_config():
  """A small model config for unit tests (the real defaults, shrunk)."""
  from m6_jax.config import default_config

  c = default_config()
  c.model.vocab_size = 512
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.head_dim = 16
  c.model.mlp_dim = 128
  c.data.batch_size = 16
  c.data.src_len = 12
  c.data.tgt_len = 10
  c.data.image_size = 32
  c.model.patch_size = 16
  c.train.warmup_steps = 0
  c.train.schedule = "constant"
  return c
