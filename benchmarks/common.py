"""Shared pieces of the benchmarks: build the real jitted train step, time a callable."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from m6_jax.cli import bootstrap  # noqa: E402

# Before JAX starts its backends: with libtpu installed and no TPU chip, the CPU, without
# libtpu's metadata-server probe and its error lines (as `python -m m6_jax.main` does).
bootstrap.choose_platform()

from m6_jax.data.tasks import random_features_batch  # noqa: E402
from m6_jax.train import setup as setup_lib  # noqa: E402


def jax_train_step(config) -> tuple[Callable, Any, Any, Any]:
  """(jitted step, state, device batch, mesh context) for `config` on this machine's devices:
  the train loop's own set-up (m6_jax/train/setup.py)."""
  setup = setup_lib.build(config)
  state = setup.init_state(seed=0)
  with setup.mesh_context():
    device_batch = setup.put_batch(random_features_batch(config.data.batch_size, config))
  return setup.step, state, device_batch, setup.mesh_context()


def cpu_model() -> str:
  """The CPU's 'model name' from /proc/cpuinfo (the platform's processor string elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform

  return platform.processor() or platform.machine()


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 2) -> list[float]:
  """Wall seconds of `reps` calls of fn (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def summarize(times: list[float]) -> dict[str, float]:
  return {
    "median_s": statistics.median(times),
    "min_s": min(times),
    "max_s": max(times),
    "spread": (max(times) - min(times)) / statistics.median(times),
  }


def write_json(path: str, results: Any) -> None:
  """Writes a benchmark's results as JSON (creating the folder) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {path}")
