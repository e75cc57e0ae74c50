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


from m6_jax.data.tasks import TASK_NAMES, random_features_batch  # noqa: E402
from m6_jax.model.m6 import M6, M6Config  # noqa: E402
from m6_jax.parallel import partitioning  # noqa: E402
from m6_jax.train import optim  # noqa: E402
from m6_jax.train import state as state_lib  # noqa: E402
from m6_jax.train import step as step_lib  # noqa: E402


def jax_train_step(config) -> tuple[Callable, Any, Any, Any]:
  """(jitted step, state, device batch, mesh context) for `config` on this machine's devices."""
  mesh = partitioning.make_mesh(config)
  rules = partitioning.logical_rules(config)
  model = M6(M6Config.from_config(config))
  tx = optim.make_optimizer(config.train)
  state, shardings = state_lib.create_sharded_state(model, tx, mesh, rules, seed=0)
  batch = random_features_batch(config.data.batch_size, config)
  batch_sh = partitioning.batch_shardings(batch, mesh, rules)
  step = step_lib.jit_train_step(
    step_lib.make_train_step(
      model, tx, optim.learning_rate_schedule(config.train), config.train, len(TASK_NAMES)
    ),
    shardings,
    batch_sh,
    partitioning.replicated(mesh),
  )
  context = partitioning.mesh_context(mesh, rules)
  with context:
    device_batch = partitioning.host_batch_to_global(batch, batch_sh)
  return step, state, device_batch, partitioning.mesh_context(mesh, rules)


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
