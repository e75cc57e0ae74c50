"""Reading a checkpoint step that may be damaged: what is wrong, in words, and a read that
leaves nothing behind when it fails.

**What is wrong.** Before any array is read, `missing_part` looks at the step's files: a
step that is a plain file or an empty folder, a missing `_CHECKPOINT_METADATA`, an item the
step recorded but no longer holds (`meta`, the data iterator's position, ...), a missing
`_METADATA` or array index. A read that fails anyway is named by `describe` (a truncated
array file, a changed or corrupt one, a missing one); bytes changed inside an array show
only in its checksum (m6_jax/checkpoint/checksums.py).

**Nothing left behind.** Orbax reads a step's arrays in many concurrent asyncio tasks on an
event loop it makes for the read and closes when the read ends. When one read fails, the
loop is closed with the other reads still in flight: their TensorStore results then arrive
on a closed loop ("RuntimeError: Event loop is closed", printed from TensorStore's threads)
or fail unretrieved ("Future exception was never retrieved", logged when the garbage
collector finds them), long after the read was reported, hundreds of lines of it. Within
`reading()` (an asyncio event-loop policy installed for its duration), the loops Orbax
makes finish their pending tasks before they close, and what
the libraries log is held back: it goes into the damage's detail when the read fails (the
detail file, `damage_log`), and is passed on (warnings and above) when it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging as pylogging
import os
import re
import threading
import traceback
from typing import Iterator

import jax

from m6_jax.checkpoint import data_state
from m6_jax.errors import CheckpointError, DamagedCheckpoint

STEP_METADATA = "_CHECKPOINT_METADATA"
# What each item of a step holds (m6_jax/checkpoint/checkpoints.py), for messages.
ITEMS = {
  "state": "the train state",
  "params": "the parameters",
  "data": "the data iterator's position",
  "config": "the run's config",
  "meta": "the tokenizer fingerprint and the checksums",
}
# Files without which an item cannot be read at all.
_PYTREE_FILES = ("_METADATA", "manifest.ocdbt")
_JSON_FILE = "metadata"
# Where the records of the libraries that read checkpoints come from.
_LIBRARIES = ("/orbax/", "/grain/", "/tensorstore/", "/asyncio/", "/etils/")


def recorded_items(step_dir: str) -> list[str] | None:
  """The items a step recorded when it was saved (its _CHECKPOINT_METADATA), or None."""
  try:
    with open(os.path.join(step_dir, STEP_METADATA)) as f:
      return sorted(json.load(f).get("item_handlers") or {})
  except (OSError, ValueError, AttributeError):
    return None


def missing_part(step_dir: str, needed: tuple[str, ...]) -> str | None:
  """What a step lacks, in words, among what a read of the items `needed` (those the step
  recorded) requires; None when nothing is missing. No array is read."""
  if not os.path.isdir(step_dir):
    return "it is a file, not a checkpoint step folder"
  if not os.listdir(step_dir):
    return "the step folder is empty"
  recorded = recorded_items(step_dir)
  if recorded is None:
    return f"missing or unreadable step metadata ({STEP_METADATA})"
  for item in needed:
    where = os.path.join(step_dir, item)
    if item not in recorded:
      continue
    if not os.path.isdir(where):
      return f"missing item '{item}' ({ITEMS.get(item, item)})"
    if item in ("state", "params"):
      for name in _PYTREE_FILES:
        if not os.path.exists(os.path.join(where, name)):
          kind = "metadata" if name == "_METADATA" else "array index"
          return f"missing {kind} ({item}/{name})"
    elif item == "data":
      if data_state.saved_files(where) is None:
        own = data_state.file_name(jax.process_index(), jax.process_count())
        return f"missing item 'data' ({ITEMS['data']}: data/{own})"
    elif not os.path.exists(os.path.join(where, _JSON_FILE)):
      return f"missing item '{item}' ({ITEMS.get(item, item)}: {item}/{_JSON_FILE})"
  return None


def _chain(error: BaseException) -> Iterator[BaseException]:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def describe(error: BaseException) -> str:
  """A failed read of a step, in words (the exception's own text is the detail's)."""
  text = " ".join(str(e) for e in _chain(error))
  key = re.search(r'Error reading "([^"]+)"', text)
  which = f" (reading '{key.group(1).split('/')[0]}' failed)" if key else ""
  # TensorStore reads an array's .zarray through the step's index: a failure there is the
  # index's (or the metadata's) rather than an array file's.
  part = "the array index" if key and key.group(1).endswith((".zarray", ".zattrs")) else None
  part = part or "an array file"
  if "OUT_OF_RANGE" in text:
    return f"{part} is truncated{which}"
  if "DATA_LOSS" in text or "decompress" in text.lower():
    return f"{part} was changed or is corrupt{which}"
  if "NOT_FOUND" in text or isinstance(error, FileNotFoundError):
    return f"{part} is missing{which}"
  if any(isinstance(e, json.JSONDecodeError) for e in _chain(error)):
    return "unreadable metadata (its JSON was changed)"
  first = (str(error).strip().splitlines() or [""])[0][:160]
  return f"unreadable ({type(error).__name__}: {first})" if first else type(error).__name__


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its pending tasks finish before it closes (see the module
  docstring): a failed read's other reads end, and their errors are retrieved, here."""

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      pending = [t for t in asyncio.all_tasks(self) if not t.done()]
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingLoop()


class _HoldLibraryRecords(pylogging.Filter):
  """Keeps the libraries' log records out of the output, for the detail."""

  def __init__(self):
    super().__init__()
    self.records: list[pylogging.LogRecord] = []

  def filter(self, record: pylogging.LogRecord) -> bool:
    if any(part in record.pathname for part in _LIBRARIES):
      self.records.append(record)
      return False
    return True


_lock = threading.Lock()
_depth = 0  # reading() nests (a read of a step calls other reads)
_previous_policy = None


@contextlib.contextmanager
def _draining_loops() -> Iterator[None]:
  global _depth, _previous_policy
  with _lock:
    _depth += 1
    if _depth == 1:
      _previous_policy = asyncio.get_event_loop_policy()
      asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    with _lock:
      _depth -= 1
      if _depth == 0:
        asyncio.set_event_loop_policy(_previous_policy)


def _format(record: pylogging.LogRecord) -> str:
  where = f"{os.path.basename(record.pathname)}:{record.lineno}"
  text = f"{record.levelname} {where}] {record.getMessage()}"
  if record.exc_info:
    text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
  return text


@contextlib.contextmanager
def _held_back(hold: _HoldLibraryRecords) -> Iterator[None]:
  """Library records go to `hold`; the event loops Orbax makes drain before they close."""
  targets = [pylogging.getLogger(), pylogging.getLogger("absl"), pylogging.getLogger("asyncio")]
  targets += list(pylogging.getLogger().handlers)
  for target in targets:
    target.addFilter(hold)
  try:
    with _draining_loops():
      yield
  finally:
    for target in targets:
      target.removeFilter(hold)


@contextlib.contextmanager
def listing(held: list[str]) -> Iterator[None]:
  """Listing a directory's steps: what the libraries log about them (a step without its
  metadata, ...) is kept in `held`, for the detail of the step's damage once it is read."""
  hold = _HoldLibraryRecords()
  try:
    with _held_back(hold):
      yield
  finally:
    held.extend(_format(r) for r in hold.records if r.levelno >= pylogging.WARNING)


@contextlib.contextmanager
def reading(source: str) -> Iterator[None]:
  """A read of checkpoint `source` ('<directory> (step N)'). Any failure other than a
  CheckpointError (a model or tokenizer that does not fit: the user's to fix, not damage)
  becomes one DamagedCheckpoint whose `detail` holds the traceback and what the libraries
  logged meanwhile; after a read that succeeds, their records at warning level and above
  are passed on."""
  hold = _HoldLibraryRecords()
  damage = None
  with _held_back(hold):
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged step raises is damage
      detail = "".join(traceback.format_exception(e)).rstrip()
      damage = DamagedCheckpoint(f"{source}: {describe(e)}", detail)
  if damage is not None:
    damage.detail = "\n".join([damage.detail, *(_format(r) for r in hold.records)])
    raise damage
  for record in hold.records:
    if record.levelno >= pylogging.WARNING:
      pylogging.getLogger(record.name).handle(record)


def damage_log(directory: str, step: int, what: str, detail: str) -> str | None:
  """Appends the detail of a damaged step to `<directory>.damaged/<step>.log` (process 0);
  returns its path, or None when it cannot be written (a read-only workdir)."""
  path = os.path.join(directory.rstrip("/") + ".damaged", f"{step}.log")
  if jax.process_index() != 0:
    return path
  stamp = datetime.datetime.now().isoformat(timespec="seconds")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
      f.write(f"== {stamp} step {step} of {directory}: {what}\n{detail}\n\n")
  except OSError:
    return None
  return path
