"""SIGTERM (how clusters preempt) and Ctrl-C mid-run: the run finishes the step, saves, exits
cleanly, and the rerun resumes bit-exactly (its final state equals an uninterrupted run's);
after SIGKILL it resumes from the last checkpoint. metrics.jsonl holds every step once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from testing_utils import TINY_RUN, assert_every_step_once, cpu_env

# Multi-process / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(workdir, steps, tokenizer, log_every=1000, checkpoint_every=100000):
  """A tiny base run; a constant learning rate, so that a step's update does not depend on
  train.steps (which differs between the runs compared here). The tiny model and the
  session's tokenizer (conftest.py) instead of one trained in every workdir: each run is
  mostly start-up, and every run of this file compiles the same programs (the session's
  compilation cache has them after the first)."""
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "m6_jax.main",
      "--config=configs/base.py:runlocal",
      f"--workdir={workdir}",
      f"--config.train.steps={steps}",
      f"--config.train.log_every={log_every}",
      f"--config.train.checkpoint_every={checkpoint_every}",
      "--config.train.keep_checkpoints=100",
      "--config.train.schedule=constant",
      "--config.train.warmup_steps=0",
      *(f"--config.{k}={v}" for k, v in TINY_RUN.items()),
      f"--config.data.tokenizer_path={tokenizer}",
      "--config.model.dropout_rate=0.1",  # so resuming must also reproduce the dropout masks
    ],
    cwd=REPO,
    env=cpu_env(),
    stderr=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )


def _wait_for(proc, text, timeout=240):
  deadline = time.time() + timeout
  for line in proc.stderr:
    if text in line:
      return
    assert time.time() < deadline, f"never saw {text!r}"
  raise AssertionError(f"the run ended before {text!r}")


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _state_checksums(workdir, step):
  """The saved state's per-array checksums: equal iff the states are bit-identical."""
  from m6_jax.checkpoint import checkpoints

  ckpts = checkpoints.Checkpoints(checkpoints.checkpoint_dir(str(workdir)), create=False)
  return ckpts.saved_json(step, "meta")["checksums"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_run_resumes_bit_exactly_and_logs_every_step_once(tmp_path, sig, tokenizer_path):
  """SIGTERM at a step that is not a logging step (log_every=1000) saves and logs the steps
  since the last record. SIGKILL with a checkpoint every step (so that it nearly always
  lands during a save) leaves a temporary folder and records after the last checkpoint,
  which the resumed run clears and replaces."""
  workdir = tmp_path / "run"
  kill = sig == signal.SIGKILL
  options = dict(log_every=1, checkpoint_every=1) if kill else {}
  proc = _start(workdir, 100000, tokenizer_path, **options)
  _wait_for(proc, "step 8/" if kill else "step 1/")
  time.sleep(0 if kill else 0.3)  # SIGTERM some steps after the only record so far
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
  if kill:
    assert proc.returncode == -signal.SIGKILL
  else:
    assert proc.returncode == 0 and "SIGTERM received" in err and "state saved" in err, err
    assert_every_step_once(_records(workdir), max(steps))
  end = max(steps) + 2
  proc = _start(workdir, end, tokenizer_path, **options)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err
  assert f"Resumed from step {max(steps)}" in err
  assert_every_step_once(_records(workdir), end)
  # No temporary directory of a save cut short is left (nor was one resumed from).
  assert not [s for s in os.listdir(workdir / "checkpoints") if "tmp" in s]
  if kill:  # resuming from a checkpoint is the same path; bit-exactness is checked once
    return
  reference = _start(tmp_path / "uninterrupted", end, tokenizer_path, **options)
  _, err = reference.communicate(timeout=240)
  assert reference.returncode == 0, err
  assert _state_checksums(workdir, end) == _state_checksums(tmp_path / "uninterrupted", end)


def test_ctrl_c_saves_and_exits_with_one_line(tmp_path, tokenizer_path):
  """A first Ctrl-C saves and stops; Ctrl-C again once the state is saved, at any moment of
  the shutdown (every 20 ms until the process exits), changes nothing: exit status 0."""
  proc = _start(tmp_path / "run", 100000, tokenizer_path)
  _wait_for(proc, "step 1/")
  proc.send_signal(signal.SIGINT)
  _wait_for(proc, "state saved")
  seconds = 0
  while proc.poll() is None and seconds < 120:
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    seconds += 0.02
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  assert "already saved" in err and "image_to_text loss" in out, err[-3000:]
  saved = [int(s) for s in os.listdir(tmp_path / "run" / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and saved[0] >= 1
  assert_every_step_once(_records(tmp_path / "run"), saved[0])


def test_a_second_ctrl_c_stops_at_once():
  from m6_jax.train import loop

  before = signal.getsignal(signal.SIGINT)
  flag = loop.PreemptionFlag()
  restore = flag.install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert flag.requested and flag.stop_at(1)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    restore()
  assert signal.getsignal(signal.SIGINT) is before
