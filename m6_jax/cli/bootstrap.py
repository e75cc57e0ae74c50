"""Process start-up, before any mode runs and before JAX starts: logging, transparent huge
pages for the host's large buffers, the JAX platform, and `jax.distributed` for multi-host
runs. `start()` does all four, in that order, from the flags defined here.

**Huge pages.** XLA:CPU allocates its temporary buffers afresh at every execution of a jitted
step, and glibc serves each request above 32 MiB with a new mmap that it unmaps on free, so
the kernel faults in and zeroes every 4 KiB page of them at every step. glibc's
`glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) makes malloc ask for transparent huge pages
instead (docs/performance.md has the measurements). glibc reads tunables once, at process
start, so the only way to turn it on from Python is to exec the same command line again with
the tunable set; that keeps the process id, so signals and supervisors are unaffected.

**Platform.** With libtpu installed (requirements-aot.txt, for the AOT compiles), JAX tries
the TPU backend at every start; on a machine without TPU chips libtpu then asks the cloud
metadata server for a TPU and prints error lines before JAX falls back to the CPU. Where
there is no TPU chip (no Google device on the PCI bus) and no NVIDIA GPU, the CPU is chosen
before JAX starts. A TPU VM, a GPU machine, or a JAX_PLATFORMS the user set is left alone.
"""

from __future__ import annotations

import glob
import importlib.util
import logging as pylogging
import os
import platform
import sys

from absl import flags, logging

DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Join a multi-process JAX job whose set-up JAX detects (Cloud TPU pod slice, SLURM, Open "
  "MPI, or the JAX_COORDINATOR_ADDRESS environment variable); the flags below, if given, "
  "override what is detected. Run the same command on every host.",
)
COORDINATOR_ADDRESS = flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-process job without auto-detection: host:port of process 0 (a port free there), the "
  "same on every process; needs --num_processes and --process_id.",
)
NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Multi-process job: the number of processes (usually one per host)."
)
PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "Multi-process job: this process's number, 0 .. --num_processes - 1."
)
HUGE_PAGES = flags.DEFINE_bool(
  "huge_pages",
  True,
  "Restart once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (Linux, glibc >= 2.35) so that "
  "large host buffers use transparent huge pages instead of faulting in 4 KiB pages at "
  "every step (--nohuge_pages: off).",
)

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# Set on the restarted process, so a failed or refused restart never loops.
RESTART_MARKER = "M6_JAX_HOST_MEMORY_RESTARTED"
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are Google PCI devices
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


class QuietLibraries(pylogging.Filter):
  """Keeps our INFO progress lines readable: libraries only speak up at WARNING or above."""

  NOISY = ("/orbax/", "/grain/", "/jax/", "/tensorstore/")

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or not any(
      part in record.pathname for part in self.NOISY
    )


def quiet_libraries() -> None:
  """INFO logging with QuietLibraries, for the command line and the notebooks alike: on
  absl's handler (which prints on the command line) and on absl's logger, through which
  the libraries' absl records pass whatever handler prints them (a notebook's is the one
  `logging.basicConfig` adds)."""
  logging.set_verbosity(logging.INFO)
  for target in (logging.get_absl_handler(), logging.get_absl_logger()):
    if not any(isinstance(f, QuietLibraries) for f in target.filters):
      target.addFilter(QuietLibraries())


# --------------------------------------------------------------------------------------
# Huge pages
# --------------------------------------------------------------------------------------


def huge_pages_enabled() -> bool:
  """Whether this process runs with the huge-page tunable."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def huge_pages_unavailable() -> str | None:
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
  if huge_pages_enabled():
    return f"host memory: GLIBC_TUNABLES has {TUNABLE} (transparent huge pages)"
  if os.environ.get(RESTART_MARKER):
    return "host memory: restart with huge pages did not take effect; running without them"
  reason = huge_pages_unavailable()
  if reason:
    return f"host memory: no transparent huge pages ({reason})"
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLE]))
  env[RESTART_MARKER] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv is the command line as given (`python -m m6_jax.main ...` included).
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------
# Platform
# --------------------------------------------------------------------------------------


def has_tpu_chip() -> bool:
  """Whether a TPU chip is on the PCI bus (JAX's own test)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def choose_platform() -> str | None:
  """Sets JAX_PLATFORMS=cpu when libtpu is installed on a machine with neither a TPU chip nor
  an NVIDIA GPU and the user set no platforms; returns a line saying so, else None. Call it
  before anything initialises JAX's backends."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return None
  if has_tpu_chip() or any(os.path.exists(d) for d in _NVIDIA_DEVICES):
    return None
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported already: it read the variable then, so tell its config
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  return "JAX platforms: cpu (libtpu is installed, but this machine has no TPU chip)."


# --------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------


def start() -> None:
  """Logging, huge pages (may restart the process), platform, then jax.distributed when the
  flags ask for it; a DistributedError for flags that cannot start it."""
  quiet_libraries()
  if HUGE_PAGES.value:  # first: it may restart the process
    try:
      logging.info(restart_with_huge_pages())
    except OSError as e:
      logging.warning("host memory: restart with huge pages failed (%s); running without", e)
  chosen = choose_platform()
  if chosen:
    logging.info(chosen)
  # jax.distributed must start before anything else uses JAX.
  from m6_jax.parallel import multihost

  if multihost.initialize(
    COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value, DISTRIBUTED.value
  ):
    logging.info("JAX distributed: %s.", multihost.describe())
