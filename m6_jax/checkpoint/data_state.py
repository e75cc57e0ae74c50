"""The data item of a training checkpoint: the data iterator's state, one JSON file per
process (``data/process_<i>-of-<n>.json``, grain's handler), restored on the same number of
processes as saved it or on another (m6_jax/data/resume.py says what that keeps)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from m6_jax.data import resume
from m6_jax.parallel import multihost

_FILE = re.compile(r"^process_(\d+)-of-(\d+)\.json$")


def file_name(index: int, count: int) -> str:
  return f"process_{index}-of-{count}.json"


def saved_files(directory: str) -> list[str] | None:
  """The files this process restores from: its own, else every process's of the one other
  count that saved all of them; None when neither is there."""
  own = file_name(jax.process_index(), jax.process_count())
  try:
    names = set(os.listdir(directory))
  except OSError:
    return None
  if own in names:
    return [own]
  counts = {int(m.group(2)) for m in map(_FILE.match, names) if m}
  for count in sorted(counts):
    files = [file_name(i, count) for i in range(count)]
    if all(f in names for f in files):
      return files
  return None


class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
  """grain's handler (the same files and arguments), with a restore on another process count."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    index, count = jax.process_index(), jax.process_count()
    files = saved_files(str(directory))
    if files is None or files == [file_name(index, count)]:
      return super().restore(directory, item, args)
    states = [json.loads((directory / f).read_text()) for f in files]
    state, kept = resume.state_for_process_count(item, states, index, count)
    if multihost.is_primary():
      logging.warning(
        "The data position of this checkpoint was saved by %d process(es) and this run has %d: %s.",
        len(files),
        count,
        kept,
      )
    item.set_state(state)
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class Save(ocp.args.CheckpointArgs):
  item: Any  # the data iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class Restore(ocp.args.CheckpointArgs):
  item: Any  # the data iterator, set to the saved position in place
