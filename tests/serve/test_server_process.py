"""`--mode=serve` as a process: its start-up errors are one line, and SIGTERM answers the
request in flight before the process exits 0."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from http_utils import b64, post
from testing_utils import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _serve(*flags):
  return subprocess.Popen(
    [sys.executable, "-m", "m6_jax.main", "--mode=serve", *flags],
    cwd=REPO,
    env=cpu_env(1),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _one_error_line(proc, *needles):
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, err[-2000:]
  errors = [l for l in err.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]


@pytest.mark.slow
def test_start_up_errors_are_one_line(tmp_path):
  _one_error_line(_serve(), "--mode=serve needs --workdir")
  _one_error_line(_serve(f"--workdir={tmp_path}", "--max_batch=0"), "--max_batch=0")
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    _one_error_line(_serve(f"--workdir={tmp_path}", f"--port={port}"), f"127.0.0.1:{port}")


@pytest.mark.slow
def test_sigterm_answers_the_request_in_flight_then_exits_0(served, scene_files):
  # A lone request waits up to 2 s for a second one to share its batch: SIGTERM comes then.
  proc = _serve(
    f"--workdir={served[0]}", "--nodraw", "--port=0", "--max_batch=2", "--buckets=2",
    "--max_wait_ms=2000",
  )  # fmt: skip
  for line in proc.stdout:
    if "serving step" in line:
      break
  assert "serving step" in line, proc.stderr.read()[-3000:]
  host, port = line.rsplit("http://", 1)[1].strip().split(":")
  answer = {}

  def ask():
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"image": b64(scene_files[0])})
    conn.request("POST", "/v1/caption", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    answer["status"], answer["body"] = response.status, json.loads(response.read())

  client = threading.Thread(target=ask)
  client.start()
  threading.Event().wait(0.5)  # the request is in the batcher
  proc.send_signal(signal.SIGTERM)
  client.join(60)
  out, err = proc.communicate(timeout=60)
  assert answer["status"] == 200 and answer["body"]["task"] == "image_to_text", answer
  assert proc.returncode == 0, err[-3000:]
  assert "stopped: every request in flight was answered" in out
  assert "Traceback" not in err


@pytest.mark.slow
def test_the_command_line_generates_what_the_server_answers(served, scene_files, app, tmp_path):
  """`--mode=generate` itself (one process, one device) and the server (8 devices, a batch of
  8 rows): the same sampled caption for the same image, seed and options."""
  out = tmp_path / "generated.jsonl"
  options = ["--decoding=sample", "--temperature=1.5", "--top_k=20", "--seed=11"]
  proc = subprocess.run(
    [sys.executable, "-m", "m6_jax.main", "--mode=generate", f"--workdir={served[0]}"]
    + [f"--image={scene_files[4]}", f"--output={out}", *options],
    cwd=REPO,
    env=cpu_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(out.read_text().splitlines()[-1])
  body = {"image": b64(scene_files[4]), "decoding": "sample", "temperature": 1.5, "top_k": 20}
  answer = post(app, "/v1/caption", json={**body, "seed": 11}).json()
  assert answer["output"] == row["output"] and answer["task"] == row["task"]
  assert post(app, "/v1/caption", json={**body, "seed": 12}).json()["output"] != row["output"]
