"""TensorBoard event files, for training metrics and evaluation results."""

from __future__ import annotations

import sys


def summary_writer(logdir: str, purge_step: int | None = None):
  """A tensorboardX SummaryWriter. tensorboardX imports PyTorch, when it is installed, only to
  accept its tensors; we log Python floats, so that second of start-up is skipped."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # makes tensorboardX's optional `import torch` fail fast
    try:
      import tensorboardX
    finally:
      del sys.modules["torch"]
  import tensorboardX

  return tensorboardX.SummaryWriter(logdir, purge_step=purge_step)
