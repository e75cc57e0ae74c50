"""Lint and formatting are part of the suite: `ruff check` and `ruff format --check` (the
settings in pyproject.toml) on the whole repository."""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
  out = subprocess.run(
    [sys.executable, "-m", "ruff", *command, "."], cwd=REPO, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stdout + out.stderr
