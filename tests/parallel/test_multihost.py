"""Two processes on localhost train exactly like one process with the same 8 devices.

Each process runs `python -m m6_jax.main` on 4 fake CPU devices and joins the other through
jax.distributed (--coordinator_address / --num_processes / --process_id). The mesh
(fsdp=8) spans both processes, so every batch, the parameters and the optimizer state are
split across them, and the checkpoint holds shards written by both. The reference is the
same config trained in this (1-process, 8-device) test process.

Run 1: two processes, steps 1-4 from scratch (process 0 trains the workdir's tokenizer while
process 1 waits), checkpoint at step 4.
Run 2: two processes resume from that checkpoint; after a few steps process 1 alone gets
SIGTERM, and both must agree on the step to stop at, save it and exit cleanly.
Every logged per-step loss of both runs must match the 1-process run, trained afterwards to
the step run 2 stopped at (with the tokenizer of run 1: the same file it would train).

Streamed shards: each process reads its own tars; a run stopped by SIGTERM mid-shard and
resumed ends bit-exactly where an uninterrupted two-process run does; one process resumes it.
"""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from testing_utils import cpu_env

from m6_jax.data import export_world
from m6_jax.errors import DistributedError
from m6_jax.parallel import multihost
from m6_jax.train import loop

# Multi-process / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/base.py:runlocal"
# A constant schedule after warm-up: the learning rate of a step must not depend on
# train.steps, which differs between the runs compared here.
OVERRIDES = {
  "train.log_every": 1,
  "train.checkpoint_every": 4,
  "train.schedule": "constant",
  "train.warmup_steps": 2,
  "model.num_layers": 1,
  "model.d_model": 64,
  "model.mlp_dim": 128,
  "model.vocab_size": 512,  # both tests' models alike: the second compiles from the cache
  "data.src_len": 16,
  "data.tgt_len": 16,
  "data.image_size": 32,
  "data.batch_size": 16,
  "mesh.fsdp": 8,
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _reference_config(steps, tokenizer_path):
  path, variant = CONFIG.split(":")
  spec = importlib.util.spec_from_file_location("_base_config", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  overrides = {**OVERRIDES, "train.steps": steps, "data.tokenizer_path": tokenizer_path}
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _launch(workdir, steps, logs, overrides=OVERRIDES):
  """Both processes of a run; their output goes to files (a pipe could fill and block)."""
  port = _free_port()
  env = cpu_env(devices=4)
  procs = []
  for pid in range(2):
    log = open(logs[pid], "w")
    cmd = [
      sys.executable,
      "-m",
      "m6_jax.main",
      f"--config={CONFIG}",
      f"--workdir={workdir}",
      f"--config.train.steps={steps}",
      *(f"--config.{k}={v}" for k, v in overrides.items()),
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
      f"--process_id={pid}",
    ]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    log.close()
  return procs


def _output(logs):
  return "\n".join(f"----- process {i} -----\n{open(p).read()[-6000:]}" for i, p in enumerate(logs))


def _wait(procs, logs, timeout):
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise AssertionError(f"the processes did not finish in {timeout}s:\n{_output(logs)}")
  codes = [p.returncode for p in procs]
  assert codes == [0, 0], f"exit codes {codes}:\n{_output(logs)}"


def _wait_for_line(logs, pid, text, procs, timeout):
  deadline = time.time() + timeout
  while text not in open(logs[pid]).read():
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      raise AssertionError(f"process {pid} never logged {text!r}:\n{_output(logs)}")
    time.sleep(0.2)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


def test_two_processes_match_one_and_resume_and_stop_together(tmp_path):
  workdir = str(tmp_path / "two_processes")
  logs = [str(tmp_path / f"run1_process_{i}.log") for i in range(2)]
  procs = _launch(workdir, steps=4, logs=logs)
  _wait(procs, logs, timeout=240)
  assert "process 1 of 2, 4 local / 8 global cpu devices" in open(logs[1]).read()

  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  data_states = os.listdir(os.path.join(workdir, "checkpoints", "4", "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_states)
  assert os.path.exists(os.path.join(workdir, "tokenizer", "spm.model"))
  assert "Training sentencepiece" in open(logs[0]).read()
  assert "Training sentencepiece" not in open(logs[1]).read()  # it waited and loaded it

  # Run 2: resume in two processes; SIGTERM to process 1 only, after step 6.
  logs = [str(tmp_path / f"run2_process_{i}.log") for i in range(2)]
  procs = _launch(workdir, steps=1000, logs=logs)
  _wait_for_line(logs, 1, "step 6/1000", procs, timeout=240)
  procs[1].send_signal(signal.SIGTERM)
  _wait(procs, logs, timeout=120)
  outputs = [open(p).read() for p in logs]
  stops = [re.findall(r"Stopping at step (\d+) \(state saved\)", out) for out in outputs]
  assert stops[0] and stops[0] == stops[1], _output(logs)
  stop = int(stops[0][0])
  assert stop >= 6, stop
  assert "Resumed from step 4" in outputs[0] and "Resumed from step 4" in outputs[1]
  assert stop in {int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))}

  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, stop + 1))

  # The 1-process reference, steps 1 .. stop: runs 1 and 2 logged the same losses.
  tokenizer = os.path.join(workdir, "tokenizer", "spm.model")
  loop.train(_reference_config(stop, tokenizer), str(tmp_path / "one_process"))
  expected = _losses(str(tmp_path / "one_process"))
  assert sorted(expected) == list(range(1, stop + 1))
  steps = range(1, stop + 1)
  np.testing.assert_allclose([losses[s] for s in steps], [expected[s] for s in steps], rtol=1e-5)


# -- streamed shards: each process its own shards, a SIGTERM mid-shard, an exact resume ---------


def _shard_run(world, tokenizer_path):
  """Two sources (weights 3 and 1) of two 13-record tars each, so each process reads one tar
  of each; two tasks; a window shuffle of 4."""
  train = os.path.join(world, "train")
  return {
    **OVERRIDES,
    "data.tokenizer_path": tokenizer_path,
    "data.source": "shards",
    "data.shards": f"{train}/0000{{0,1}}.tar,3;{train}/0000{{2,3}}.tar,1",
    "data.shuffle_buffer": 4,
    "data.task_weights.text_lm": 0,
    "data.task_weights.text_to_text": 0,
    "data.task_weights.multimodal_to_text": 0,
  }


def _corrupt_an_image(tar_path):
  """Zeroes the bytes of the tar's sixth image: a corrupt_image record, the tar still whole."""
  with tarfile.open(tar_path) as tar:
    member = [m for m in tar.getmembers() if m.name.endswith(".png")][5]
  with open(tar_path, "r+b") as f:
    f.seek(member.offset_data)
    f.write(b"\0" * member.size)


def _data_states(workdir, step):
  folder = os.path.join(workdir, "checkpoints", str(step), "data")
  return [json.load(open(os.path.join(folder, f"process_{i}-of-2.json"))) for i in range(2)]


def _state_checksums(workdir, step):
  from m6_jax.checkpoint import checkpoints

  ckpts = checkpoints.Checkpoints(checkpoints.checkpoint_dir(str(workdir)), create=False)
  return ckpts.saved_json(step, "meta")["checksums"]


def test_two_processes_stream_their_own_shards_and_resume_bit_exactly(tmp_path, tokenizer_path):
  """Run B: two processes on shards written by export_world, SIGTERM mid-shard, resumed to
  step N; run A: the same, uninterrupted. The final states are bit-identical and so are the
  data states (positions, bad-record counts). A resume on another process count:
  tests/data/test_shard_streams.py."""
  world = str(tmp_path / "world")
  export_world.export(world, 52, 4, 32, "en", 0, "webdataset", 13)
  _corrupt_an_image(os.path.join(world, "train", "00000.tar"))
  run = _shard_run(world, tokenizer_path)
  interrupted = str(tmp_path / "interrupted")
  logs = [str(tmp_path / f"b1_process_{i}.log") for i in range(2)]
  procs = _launch(interrupted, 1000, logs, run)
  _wait_for_line(logs, 1, "step 3/1000", procs, timeout=240)
  procs[1].send_signal(signal.SIGTERM)
  _wait(procs, logs, timeout=120)
  stop = int(re.findall(r"Stopping at step (\d+) \(state saved\)", open(logs[0]).read())[0])
  states = _data_states(interrupted, stop)
  for p, state in enumerate(states):  # process p reads tars p and p + 2 alone
    mine = {os.path.join(world, "train", f"0000{k}.tar") for k in (p, p + 2)}
    assert {s["shard"] for s in state["position"]} <= mine, state["position"]
    assert any(s["record"] > 0 for s in state["position"]), state["position"]  # mid-shard
    assert (
      f"Process {p} of 2 streams 1 of the 2 shards of data.shards source 1" in open(logs[p]).read()
    )

  end = stop + 2
  logs = [str(tmp_path / f"b2_process_{i}.log") for i in range(2)]
  _wait(_launch(interrupted, end, logs, run), logs, timeout=240)
  assert f"Resumed from step {stop}" in open(logs[0]).read()
  reference = str(tmp_path / "uninterrupted")
  logs = [str(tmp_path / f"a_process_{i}.log") for i in range(2)]
  _wait(_launch(reference, end, logs, run), logs, timeout=240)
  assert _state_checksums(interrupted, end) == _state_checksums(reference, end)
  resumed, uninterrupted = _data_states(interrupted, end), _data_states(reference, end)
  assert resumed == uninterrupted
  # Process 0's tar 00000 holds the bad record (met by each task's stream): counts kept on resume.
  assert resumed[0]["bad_records"]["bad"]["corrupt_image"] >= 1
  assert resumed[1]["bad_records"]["bad"] == {}


BAD_FLAGS = [
  (["--process_id=1"], "--process_id=1 needs --num_processes"),
  (["--num_processes=2", "--process_id=2"], "--process_id=2 must be in [0, 2)"),
  (["--num_processes=2", "--process_id=0"], "--coordinator_address missing"),
  (["--coordinator_address=nohost", "--num_processes=2", "--process_id=0"], "host:port"),
]


def test_bad_multihost_flags_give_one_error_line(run_main):
  """The command line: the flags reach the check, whose error is the one `error:` line (one
  launch, with all three flags; the test below checks every case's error in this process)."""
  flags, message = BAD_FLAGS[-1]
  proc = run_main("--mode=params", f"--config={CONFIG}", *flags, timeout=60)
  assert proc.returncode == 2, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_multihost_flags_are_refused_in_one_line(flags, message):
  """What the command line makes of the flags: a DistributedError (a UserError, which the
  command line prints as its `error:` line) of one line, before jax.distributed starts."""
  values = dict(flag[2:].split("=") for flag in flags)
  numbers = [int(values[n]) if n in values else None for n in ("num_processes", "process_id")]
  with pytest.raises(DistributedError) as raised:
    multihost.check_flags(values.get("coordinator_address"), *numbers, auto=False)
  assert message in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
