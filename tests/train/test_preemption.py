"""SIGTERM mid-run (how clusters preempt): the run saves, exits cleanly, and resumes."""

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(workdir, steps):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
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
      "--config.model.num_layers=1",
    ],
    cwd=REPO,
    env=env,
    stderr=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )


def test_sigterm_saves_and_resume_continues(tmp_path):
  workdir = tmp_path / "run"
  proc = _start(workdir, steps=100000)
  deadline = time.time() + 240
  for line in proc.stderr:
    if "step 3/" in line:
      break
    assert time.time() < deadline, "training did not start"
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "SIGTERM received" in err and "state saved" in err
  saved = [int(s) for s in os.listdir(workdir / "checkpoints")]
  assert len(saved) == 1 and 3 <= saved[0] < 100000
  # Leftover temporary directories would mean a half-written checkpoint.
  assert not [s for s in os.listdir(workdir / "checkpoints") if "tmp" in s]

  proc = _start(workdir, steps=saved[0] + 2)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err
  assert f"Resumed from step {saved[0]}" in err
  assert f"step {saved[0] + 2}/{saved[0] + 2}" in err
