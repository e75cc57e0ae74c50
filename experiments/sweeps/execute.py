"""Runs one run of a sweep: its stages one after the other, each a `python -m m6_jax.main`
subprocess in the run's own workdir, with the markers that make a sweep restartable.

<sweep>/runs/<id>/
  run.json        the run: overrides, seed, stages (what its id is the hash of)
  <stage>/        the stage's workdir (checkpoints, metrics.jsonl, config.json, ...)
  <stage>.done    the stage ran to its end (written after the check, then renamed into place)
  FINISHED        every stage done, with the run's final metrics (written, then renamed)
  log.txt         the stages' output
  lock            held (flock) while a process works on the run

A stage without its .done marker is simply run again: training resumes from its latest
checkpoint (m6_jax resumes a workdir that holds one, bit-exactly), evaluation recomputes. A
marker is only ever renamed into place, so a kill leaves it whole or absent.

This module is what a local worker thread and a submitit job both call (`execute`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

from experiments.sweeps import results
from experiments.sweeps.spec import Eval, Run, Train, format_value

FINISHED = "FINISHED"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The stage subprocesses now running in this process, so that a SIGTERM to the runner reaches
# them (they are in sessions of their own: a terminal's Ctrl-C goes to the runner alone).
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()


@dataclasses.dataclass
class Outcome:
  run_id: str
  status: str  # finished, skipped (finished before), interrupted, failed
  message: str = ""
  seconds: float = 0.0


def run_dir(sweep_dir: str, run: Run) -> str:
  return os.path.join(sweep_dir, "runs", run.id)


def is_finished(sweep_dir: str, run: Run) -> bool:
  return os.path.exists(os.path.join(run_dir(sweep_dir, run), FINISHED))


def read_finished(sweep_dir: str, run: Run) -> dict:
  with open(os.path.join(run_dir(sweep_dir, run), FINISHED)) as f:
    return json.load(f)


def write_json_atomically(path: str, obj) -> None:
  """Written to a temporary file, flushed to disk, then renamed: readers (and a restart after
  SIGKILL) see the old file or the whole new one, never half of it."""
  tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=repr)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def signal_children(sig: int) -> None:
  with _CHILDREN_LOCK:
    children = list(_CHILDREN)
  for child in children:
    with contextlib.suppress(ProcessLookupError):
      child.send_signal(sig)


def command(run: Run, stage, directory: str, distributed: bool = False) -> list[str]:
  """The m6_jax.main command line of one stage."""
  cmd = [sys.executable, "-m", "m6_jax.main"]
  if isinstance(stage, Train):
    cmd += [f"--config={stage.config}", f"--workdir={os.path.join(directory, stage.name)}"]
    if stage.init_from:
      cmd.append(f"--config.init_from={os.path.join(directory, stage.init_from)}")
    cmd += [f"--config.{k}={format_value(v)}" for k, v in run.stage_overrides(stage).items()]
  else:
    cmd += ["--mode=eval", f"--workdir={os.path.join(directory, stage.of)}", *stage.args]
    cmd += [f"--split={stage.split}"] if stage.split != "validation" else []
  return cmd + (["--distributed"] if distributed else [])


def _die_with_parent() -> None:
  """In the child before exec (Linux): SIGTERM when the runner dies, even by SIGKILL, so that
  no orphaned run goes on training (SIGTERM: it saves a checkpoint and stops)."""
  _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


try:  # looked up before any fork: the child only calls it
  import ctypes

  _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform == "linux" else None
except OSError:
  _PRCTL = None


@contextlib.contextmanager
def _locked(directory: str, say: Callable[[str], None]) -> Iterator[int]:
  """An exclusive flock on <run>/lock, passed on to the stage subprocesses: the lock lives
  while any of them does, so a restarted sweep waits for a stage process that outlived a
  killed runner (still saving its checkpoint) instead of training next to it."""
  fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      say("waiting for an earlier process of this run to exit")
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield fd
  finally:
    os.close(fd)


def _stage_complete(stage, directory: str) -> tuple[bool, str]:
  """Whether a stage that exited 0 got to its end (a SIGTERM'd training also exits 0)."""
  if isinstance(stage, Eval):
    ok = os.path.exists(os.path.join(directory, stage.of, stage.metrics_file))
    return ok, "" if ok else f"no {stage.metrics_file}"
  workdir = os.path.join(directory, stage.name)
  with open(os.path.join(workdir, "config.json")) as f:
    steps = json.load(f)["train"]["steps"]
  saved = results.checkpoint_steps(workdir)
  last = max(saved, default=0)
  return last == steps, f"stopped at step {last} of {steps}"


def _last_error(log_path: str) -> str:
  """The stage's `error:` line, else the last line of its log."""
  with open(log_path, errors="replace") as f:
    lines = [line.strip() for line in f.readlines()[-200:] if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  return (errors or lines or ["(no output)"])[-1]


def execute(
  run_spec: dict,
  sweep_dir: str,
  should_stop: Callable[[], bool] = lambda: False,
  primary: bool = True,
  distributed: bool = False,
) -> Outcome:
  """Runs the stages of `run_spec` (Run.to_dict()) not yet done. `primary`: this process
  writes the markers (one process of a multi-host run does); `distributed`: the stages join
  a multi-host JAX job (m6_jax.main --distributed)."""
  run = Run.from_dict(run_spec)
  directory = run_dir(sweep_dir, run)
  os.makedirs(directory, exist_ok=True)
  log_path = os.path.join(directory, "log.txt")
  start = time.time()

  def say(text: str) -> None:
    with open(log_path, "a") as log:
      log.write(f"[sweep {time.strftime('%H:%M:%S')}] {text}\n")

  if is_finished(sweep_dir, run):
    return Outcome(run.id, "skipped", "finished before")
  if primary and not os.path.exists(os.path.join(directory, "run.json")):
    write_json_atomically(os.path.join(directory, "run.json"), run.to_dict())
  lock = _locked(directory, say) if primary else contextlib.nullcontext(None)
  with lock as lock_fd:
    if is_finished(sweep_dir, run):  # the process we waited for finished it
      return Outcome(run.id, "skipped", "finished before")
    for stage in run.stages:
      marker = os.path.join(directory, f"{stage.name}.done")
      if os.path.exists(marker):
        continue
      if should_stop():
        return Outcome(run.id, "interrupted", f"before stage {stage.name}", time.time() - start)
      cmd = command(run, stage, directory, distributed)
      say(f"stage {stage.name}: {' '.join(cmd)}")
      with open(log_path, "a") as log:
        child = subprocess.Popen(
          cmd,
          cwd=REPO,
          stdout=log,
          stderr=subprocess.STDOUT,
          stdin=subprocess.DEVNULL,
          start_new_session=True,
          pass_fds=(lock_fd,) if lock_fd is not None else (),
          preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
        with _CHILDREN_LOCK:
          _CHILDREN.add(child)
        try:
          rc = child.wait()
        finally:
          with _CHILDREN_LOCK:
            _CHILDREN.discard(child)
      seconds = time.time() - start
      if rc != 0:
        status = "interrupted" if should_stop() else "failed"
        return Outcome(run.id, status, f"stage {stage.name}: {_last_error(log_path)}", seconds)
      complete, why = _stage_complete(stage, directory)
      if not complete:  # stopped by a signal of its own (a cluster's preemption)
        return Outcome(run.id, "interrupted", f"stage {stage.name} {why}", seconds)
      if primary:
        write_json_atomically(marker, {"finished_at": time.time(), "command": cmd})
      say(f"stage {stage.name}: done")
    if primary:
      record = {
        **run.to_dict(),
        "seed": run.seed,
        "configuration": run.configuration,
        "metrics": results.final_metrics(run, directory),
        "configs": results.stage_configs(run, directory),
        "finished_at": time.time(),
      }
      write_json_atomically(os.path.join(directory, FINISHED), record)
  return Outcome(run.id, "finished", "", time.time() - start)
