"""Checks made before a run compiles anything: each failure is one WorkdirError line
(exit 2) instead of a traceback minutes later.

- the workdir can be created and written;
- the disk holds at least two more checkpoints (estimated from the state's size);
- streamed shards: their patterns name files, all of one format, at least one per process.

Whether a checkpoint fits the model and the tokenizer is checked where it is restored,
before any array is read (`checkpoints.Checkpoints.restore_train_state`), which is also
before anything compiles.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np

from m6_jax.data import shard_files
from m6_jax.errors import WorkdirError

CHECKPOINTS_OF_SPACE = 2  # free space asked for, in checkpoints of the current state's size


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and checks that files can be written in it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; pick another path.")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_check_"):
      pass
  except OSError as e:
    raise WorkdirError(
      f"--workdir={workdir} cannot be written ({e.strerror or e}); pick a directory you can "
      "write to."
    ) from e


def state_bytes(abstract_state) -> int:
  """Bytes of the whole train state (parameters, optimizer state, step, rng)."""
  return int(
    sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))
  )


def check_disk_space(directory: str, needed: int) -> None:
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise WorkdirError(
      f"{directory} has {free / 2**20:,.0f} MiB free, but {CHECKPOINTS_OF_SPACE} checkpoints "
      f"of this model need about {needed / 2**20:,.0f} MiB; free some space or pick another "
      "--workdir."
    )


def check_room_for_checkpoints(setup, directory: str) -> None:
  """The disk under `directory` holds CHECKPOINTS_OF_SPACE checkpoints of this state."""
  check_disk_space(directory, CHECKPOINTS_OF_SPACE * state_bytes(setup.abstract_state()))


def check_shards(config, process_count: int) -> None:
  """Each source of data.shards (and data.eval_shards, when set) names shards of one format,
  at least one per process for each train source; ConfigError otherwise."""
  d = config.data
  if d.source != "shards":
    return
  for source, shards in shard_files.resolve_sources(str(d.shards), str(d.shard_format)):
    shards.for_process(0, process_count, source.label)
  if str(d.eval_shards).strip():
    shard_files.resolve(str(d.eval_shards), str(d.shard_format), "data.eval_shards")
