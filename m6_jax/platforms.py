"""Which JAX platforms a command uses when the user sets none: no TPU backend without a TPU.

With libtpu installed (requirements-test.txt and requirements-aot.txt bring it, for the AOT
compiles), JAX tries the TPU backend on every start. On a machine without TPU chips libtpu
then asks the cloud metadata server for the TPU type and the worker hostnames and, depending
on how that query fails, prints `Failed to find host bounds for accelerator type` and
`E0000 ... unexpected worker hostname` lines before JAX falls back to the CPU. Where there is
no TPU chip (JAX's own test: no Google TPU device on the PCI bus) and no NVIDIA GPU, we
choose the CPU before JAX starts. A TPU VM, a GPU machine, or a JAX_PLATFORMS the user set
is left to JAX.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are Google PCI devices
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def _has_tpu_chip() -> bool:
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def choose() -> str | None:
  """Sets JAX_PLATFORMS=cpu when libtpu is installed on a machine with neither a TPU chip nor
  an NVIDIA GPU and the user set no platforms; returns a line saying so, else None. Call it
  before anything initialises JAX's backends."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return None
  if _has_tpu_chip() or any(os.path.exists(d) for d in _NVIDIA_DEVICES):
    return None
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported already: it read the variable then, so tell its config
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  return "JAX platforms: cpu (libtpu is installed, but this machine has no TPU chip)."
