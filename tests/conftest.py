"""Test set-up: 8 fake CPU devices so that sharding is really exercised, and one XLA
compilation cache per test session.

XLA reads the flags when the backend starts, so they must be set before jax is imported.

The cache: many tests compile the same programs again (a resumed run compiles the step of
the uninterrupted one, every CLI subprocess compiles the decoder of the last), which took
about half of the suite's time on 2 cores. The cache directory is new for every session
(shared by the xdist workers and the subprocesses they start, removed at the end), so no
test depends on what an earlier session compiled.
"""

import os
import shutil
import subprocess
import sys
import tempfile

from testing_utils import FAST_COMPILE, cpu_env  # noqa: E402 (tests/ is on sys.path here)

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Made by the first process of the session (the xdist controller, which its workers inherit
# the environment from, or the only process); a cache the caller set up is left alone.
_MADE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _MADE_CACHE = tempfile.mkdtemp(prefix="m6_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _MADE_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pytest  # noqa: E402

from m6_jax.data.tasks import random_features_batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_sessionfinish(session):
  """The session's compilation cache goes with it."""
  if _MADE_CACHE is not None:
    shutil.rmtree(_MADE_CACHE, ignore_errors=True)


def run_main_cli(
  *args: str, devices: int = 1, timeout: int = 300, platforms: str | None = "cpu"
) -> subprocess.CompletedProcess:
  """`python -m m6_jax.main ARGS` from the repository root on `devices` CPU devices
  (`platforms=None`: JAX_PLATFORMS unset, as a user has it)."""
  return subprocess.run(
    [sys.executable, "-m", "m6_jax.main", *args],
    cwd=REPO,
    env=cpu_env(devices, platforms),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture(scope="session")
def run_main():
  return run_main_cli


@pytest.fixture
def random_batch():
  return random_features_batch


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
  """A small sentencepiece model (512 pieces, 300 synthetic scenes) for training tests."""
  from m6_jax.data import tokenizer as tokenizer_lib

  workdir = str(tmp_path_factory.mktemp("tok"))
  tokenizer_lib.get_or_train_tokenizer(workdir, vocab_size=512, seed=0, num_corpus_examples=300)
  return os.path.join(workdir, "tokenizer", "spm.model")


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
