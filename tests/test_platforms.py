"""How the JAX platform is chosen (m6_jax/platforms.py). That a CPU machine with libtpu
installed runs on the CPU without TPU error lines, JAX_PLATFORMS unset, is checked by the
user-data CLI run in tests/data/test_prepare_cli.py."""

import os

from m6_jax import platforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_platforms_are_left_alone_when_the_user_sets_them(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert platforms.choose() is None
  assert os.environ["JAX_PLATFORMS"] == "cpu"
