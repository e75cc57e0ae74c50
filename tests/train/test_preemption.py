"""SIGTERM (how clusters preempt) and Ctrl-C mid-run: the run finishes the step, saves, exits
cleanly, and the rerun resumes (bit-exactly: its losses are those of an uninterrupted run)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(workdir, steps):
  """A tiny base run; a constant learning rate, so that a step's update does not depend on
  train.steps (which differs between the runs compared here)."""
  env = cpu_env()
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "m6_jax.main",
      "--config=configs/base.py:runlocal",
      f"--workdir={workdir}",
      f"--config.train.steps={steps}",
      "--config.train.log_every=1",
      "--config.train.checkpoint_every=100000",
      "--config.train.schedule=constant",
      "--config.train.warmup_steps=0",
      "--config.model.num_layers=1",
    ],
    cwd=REPO,
    env=env,
    stderr=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_signal_saves_and_the_rerun_resumes_bit_exactly(tmp_path, sig):
  workdir = tmp_path / "run"
  proc = _start(workdir, steps=100000)
  deadline = time.time() + 240
  for line in proc.stderr:
    if "step 3/" in line:
      break
    assert time.time() < deadline, "training did not start"
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
  assert f"{name} received" in err and "state saved" in err
  saved = [int(s) for s in os.listdir(workdir / "checkpoints")]
  assert len(saved) == 1 and 3 <= saved[0] < 100000
  # Leftover temporary directories would mean a half-written checkpoint.
  assert not [s for s in os.listdir(workdir / "checkpoints") if "tmp" in s]

  end = saved[0] + 2
  proc = _start(workdir, steps=end)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err
  assert f"Resumed from step {saved[0]}" in err
  assert f"step {end}/{end}" in err
  reference = _start(tmp_path / "uninterrupted", steps=end)
  _, err = reference.communicate(timeout=240)
  assert reference.returncode == 0, err
  resumed, straight = _losses(workdir), _losses(tmp_path / "uninterrupted")
  assert [resumed[s] for s in range(1, end + 1)] == [straight[s] for s in range(1, end + 1)]


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
