"""The sweep runner end to end, with real subprocesses on a tiny config: a sweep stopped by
SIGTERM and then by SIGKILL, and restarted, redoes no finished run and ends with the tables
of an uninterrupted sweep (run through submitit's local cluster, two runs at once); the same
seed run twice gives the same metrics.jsonl, another seed a different one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from testing_utils import cpu_env

from experiments.sweeps import spec

# Multi-process / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 30  # a signal lands within a few steps (each writes a record): mid-run
TIMING = ("time", "steps_per_sec", "examples_per_sec", "tokens_per_sec")

SWEEP = """
CONFIG = "configs/base.py:runlocal"
TINY = {{
  "train.steps": {steps}, "train.log_every": 1, "train.checkpoint_every": 10,
  "train.schedule": "constant", "train.warmup_steps": 0,
  "model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2, "model.head_dim": 16,
  "model.mlp_dim": 64, "model.vocab_size": 512, "data.tokenizer_path": {tokenizer!r},
  "data.image_size": 32, "data.batch_size": 8, "data.src_len": 16, "data.tgt_len": 16,
  "data.length_bucket": 0,
}}


def get_hyper(hyper):
  return hyper.product([*(hyper.fixed(k, v) for k, v in TINY.items()), hyper.sweep("seed", [0, 1])])
"""


def _start(sweep_file, workdir, *flags):
  out = open(f"{workdir}.out", "a")
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "experiments.sweeps.run",
      str(sweep_file),
      f"--workdir={workdir}",
      *flags,
    ],
    cwd=REPO,
    env=cpu_env(),
    stdout=out,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _read(path):
  return open(path).read() if os.path.exists(path) else ""


def _wait_for(path, text, proc, count=1, timeout=240):
  """Until `text` is in the file `count` times (the runner still running)."""
  deadline = time.time() + timeout
  while _read(path).count(text) < count:
    assert proc.poll() is None, f"the sweep ended before {text!r} in {path}"
    assert time.time() < deadline, f"never saw {text!r} in {path}"
    time.sleep(0.05)


def _records(run_dir):
  with open(os.path.join(run_dir, "train", "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def test_an_interrupted_sweep_resumes_and_ends_with_the_uninterrupted_tables(
  tmp_path, tokenizer_path
):
  sweep_file = tmp_path / "tiny_sweep.py"
  sweep_file.write_text(SWEEP.format(steps=STEPS, tokenizer=tokenizer_path))
  first, second = spec.load(str(sweep_file)).runs
  assert (first.seed, second.seed) == (0, 1) and first.configuration == second.configuration
  stopped = tmp_path / "stopped"
  log_a = stopped / "runs" / first.id / "log.txt"
  log_b = stopped / "runs" / second.id / "log.txt"

  # 1. SIGTERM while the second run trains: it saves, the runner stops with status 143.
  proc = _start(sweep_file, stopped)
  _wait_for(log_b, "step 1/", proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 143, _read(f"{stopped}.out")
  assert "SIGTERM received" in _read(log_b)
  assert os.path.exists(stopped / "runs" / first.id / "FINISHED")
  assert not os.path.exists(stopped / "runs" / second.id / "FINISHED")
  finished_a = os.stat(stopped / "runs" / first.id / "FINISHED").st_mtime_ns

  # 2. Restarted, then SIGKILL (the runner alone): its stage gets SIGTERM as it dies
  # (PR_SET_PDEATHSIG), saves, and holds the run's lock until it exits.
  proc = _start(sweep_file, stopped)
  _wait_for(log_b, "Resumed from step", proc)
  _wait_for(log_b, "step ", proc, count=_read(log_b).count("step ") + 1)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL

  # 3. Restarted: it waits for that stage to exit, resumes the run and writes the tables.
  proc = _start(sweep_file, stopped)
  assert proc.wait(timeout=240) == 0, _read(f"{stopped}.out")[-3000:]
  out = _read(f"{stopped}.out")
  assert out.count(f"[1/2] run {first.id} (seed 0, all runs) skipped: finished before") == 2, out
  assert out.count(f"[2/2] run {second.id} (seed 1, all runs) finished") == 1, out
  assert _read(log_b).count("Resumed from step") == 2
  # The finished run was never redone: one stage command in its log, its marker untouched.
  assert _read(log_a).count("m6_jax.main") == 1
  assert os.stat(stopped / "runs" / first.id / "FINISHED").st_mtime_ns == finished_a
  assert not [n for n in os.listdir(stopped / "runs" / second.id) if ".tmp" in n]

  # The same sweep, uninterrupted, through submitit's local cluster, both runs at once.
  reference = tmp_path / "reference"
  flags = ("--launcher=submitit", "--submitit_cluster=local", "--parallel=2")
  proc = _start(sweep_file, reference, *flags)
  assert proc.wait(timeout=300) == 0, _read(f"{reference}.out")[-3000:]
  for name in ("results.csv", "runs.csv"):
    assert _read(stopped / name) == _read(reference / name), name
  rows = _read(stopped / "results.csv").splitlines()
  loss = next(r.split(",") for r in rows if r.startswith("all runs,train/loss,"))
  n, mean, std, low, high = map(float, loss[2:])
  assert n == 2 and std > 0 and low < mean < high
  md = _read(stopped / "results.md")
  assert "git commit: " in md and "jax 0." in md and f"| {second.id} | 1 |" in md
  for plot in ("loss_curves.png", "final_metrics.png"):
    assert os.path.getsize(stopped / plot) > 1000

  # The same seed twice: the same metrics.jsonl (timings aside), also across the two stops
  # of the second run; a different seed: a different one.
  a, b = _records(stopped / "runs" / first.id), _records(stopped / "runs" / second.id)
  assert [r["step"] for r in a] == list(range(1, STEPS + 1)) == [r["step"] for r in b]
  assert a == _records(reference / "runs" / first.id)
  assert b == _records(reference / "runs" / second.id)
  assert a[-1]["loss"] != b[-1]["loss"]
