"""The huge-page restart: the command runs again, once, with the glibc tunable added."""

import os
import subprocess
import sys

import pytest

from m6_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
  "import os, sys; from m6_jax import host_memory; "
  "print('starts', flush=True); "
  "print(host_memory.restart_with_huge_pages()); "
  "print('tunables', os.environ.get('GLIBC_TUNABLES')); print('argv', sys.argv[1:])"
)


def _run(env_extra):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory._MARKER)}
  env.update(env_extra, PYTHONPATH=REPO)
  out = subprocess.run(
    [sys.executable, "-c", PROBE, "--flag=1"], env=env, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


@pytest.mark.skipif(host_memory.unavailable_reason() is not None, reason="no THP/glibc >= 2.35")
def test_restart_adds_the_tunable_once_and_keeps_the_command_line():
  lines = _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
  # One restart: the first process prints `starts` and execs; the second prints it again.
  assert lines.count("starts") == 2
  assert "GLIBC_TUNABLES has glibc.malloc.hugetlb=1" in lines[2]
  assert lines[3] == "tunables glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
  assert lines[4] == "argv ['--flag=1']"


def test_no_restart_when_set_or_already_tried():
  lines = _run({"GLIBC_TUNABLES": host_memory.TUNABLE})
  assert lines.count("starts") == 1 and "GLIBC_TUNABLES has" in lines[1]
  lines = _run({host_memory._MARKER: "1"})
  assert lines.count("starts") == 1 and "did not take effect" in lines[1]
  assert lines[2] == "tunables None"


def test_enabled_reads_the_tunable_list(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert host_memory.enabled()
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  assert not host_memory.enabled()
