"""Where the runs of a sweep execute: a local pool of `--parallel` runs at a time, or jobs
submitted through submitit (Slurm; submitit's `local` cluster runs the same jobs here).

Local: each run is a chain of `python -m m6_jax.main` subprocesses (execute.py), so the pool
is threads that start and wait for processes; the runs themselves are separate processes.
SIGTERM or Ctrl-C to the runner stops starting runs and passes SIGTERM on to the running
stages, which save a checkpoint and exit; a second Ctrl-C passes SIGINT on (they stop at
once, without saving), as it does for a single run.

submitit: one job per unfinished run (a job array of at most `--parallel` at a time). A job
is checkpointable: at a Slurm timeout or preemption it passes SIGTERM on to its stage (which
saves) and is requeued, and the requeued job resumes the run from its checkpoint. With
`--slurm_nodes` > 1 every node runs the stages with `--distributed` and node 0 alone writes
the markers.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
from typing import Callable

from experiments.sweeps import execute
from experiments.sweeps.spec import Run

Report = Callable[[Run, execute.Outcome], None]


class Interrupted(Exception):
  """The runner was asked to stop (SIGTERM, Ctrl-C); the running stages have saved."""

  def __init__(self, name: str):
    super().__init__(name)
    self.name = name


class _StopOnSignal:
  """Installs the runner's SIGTERM / SIGINT handlers for the duration of a `with`."""

  def __init__(self):
    self.stop = threading.Event()
    self.signal_name = ""
    self._previous = {}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.stop.is_set():
      execute.signal_children(signal.SIGINT)  # a second Ctrl-C: no saving
      return
    self.signal_name = self.signal_name or signal.Signals(signum).name
    self.stop.set()
    execute.signal_children(signal.SIGTERM)

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def run_local(runs: list[Run], sweep_dir: str, parallel: int, report: Report) -> list:
  """Runs `runs` (in order) `parallel` at a time; raises Interrupted after a signal, once
  the running stages have exited."""
  outcomes = []
  with _StopOnSignal() as stopper:
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
      futures = {
        pool.submit(execute.execute, run.to_dict(), sweep_dir, stopper.stop.is_set): (i, run)
        for i, run in enumerate(runs)
      }
      pending = set(futures)
      while pending:  # short waits: the main thread must come back to run signal handlers
        done, pending = concurrent.futures.wait(pending, timeout=0.5)
        for future in sorted(done, key=lambda f: futures[f][0]):
          i, run = futures[future]
          outcomes.append(future.result())
          report(run, outcomes[-1])
    if stopper.stop.is_set():
      raise Interrupted(stopper.signal_name)
  return outcomes


try:  # only the submitit launcher needs it
  from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:
  _Checkpointable = object


class SweepJob(_Checkpointable):
  """The submitit job of one run. Checkpointable: at a Slurm timeout or preemption submitit
  calls `checkpoint`, the stage is told to save, and the requeued job resumes the run."""

  def __call__(self, run_spec: dict, sweep_dir: str) -> execute.Outcome:
    import submitit

    env = submitit.JobEnvironment()
    return execute.execute(
      run_spec, sweep_dir, primary=env.global_rank == 0, distributed=env.num_nodes > 1
    )

  def checkpoint(self, run_spec: dict, sweep_dir: str):
    execute.signal_children(signal.SIGTERM)
    return super().checkpoint(run_spec, sweep_dir)


def run_submitit(runs: list[Run], sweep_dir: str, options: dict, report: Report) -> list:
  """Submits one job per run and waits for them. `options`: cluster (None: Slurm when
  available, else local), parallel, timeout_min, slurm_partition, slurm_nodes,
  gpus_per_node, cpus_per_task."""
  import os

  import submitit

  executor = submitit.AutoExecutor(
    folder=os.path.join(sweep_dir, "submitit", "%j"), cluster=options.get("cluster")
  )
  params = {"timeout_min": options["timeout_min"], "name": os.path.basename(sweep_dir)}
  if executor.cluster == "slurm":
    params.update(
      slurm_partition=options.get("slurm_partition") or None,
      slurm_array_parallelism=options["parallel"],
      nodes=options.get("slurm_nodes", 1),
      tasks_per_node=1,
      gpus_per_node=options.get("gpus_per_node", 0),
      cpus_per_task=options.get("cpus_per_task", 1),
    )
  executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
  jobs = executor.map_array(SweepJob(), [r.to_dict() for r in runs], [sweep_dir] * len(runs))
  outcomes = []
  try:
    for run, submitted in zip(runs, jobs):
      try:
        outcome = submitted.result()
      except Exception as e:  # noqa: BLE001 (a failed job is reported, the others go on)
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        outcome = execute.Outcome(run.id, "failed", f"job {submitted.job_id}: {lines[-1:]}")
      outcomes.append(outcome)
      report(run, outcome)
  except KeyboardInterrupt:
    raise Interrupted("SIGINT") from None
  return outcomes
