"""Multi-host runs: starting jax.distributed, and the few things processes must agree on.

A multi-host run is one process per host (a TPU VM of a pod slice, a GPU node, or, in tests,
a CPU process on localhost), every process running the same command. After
`jax.distributed.initialize` each process sees all devices of the job (`jax.devices()`)
but feeds and reads only its own (`jax.local_devices()`); the mesh spans the global devices
and every jitted step is one program run by all processes in lockstep. So:

* every process must make the same calls in the same order (jit, checkpoint saves, barriers),
  and decide to stop at the same step (`preemption_sync_point`);
* files shared in the workdir (metrics, config.json, the tokenizer, eval outputs) are written
  by process 0 only; a file the others need is made by process 0 first (`primary_first`);
* Orbax checkpointing is collective: all processes call save/restore, Orbax writes each
  process's shards and lets process 0 finalise the step. The workdir must therefore be a
  file system all hosts share.

On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`, the
default in this JAX version), so a multi-process CPU run needs nothing beyond the flags.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import numpy as np

from m6_jax.errors import DistributedError

T = TypeVar("T")


def check_flags(
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  auto: bool,
) -> dict[str, Any] | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for a 1-process run.

  Explicit flags (`coordinator_address`, `num_processes`, `process_id`) must come all three
  together, and then cluster auto-detection is off. `auto` (--distributed) lets JAX detect
  the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes, or JAX_COORDINATOR_ADDRESS) and fill
  in whichever of the three is not given.
  """
  given = {
    "--coordinator_address": coordinator_address,
    "--num_processes": num_processes,
    "--process_id": process_id,
  }
  if not auto and all(v is None for v in given.values()):
    return None
  if process_id is not None and num_processes is None:
    raise DistributedError(
      f"--process_id={process_id} needs --num_processes (the number of processes in the job)."
    )
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f"--num_processes={num_processes} must be at least 1.")
  if process_id is not None and not 0 <= process_id < num_processes:
    raise DistributedError(
      f"--process_id={process_id} must be in [0, {num_processes}) for "
      f"--num_processes={num_processes}; number the processes 0 .. {num_processes - 1}."
    )
  if coordinator_address is not None:
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise DistributedError(
        f"--coordinator_address={coordinator_address!r} must be host:port (process 0's "
        "address and a free port), e.g. --coordinator_address=10.0.0.1:1234."
      )
  missing = [name for name, value in given.items() if value is None]
  if not auto and missing:
    raise DistributedError(
      f"{' and '.join(missing)} missing: a multi-process run needs --coordinator_address, "
      "--num_processes and --process_id on every process (or --distributed alone, where "
      "JAX can detect the cluster: Cloud TPU, SLURM, Open MPI)."
    )
  kwargs: dict[str, Any] = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  if not missing:
    kwargs["cluster_detection_method"] = "deactivate"  # e.g. SLURM must not override them
  return kwargs


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  auto: bool = False,
) -> bool:
  """Starts jax.distributed when the flags ask for it (before any other JAX use).

  Returns whether it was started. Raises DistributedError for bad flags or a failed start.
  """
  kwargs = check_flags(coordinator_address, num_processes, process_id, auto)
  if kwargs is None:
    return False
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError, RuntimeError) as e:
    detail = " ".join(str(e).split())
    if auto and coordinator_address is None and "coordinator_address" in detail:
      raise DistributedError(
        "--distributed found no cluster to join (not a Cloud TPU pod, SLURM or Open MPI job, "
        "and no JAX_COORDINATOR_ADDRESS); pass --coordinator_address, --num_processes and "
        "--process_id."
      ) from e
    raise DistributedError(
      f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
      f"failed: {detail}"
    ) from e
  return True


def describe() -> str:
  """'process 0 of 2, 4 local / 8 global cpu devices'."""
  return (
    f"process {jax.process_index()} of {jax.process_count()}, "
    f"{jax.local_device_count()} local / {jax.device_count()} global "
    f"{jax.default_backend()} devices"
  )


def is_primary() -> bool:
  """Whether this process writes the files shared in the workdir (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across all processes (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def primary_first(fn: Callable[[], T], name: str) -> T:
  """`fn()` on process 0, then, once it is done, on every other process.

  For work that creates a file in the shared workdir which every process then reads (the
  tokenizer): process 0 makes it while the others wait, then they find it made. If
  process 0 fails, the others still get past the barrier (and usually fail the same way)
  instead of waiting forever; process 0 re-raises its error after the barrier.
  """
  if jax.process_count() == 1:
    return fn()
  error, result = None, None
  if is_primary():
    try:
      result = fn()
    except Exception as e:  # re-raised after the barrier, so nobody waits on a dead process
      error = e
  sync(f"primary_first:{name}")
  if error is not None:
    raise error
  if not is_primary():
    result = fn()
  return result


def to_host(tree: Any) -> Any:
  """A tree of (possibly sharded) global arrays as numpy arrays, whole, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def uses_preemption_service() -> bool:
  """Whether SIGTERM is JAX's to handle: several processes and its preemption service on."""
  return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


def preemption_sync_point(step: int) -> bool:
  """With several processes: whether all of them have agreed to stop (and save) at `step`.

  JAX's preemption service (started by jax.distributed) catches SIGTERM on any process,
  tells the others, and picks one step, the largest step any process has reached plus one,
  at which this returns True on every process. Call it after every step, on every process.
  With one process (or the service turned off) it is always False: the loop's own SIGTERM
  handler covers that case.
  """
  if not uses_preemption_service():
    return False
  from jax.experimental import multihost_utils

  return multihost_utils.reached_preemption_sync_point(step)
