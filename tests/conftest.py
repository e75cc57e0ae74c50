"""Test set-up: 8 fake CPU devices so that sharding is really exercised.

XLA reads the flag when the backend starts, so it must be set before jax is imported.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from m6_jax.data.tasks import random_features_batch  # noqa: E402

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


@pytest.fixture
def random_batch():
  return random_features_batch


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
