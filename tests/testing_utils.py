"""Helpers shared by test modules (import as `from testing_utils import ...`: pytest puts
tests/ on sys.path; a name other than `conftest`, which tests/data/ has too)."""

from __future__ import annotations

import os

# Tests compile far more than they run (tiny models, a few steps each): XLA's backend
# optimisations cost more compile time than they save at run time here.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_env(devices: int = 1, platforms: str | None = "cpu") -> dict[str, str]:
  """The environment of a subprocess the tests start: `devices` CPU devices and the tests'
  compile flags; `platforms=None` leaves JAX_PLATFORMS unset (as a user would)."""
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)
  if platforms:
    env["JAX_PLATFORMS"] = platforms
  flags = FAST_COMPILE + (
    f" --xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  )
  env["XLA_FLAGS"] = flags
  return env


def assert_every_step_once(records, last_step):
  """Each metrics record covers the steps since the previous one, none twice, none lost."""
  metrics = [r for r in records if "event" not in r]
  steps = [r["step"] for r in metrics]
  assert steps == sorted(set(steps)), steps
  covered = [r["steps_averaged"] + r.get("steps_nonfinite", 0) for r in metrics]
  assert covered == [b - a for a, b in zip([0] + steps, steps)], list(zip(steps, covered))
  assert steps[-1] == last_step
