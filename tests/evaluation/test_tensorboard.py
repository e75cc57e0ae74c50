"""TensorBoard event files are written without PyTorch's second of start-up, and PyTorch is
still importable afterwards (the OFA converter uses it in the same process)."""

import glob
import subprocess
import sys

SCRIPT = """
import sys
from m6_jax.evaluation import tensorboard
writer = tensorboard.summary_writer(sys.argv[1], purge_step=3)
writer.add_scalar("train/loss", 0.5, 1)
writer.close()
assert "torch" not in sys.modules, "tensorboardX imported torch"
import torch  # still importable: nothing of the guard is left behind
print(torch.__name__)
"""


def test_the_summary_writer_writes_events_without_importing_torch(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["torch"]
  events = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert len(events) == 1 and open(events[0], "rb").read().count(b"train/loss") == 1
