"""A CPU machine with libtpu installed (the test requirements bring it) runs on the CPU
without TPU error lines, and without the user setting JAX_PLATFORMS."""

import importlib.util
import os
import subprocess
import sys

import pytest
from testing_utils import cpu_env

from m6_jax import platforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None or platforms._has_tpu_chip(),
  reason="only meaningful where libtpu is installed on a machine without TPU chips",
)
def test_a_short_run_prints_no_tpu_errors(tmp_path):
  env = cpu_env(platforms=None)  # JAX_PLATFORMS unset, as a user has it
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "m6_jax.main",
      "--config=configs/base.py:runlocal",
      f"--workdir={tmp_path}",
      "--config.train.steps=2",
      "--config.model.num_layers=1",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "JAX platforms: cpu" in proc.stderr
  for noise in ("host bounds", "TPU_WORKER_HOSTNAMES", "E0000", "libtpu_init"):
    assert noise not in proc.stderr, proc.stderr[-3000:]


def test_platforms_are_left_alone_when_the_user_sets_them(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert platforms.choose() is None
  assert os.environ["JAX_PLATFORMS"] == "cpu"
