"""Transparent huge pages for large host buffers: a restart of the process with a glibc tunable.

Why: XLA:CPU allocates its temporary buffers afresh for every execution of a jitted step, and
glibc serves every request above 32 MiB with a new mmap that it unmaps on free. The kernel then
faults in, and zeroes, every 4 KiB page of those buffers on first touch at every step: about
177,000 page faults per step of the `medium_scan` benchmark model (726 MB). With glibc's
`glibc.malloc.hugetlb=1` tunable (glibc >= 2.35), malloc asks for transparent huge pages on
those mappings, so a step takes a few hundred 2 MiB faults instead. Measured on a 2-core CPU:
the base train step went from about 200 ms to 150 ms and the medium_scan step from 2.80 s to
2.64 s (benchmarks/train_step.py, docs/performance.md).

glibc reads its tunables once, when the process starts, so the only way to turn this on from
Python is to exec the same command line again with the tunable in the environment. That keeps
the process id, so signal handling and supervisors are unaffected.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# Set on the restarted process, so a failed or refused restart never loops.
_MARKER = "M6_JAX_HOST_MEMORY_RESTARTED"


def enabled() -> bool:
  """Whether this process runs with the huge-page tunable."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def unavailable_reason() -> str | None:
  """Why the tunable cannot help here (None when it can)."""
  if not sys.platform.startswith("linux"):
    return "not Linux"
  libc, version = platform.libc_ver()
  if libc != "glibc":
    return "the C library is not glibc"
  try:
    if tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
      return f"glibc {version} is older than 2.35"
  except ValueError:
    return f"unknown glibc version {version!r}"
  try:
    with open(_THP_SETTING) as f:
      if "[never]" in f.read():
        return "transparent huge pages are disabled ([never])"
  except OSError:
    return f"{_THP_SETTING} is missing"
  return None


def restart_with_huge_pages() -> str:
  """Execs this command line again with the tunable, when it is missing and can help.

  Returns (only when no restart happens) a line saying why not, for the log."""
  if enabled():
    return f"host memory: GLIBC_TUNABLES has {TUNABLE} (transparent huge pages)"
  if os.environ.get(_MARKER):
    return "host memory: restart with huge pages did not take effect; running without them"
  reason = unavailable_reason()
  if reason:
    return f"host memory: no transparent huge pages ({reason})"
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLE]))
  env[_MARKER] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv is the command line as given (`python -m m6_jax.main ...` included).
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  raise AssertionError("unreachable")  # pragma: no cover
