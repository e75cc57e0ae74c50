"""benchmarks/device_check.py on the CPU: without a GPU one `error:` line and exit status 2;
with --allow_cpu the train step with both attention impls and text to image at tiny sizes
(decoding, benchmarks/decoding.py's rows at a smaller model, is left out for time)."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest
from testing_utils import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "device_check.py")


def _check(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, SCRIPT, *args],
    cwd=REPO,
    env=cpu_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  "args, says",
  [
    ((), ("error: no GPU: JAX ", "CUDA plugin", "or pass --allow_cpu")),
    (("--allow_cpu", "--sizes=huge"), ("error: --sizes: unknown huge; known: medium",)),
  ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, says):
  out = tmp_path / "check.json"
  proc = _check(*args, f"--json={out}")
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
  assert proc.stderr.startswith(says[0]) and all(s in proc.stderr for s in says), proc.stderr
  assert not out.exists()


@pytest.mark.slow
def test_allow_cpu_measures_both_attention_impls_and_text_to_image(tmp_path):
  out = tmp_path / "check.json"
  proc = _check(
    "--allow_cpu", "--reps=1", "--t2i_batch_sizes=1", "--skip=decoding", f"--json={out}"
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  results = json.loads(out.read_text())
  assert results["environment"]["jax"] == jax.__version__ and not results["on_gpu"]
  assert results["failures"] == 0
  rows = {r["impl"]: r for r in results["train"]}
  assert sorted(rows) == ["cudnn", "xla"] and all(r["size"] == "tiny" for r in rows.values())
  for row in rows.values():
    assert math.isfinite(row["median_s"]) and row["median_s"] > 0
    assert math.isfinite(row["mfu"]) and row["mfu"] > 0
    assert row["model_flops"] > 0 and row["finite"]
  # Same parameters and batch: the two impls' first losses agree.
  assert rows["cudnn"]["first_loss"] == pytest.approx(rows["xla"]["first_loss"], rel=1e-3)
  assert "XLA implementation (no GPU)" in rows["cudnn"]["attention"]
  assert "decoding" not in results
  t2i = results["text_to_image"]
  assert t2i["cached_equals_uncached"] and t2i["sampling"] and t2i["vqgan"]
  assert f"jax {jax.__version__}, jaxlib" in proc.stdout and "randomly initialised" in proc.stdout
