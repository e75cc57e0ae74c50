"""Orbax checkpoints of the train state, the data-iterator position and the config.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
or preemption mid-save never leaves a half-written checkpoint that a resume would pick up.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir),
    options=options,
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    },
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iter: Any,
  config: ml_collections.ConfigDict,
  force: bool = False,
) -> None:
  """Saves asynchronously; arrays are copied off the device before this returns."""
  if step in manager.all_steps():
    return
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config.to_dict()),
    ),
    force=force,
  )


def restore(
  manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any, step: int | None = None
) -> Any:
  """Restores the state onto the shardings in `abstract_state` and rewinds `data_iter`."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter),
    ),
  )
  return restored["state"]


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """The config of the latest run, beside the checkpoints, for humans and tools."""
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
