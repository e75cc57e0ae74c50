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
  """The config of the latest run, beside the checkpoints, for humans and tools.

  Written by process 0 only: with several processes the workdir is shared, and concurrent
  writers of one temporary file would race.
  """
  import jax

  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Best checkpoint, and parameters for inference / fine-tuning
# --------------------------------------------------------------------------------------


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the model; the message says which."""


def best_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "best")


def make_best_manager(workdir: str, metric: str, mode: str = "max") -> ocp.CheckpointManager:
  """A second manager, `<workdir>/best`, that keeps only the step with the best `metric`.

  The main manager keeps the last N steps (for resuming); this one is saved after each
  periodic evaluation with the eval metrics, and Orbax's `best_fn` / `best_mode` keep the
  single best step (`max_to_keep=1`). Checkpoints here hold the train state and config.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=1,
    best_fn=lambda metrics: float(metrics[metric]),
    best_mode=mode,
    keep_checkpoints_without_metrics=False,
    create=True,
    enable_async_checkpointing=False,
  )
  return ocp.CheckpointManager(
    best_dir(workdir),
    options=options,
    item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
  )


def save_best(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  config: ml_collections.ConfigDict,
  metrics: dict[str, float],
) -> None:
  if step in manager.all_steps():
    return
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())
    ),
    metrics={k: float(v) for k, v in metrics.items()},
  )
  manager.wait_until_finished()


def resolve_checkpoint_dir(path: str) -> str:
  """A workdir (holding `checkpoints/`) or a checkpoint directory -> the checkpoint directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints")
  return path


def _reader(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(create=False),
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    },
  )


def load_params(path: str, step: int | None = None) -> tuple[Any, int, dict | None]:
  """(params as host numpy arrays, step, saved config dict or None) from a checkpoint.

  `path` is a workdir or a checkpoint directory; `step` None means its latest step. Only
  the parameters are returned (the optimizer state is read and dropped), on the host, so
  they can be placed onto any mesh.
  """
  import jax
  import numpy as np

  directory = resolve_checkpoint_dir(path)
  steps = []
  if os.path.isdir(directory):
    steps = sorted(_reader(directory).all_steps())
  if not steps:
    raise CheckpointError(
      f"no checkpoint in {path} (looked in {directory}); train first with "
      f"--mode=train --workdir={path}, or point at a workdir that holds one."
    )
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"no checkpoint step {step} in {directory}; available steps: {steps}.")
  manager = _reader(directory)
  metadata = manager.item_metadata(step)["state"]
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu),
    metadata,
    is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
  )
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()
      ),
    )
    config = restored["config"]
  except (FileNotFoundError, KeyError):
    restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    config = None
  state = restored["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  return jax.tree.map(np.asarray, params), int(step), config


def check_param_shapes(expected: Any, loaded: Any, source: str) -> None:
  """Raises CheckpointError naming the first parameter whose shape (or presence) differs."""
  import jax

  def flat(tree):
    return {
      jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape)
      for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }

  want, got = flat(expected), flat(loaded)
  for name in sorted(set(want) | set(got)):
    if want.get(name) != got.get(name):
      w = want.get(name, "absent")
      g = got.get(name, "absent")
      raise CheckpointError(
        f"checkpoint {source} does not fit this config: parameter '{name}' has shape {g} in "
        f"the checkpoint but {w} in the model; use the config the checkpoint was trained "
        "with (its config.json) or a checkpoint of this model."
      )
