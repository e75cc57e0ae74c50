"""Process start-up (m6_jax/cli/bootstrap.py): the huge-page restart runs the command again,
once, with the glibc tunable added; the platform is left to the user when they set one. That a
CPU machine with libtpu installed runs on the CPU without TPU error lines, JAX_PLATFORMS unset,
is checked by the user-data CLI run in tests/data/test_prepare_cli.py."""

import os
import subprocess
import sys

import pytest

from m6_jax.cli import bootstrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = (
  "import os, sys; from m6_jax.cli import bootstrap; "
  "print('starts', flush=True); "
  "print(bootstrap.restart_with_huge_pages()); "
  "print('tunables', os.environ.get('GLIBC_TUNABLES')); print('argv', sys.argv[1:])"
)


def _run(env_extra):
  env = {
    k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", bootstrap.RESTART_MARKER)
  }
  env.update(env_extra, PYTHONPATH=REPO)
  out = subprocess.run(
    [sys.executable, "-c", PROBE, "--flag=1"], env=env, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


@pytest.mark.skipif(bootstrap.huge_pages_unavailable() is not None, reason="no THP/glibc >= 2.35")
def test_restart_adds_the_tunable_once_and_keeps_the_command_line():
  lines = _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
  # One restart: the first process prints `starts` and execs; the second prints it again.
  assert lines.count("starts") == 2
  assert "GLIBC_TUNABLES has glibc.malloc.hugetlb=1" in lines[2]
  assert lines[3] == "tunables glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
  assert lines[4] == "argv ['--flag=1']"


def test_no_restart_when_set_or_already_tried():
  lines = _run({"GLIBC_TUNABLES": bootstrap.TUNABLE})
  assert lines.count("starts") == 1 and "GLIBC_TUNABLES has" in lines[1]
  lines = _run({bootstrap.RESTART_MARKER: "1"})
  assert lines.count("starts") == 1 and "did not take effect" in lines[1]
  assert lines[2] == "tunables None"


def test_enabled_reads_the_tunable_list(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert bootstrap.huge_pages_enabled()
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  assert not bootstrap.huge_pages_enabled()


def test_platforms_are_left_alone_when_the_user_sets_them(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert bootstrap.choose_platform() is None
  assert os.environ["JAX_PLATFORMS"] == "cpu"
