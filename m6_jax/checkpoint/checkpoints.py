"""Checkpoints in one module with one set of Orbax handlers: resuming training, the best step,
fine-tuning (`init_from`), export, generation and evaluation all read and write them here.

A checkpoint directory is an Orbax CheckpointManager root with one folder per step, holding
some of these items:

  state    the TrainState (params, optimizer state, step, rng)        training checkpoints
  params   the parameters alone                                       best step, export
  data     the data iterator's position (grain; data_state.py)        training checkpoints
  config   the run's config (JSON)
  meta     the tokenizer's SHA-256 and piece count, a checksum of every array
           (m6_jax/checkpoint/checksums.py), and the run's rollback state (JSON)

A workdir holds `checkpoints/` (the last `train.keep_checkpoints` steps), `best/` (the best
step by `train.eval_metric`), `config.json` and `tokenizer/spm.model`; an export directory
(`--mode=export`) has the same shape with parameters only, so whatever reads a workdir reads
an export too.

Arrays are restored straight into the shardings of the caller's mesh (Orbax reshards while
reading), so a checkpoint written on 8 devices restores on 4, on 1, or on a mesh with tensor
parallelism; the parameters alone are read without the optimizer state (a partial restore).
Before restoring, the saved parameter shapes are compared with the model's and the saved
tokenizer fingerprint with the tokenizer in use; a mismatch is one CheckpointError naming
both sides. Orbax writes each step into a temporary folder and renames it when complete, so
a crash mid-save never leaves a half-written step that a resume would pick up.

Every read of a step (resume, generation, evaluation, export, init_from) checks it: its
files first (m6_jax/checkpoint/integrity.py), then, after the arrays are read, their
checksums. A damaged step (a truncated, changed or missing file, missing metadata or a
missing item, an empty step folder) is reported in one warning line that says what is wrong;
the detail (tracebacks, what Orbax and TensorStore logged) goes to
`<directory>.damaged/<step>.log`. Asking for the latest step means the newest *intact* one:
a resume moves the damaged step to `checkpoints.damaged/` and takes the step before; a
reader (generate, eval, export) leaves it where it is and reads the step before. A damaged
step asked for by number, or the best step, is one DamagedCheckpoint (an `error:` line). A
step without checksums (written before they were recorded) is used, with a warning line
that it cannot be verified. Training steps are rotated here: the newest `keep` steps stay,
and so does the newest *good* step (`good_steps.json`: steps the run confirmed by training
on without diverging, m6_jax/train/divergence.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from m6_jax.checkpoint import data_state, integrity
from m6_jax.checkpoint.checksums import checksums, unverifiable, verify_checksums
from m6_jax.errors import CheckpointError, DamagedCheckpoint
from m6_jax.parallel import multihost

__all__ = ["CheckpointError", "Checkpoints", "DamagedCheckpoint", "load_intact", "load_params"]

TOKENIZER_FILE = os.path.join("tokenizer", "spm.model")
WORDPIECE_FILE = os.path.join("tokenizer", "vocab.txt")  # data.tokenizer_kind="wordpiece"
GOOD_STEPS_FILE = "good_steps.json"
T = TypeVar("T")


def _array_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  """Orbax's standard handlers for arrays and scalars, replica-parallel saving off on CPU.

  Replica-parallel saving splits a replicated array into per-replica slices with jitted
  slicing programs, compiled once per array shape: it took 7 s of the first save of the
  tiny model on 8 CPU devices (47 s for 76 distinct shapes, against 0.25 s without). On CPU
  every device shares the host's memory, so there is no bandwidth to gain; accelerators keep
  Orbax's default.
  """
  th = ocp.type_handlers
  scalars = th.ScalarHandler()
  return th.create_type_handler_registry(
    (int, scalars),
    (float, scalars),
    (bytes, scalars),
    (np.number, scalars),
    (np.ndarray, th.NumpyHandler()),
    (jax.Array, th.ArrayHandler(use_replica_parallel=jax.default_backend() != "cpu")),
  )


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  arrays = _array_handlers()
  return {
    "state": ocp.PyTreeCheckpointHandler(type_handler_registry=arrays),
    "params": ocp.PyTreeCheckpointHandler(type_handler_registry=arrays),
    "data": data_state.DataIteratorHandler(),
    "config": ocp.JsonCheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
  }


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def best_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "best")


def resolve(path: str) -> str:
  """A workdir (holding `checkpoints/`) or a checkpoint directory -> the checkpoint directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints")
  return path


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
  """What a checkpoint records of its tokenizer (checked whenever it is loaded)."""
  return {
    "tokenizer_sha256": hashlib.sha256(tokenizer.model_proto).hexdigest(),
    "tokenizer_pieces": int(tokenizer.vocab_size),
  }


def tokenizer_beside(path: str) -> str | None:
  """The tokenizer saved with a workdir, export or checkpoint directory (`tokenizer/spm.model`
  in it or in one of its two parents), or None."""
  path = os.path.abspath(path)
  for root in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    candidate = os.path.join(root, TOKENIZER_FILE)
    if os.path.exists(candidate):
      return candidate
  return None


def check_tokenizer(meta: dict | None, tokenizer, tokenizer_path: str, source: str) -> None:
  """CheckpointError unless `tokenizer` is the one the checkpoint was trained with.

  Checkpoints written before fingerprints were recorded (no `meta`) are not checked."""
  if not meta or "tokenizer_sha256" not in meta:
    return
  mine = tokenizer_fingerprint(tokenizer)
  if mine["tokenizer_sha256"] != meta["tokenizer_sha256"]:
    raise CheckpointError(
      f"tokenizer mismatch: checkpoint {source} was trained with a tokenizer of "
      f"{meta['tokenizer_pieces']} pieces (sha256 {meta['tokenizer_sha256'][:12]}), but "
      f"{tokenizer_path} has {mine['tokenizer_pieces']} pieces (sha256 "
      f"{mine['tokenizer_sha256'][:12]}); use the tokenizer saved with the checkpoint "
      "(its tokenizer/spm.model) or pass it with --config.data.tokenizer_path."
    )


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {
    jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape)
    for k, v in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
    )[0]
  }


def check_param_shapes(expected: Any, loaded: Any, source: str) -> None:
  """Raises CheckpointError naming the first parameter whose shape (or presence) differs."""
  want, got = _flat_shapes(expected), _flat_shapes(loaded)
  for name in sorted(set(want) | set(got)):
    if want.get(name) != got.get(name):
      if name not in got:
        what = f"parameter '{name}' {want[name]} of the model is not in the checkpoint"
      elif name not in want:
        what = f"parameter '{name}' {got[name]} of the checkpoint is not in the model"
      else:
        what = f"parameter '{name}' has shape {got[name]} in the checkpoint but {want[name]} in the model"
      raise CheckpointError(
        f"checkpoint {source} does not fit this config: {what}; use the config the checkpoint "
        "was trained with (its config.json) or a checkpoint of this model."
      )


def check_state_structure(expected: Any, saved: Any, source: str, workdir: str) -> None:
  """Raises CheckpointError when the arrays outside the parameters (optimizer state, step,
  key) of the saved train state are not this version's: a checkpoint of an older optimizer
  state, which Orbax cannot restore into (and which would otherwise look like damage)."""
  want, got = _flat_shapes(expected), _flat_shapes(saved)
  outside = lambda names: sorted(n for n in names if not n.startswith("params/"))
  missing, unknown = outside(set(want) - set(got)), outside(set(got) - set(want))
  if not missing and not unknown:
    return
  detail = "; ".join(
    [f"it has no '{missing[0]}'"] * bool(missing)
    + [f"this version has no '{unknown[0]}'"] * bool(unknown)
  )
  raise CheckpointError(
    f"checkpoint {source} predates this version's optimizer state ({detail}); to continue "
    f"from its parameters with a fresh optimizer, train in a new workdir with "
    f"--config.init_from={workdir}"
  )


def _restore_args(target: Any) -> Any:
  return ocp.checkpoint_utils.construct_restore_args(target)


class Checkpoints:
  """One checkpoint directory: an Orbax CheckpointManager with this module's handlers.

  `keep`: the newest steps kept (None: all). `best_metric`: keep the `keep` steps with the
  best value of this metric instead (`best_mode` "max" or "min"; saves then pass `metrics`).
  Training saves are asynchronous (arrays are copied off the devices before `save` returns);
  `wait()` blocks until the last one is on disk.
  """

  def __init__(
    self,
    directory: str,
    keep: int | None = None,
    best_metric: str | None = None,
    best_mode: str = "max",
    async_save: bool = True,
    create: bool = True,
  ):
    self.directory = os.path.abspath(directory)
    best = {}
    if best_metric:
      best = dict(
        best_fn=lambda metrics: float(metrics[best_metric]),
        best_mode=best_mode,
        keep_checkpoints_without_metrics=False,
      )
    # Training checkpoints are rotated here (`_rotate`), so that the newest good step is
    # never deleted by newer ones; best-by-metric rotation is Orbax's.
    self.keep = keep
    # What the libraries logged while listing the steps, for the detail of a damaged one.
    self._listing_log: list[str] = []
    if create:  # a writer sets aside what a save of that step would delete without a word
      for step in self.stray_files():
        moved = self._move_aside(step)
        logging.warning(
          "Checkpoint damaged, %s: it is a file, not a checkpoint step folder; moved it to %s.",
          self.source(step),
          moved,
        )
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep if best_metric else None,
      create=create,
      # A save cut short (SIGKILL) leaves a temporary folder, never a step; clear it.
      cleanup_tmp_directories=create,
      enable_async_checkpointing=async_save,
      **best,
    )
    with integrity.listing(self._listing_log):
      self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers=_handlers()
      )
    self._rotating = not best_metric and keep is not None

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def source(self, step: int) -> str:
    """'<directory> (step N)', for messages."""
    return f"{self.directory} (step {step})"

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def stray_files(self) -> list[int]:
    """Steps that are plain files, not folders (Orbax lists no such step, and a save of that
    step would delete the file without a word)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(
      int(name)
      for name in os.listdir(self.directory)
      if name.isdigit() and not os.path.isdir(os.path.join(self.directory, name))
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def has(self, step: int, item: str) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), item))

  def save(
    self,
    step: int,
    *,
    config: ml_collections.ConfigDict,
    tokenizer,
    state: Any = None,
    params: Any = None,
    data_iter: Any = None,
    metrics: dict[str, float] | None = None,
    extra_meta: dict[str, Any] | None = None,
  ) -> None:
    """Saves `state` (with `data_iter`) or `params`, plus the config, the tokenizer's
    fingerprint (none for a model without one, the VQGAN) and a checksum of every array, as `step` (once: a step already saved is left
    as it is). Training checkpoints beyond `keep` are deleted first, except the newest good
    one."""
    if step in self.manager.all_steps():
      return
    if self._rotating:
      self._rotate(self.keep - 1)
    saved = {"state": state} if state is not None else {"params": params}
    fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else {}
    meta = dict(fingerprint, checksums=checksums(saved), **(extra_meta or {}))
    items = {
      "config": ocp.args.JsonSave(config.to_dict()),
      "meta": ocp.args.JsonSave(meta),
    }
    if state is not None:
      items["state"] = ocp.args.PyTreeSave(state)
    if params is not None:
      items["params"] = ocp.args.PyTreeSave(params)
    if data_iter is not None:
      items["data"] = data_state.Save(data_iter)
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)

  # -- good steps and rotation ---------------------------------------------------------------

  def _good_file(self) -> str:
    return os.path.join(self.directory, GOOD_STEPS_FILE)

  def good_steps(self) -> list[int]:
    """Steps confirmed good (`mark_good`) that still exist."""
    try:
      with open(self._good_file()) as f:
        marked = set(json.load(f))
    except (OSError, ValueError):
      return []
    return sorted(marked & set(self.manager.all_steps()))

  def mark_good(self, step: int) -> None:
    """Records that the steps after `step` stayed finite (process 0 writes, atomically)."""
    good = self.good_steps()
    if step in good or step not in self.manager.all_steps() or jax.process_index() != 0:
      return
    tmp = self._good_file() + ".tmp"
    with open(tmp, "w") as f:
      json.dump(sorted(good + [step]), f)
    os.replace(tmp, self._good_file())

  def _rotate(self, keep: int) -> None:
    """Deletes all but the newest `keep` steps and the newest good one."""
    self.wait()
    steps = self.steps()
    good = self.good_steps()
    protected = set(steps[-keep:] if keep > 0 else []) | set(good[-1:])
    for step in steps:
      if step not in protected:
        self.manager.delete(step)

  def discard_after(self, step: int | None) -> list[int]:
    """Deletes every step newer than `step` (None: every step); returns them."""
    self.wait()
    dropped = [s for s in self.steps() if step is None or s > step]
    for s in dropped:
      self.manager.delete(s)
    return dropped

  # -- integrity -------------------------------------------------------------------------------

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step out of the directory (kept for inspection, never read again)."""
    target_root = self.directory.rstrip("/") + ".damaged"
    target = os.path.join(target_root, str(step))
    n = 1
    while os.path.exists(target):
      n += 1
      target = os.path.join(target_root, f"{step}.{n}")
    if jax.process_index() == 0:
      os.makedirs(target_root, exist_ok=True)
      shutil.move(self.step_dir(step), target)
    multihost.sync(f"quarantine_{step}")
    return target

  def _quarantine(self, step: int) -> str:
    target = self._move_aside(step)
    with integrity.listing(self._listing_log):
      self.manager.reload()
    return target

  def log_damage(self, step: int, damage: DamagedCheckpoint) -> str:
    """Writes the damage's detail to `<directory>.damaged/<step>.log`; returns ' (details
    in <that file>)' for the report line, or '' where it cannot be written."""
    detail = "\n".join([damage.detail, *self._listing_log]).strip()
    if not detail:  # the report line says all there is
      return ""
    path = integrity.damage_log(self.directory, step, str(damage), detail)
    return f" (details in {path})" if path else ""

  def check_files(self, step: int, items: tuple[str, ...]) -> None:
    """DamagedCheckpoint naming what the step lacks for reading `items`."""
    what = integrity.missing_part(self.step_dir(step), items)
    if what is not None:
      raise DamagedCheckpoint(f"{self.source(step)}: {what}")

  def warn_unverifiable(self, step: int, meta: dict | None, tokenizer: bool) -> None:
    """One warning line for a step that cannot be verified (no checksums; no tokenizer
    fingerprint, for a model with a tokenizer): it is used as it is."""
    missing = unverifiable(meta, tokenizer)
    if missing:
      logging.warning(
        "Checkpoint %s has %s, so it cannot be verified (written before they were recorded, "
        "or its meta item was edited); using it as it is.",
        self.source(step),
        missing,
      )

  def parameter_item(self, step: int) -> str:
    """'params' for a step of parameters alone (best step, export), else 'state'."""
    recorded = integrity.recorded_items(self.step_dir(step))
    if recorded is not None:
      return "params" if "params" in recorded else "state"
    return "params" if self.has(step, "params") else "state"

  def saved_json(self, step: int, item: str) -> dict | None:
    """The step's `config` or `meta` (None if it has none); DamagedCheckpoint if unreadable."""
    if not self.has(step, item):
      return None
    with integrity.reading(self.source(step)):
      args = ocp.args.Composite(**{item: ocp.args.JsonRestore()})
      return self.manager.restore(step, args=args)[item]

  def saved_tree(self, step: int, item: str) -> Any:
    """The tree of an item's saved array metadata (shapes, dtypes), read without its arrays."""
    with integrity.reading(self.source(step)):
      metadata = self.manager.item_metadata(step)[item]
      return metadata.tree if hasattr(metadata, "tree") else metadata

  def saved_param_shapes(self, step: int) -> Any:
    """The tree of saved parameter metadata (shapes, dtypes), read without loading arrays."""
    if self.parameter_item(step) == "params":
      return self.saved_tree(step, "params")
    return self.saved_tree(step, "state")["params"]

  def restore_train_state(
    self,
    abstract_state: Any,
    data_iter: Any,
    step: int,
    tokenizer=None,
    tokenizer_path: str = "",
  ) -> tuple[Any, dict]:
    """(TrainState, meta) of `step`, onto the shardings in `abstract_state` (any mesh),
    rewinding `data_iter` to where it was. Before any array is read, the step's files are
    checked, and the parameter shapes and (when given) the tokenizer against the checkpoint
    (CheckpointError); after, the arrays' checksums. A damaged step raises
    DamagedCheckpoint."""
    source = self.source(step)
    self.check_files(step, ("state", "meta") + ("data",) * (data_iter is not None))
    saved = self.saved_tree(step, "state")
    meta = self.saved_json(step, "meta") or {}
    check_param_shapes(abstract_state.params, saved["params"], source)
    check_state_structure(abstract_state, saved, source, os.path.dirname(self.directory))
    if tokenizer is not None:
      check_tokenizer(meta, tokenizer, tokenizer_path, source)
    items = {"state": ocp.args.PyTreeRestore(abstract_state, _restore_args(abstract_state))}
    if data_iter is not None:
      items["data"] = data_state.Restore(data_iter)
    with integrity.reading(source):
      state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    verify_checksums({"state": state}, meta, source)
    self.warn_unverifiable(step, meta, tokenizer is not None)
    return state, meta

  def restore_intact_train_state(
    self, abstract_state: Any, data_iter: Any, tokenizer=None, tokenizer_path: str = ""
  ):
    """(state, step, meta) of the newest step that restores and verifies; damaged steps
    are reported in one line each and moved to `<directory>.damaged/`. (None, None, None)
    when no step is left; CheckpointError when the model or the tokenizer does not fit the
    checkpoint."""
    while (step := self.latest_step()) is not None:
      try:
        state, meta = self.restore_train_state(
          abstract_state, data_iter, step, tokenizer, tokenizer_path
        )
        return state, step, meta
      except DamagedCheckpoint as e:
        details = self.log_damage(step, e)
        moved = self._quarantine(step)
        older = self.latest_step()
        logging.warning(
          "Checkpoint damaged, %s; moved it to %s and %s%s.",
          e,
          moved,
          f"fall back to step {older}" if older is not None else "no older step is left",
          details,
        )
    return None, None, None

  def restore_params(self, step: int, target: Any) -> Any:
    """The parameters alone (no optimizer state is read) onto `target`'s shardings."""
    with integrity.reading(self.source(step)):
      if self.parameter_item(step) == "params":
        args = ocp.args.PyTreeRestore(target, _restore_args(target))
        return self.manager.restore(step, args=ocp.args.Composite(params=args))["params"]
      item = {"params": target}
      args = ocp.args.PyTreeRestore(item, _restore_args(item), partial_restore=True)
      return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


@dataclasses.dataclass
class LoadedParams:
  params: Any
  step: int
  config: dict | None  # the config saved with the step
  directory: str  # the checkpoint directory it came from

  @property
  def source(self) -> str:
    """'<directory> (step N)', for messages."""
    return f"{self.directory} (step {self.step})"


def open_steps(path: str) -> Checkpoints:
  """The checkpoint directory of a workdir, export or checkpoint path, for reading;
  CheckpointError if it holds no checkpoint."""
  directory = resolve(path)
  strays = []
  if os.path.isdir(directory):
    ckpts = Checkpoints(directory, create=False, async_save=False)
    if ckpts.steps():
      return ckpts
    strays = ckpts.stray_files()
  where = path if os.path.abspath(path) == directory else f"{path} (looked in {directory})"
  files = f" ({', '.join(map(str, strays))}: a file, not a step folder)" if strays else ""
  raise CheckpointError(
    f"no checkpoint in {where}{files}; train first with --mode=train --workdir={path}, or "
    "point at a workdir that holds one."
  )


def saved_config(ckpts: Checkpoints, step: int | None, workdir: str) -> dict:
  """The config a checkpoint step was saved with (older steps: the workdir's config.json);
  `step` None: the newest step whose config reads (a damaged step is reported when its
  parameters are read)."""
  if step is None:
    for newer in reversed(ckpts.steps()[1:]):
      try:
        return saved_config(ckpts, newer, workdir)
      except DamagedCheckpoint:
        continue
    step = ckpts.steps()[0]
  saved = ckpts.saved_json(step, "config")
  if saved is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise CheckpointError(f"{workdir} has a checkpoint but no config.json.")
    with open(path) as f:
      saved = json.load(f)
  return saved


def load_intact(
  path: str,
  load: Callable[[Checkpoints, int], T],
  step: int | None = None,
  fall_back: bool = True,
  instead: str = "",
) -> T:
  """`load(checkpoints, step)` on a workdir / export / checkpoint path, for `step`, or
  (None) for the latest step, which with `fall_back` is the newest intact one: each damaged
  newer step is reported in one warning line (the detail in `<directory>.damaged/<step>.log`)
  and left where it is (a reader changes no workdir). A damaged step asked for by number, or
  without `fall_back`, is one DamagedCheckpoint naming it and, after the detail file, what to
  load `instead` (default: another step, or the newest intact one)."""
  ckpts = open_steps(path)
  strays = ckpts.stray_files()
  steps = sorted(set(ckpts.steps()) | set(strays))

  def checked_load(step: int) -> T:
    if step in strays:  # Orbax lists no such step: name it rather than pass over it
      raise DamagedCheckpoint(f"{ckpts.source(step)}: it is a file, not a checkpoint step folder")
    return load(ckpts, step)

  if step is not None or not fall_back:
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint step {step} in {ckpts.directory}; available: {steps}.")
    try:
      return checked_load(step)
    except DamagedCheckpoint as e:
      details = ckpts.log_damage(step, e)
      others = ", ".join(str(s) for s in steps if s != step) or "none"
      instead = instead or (
        f"load another step (others here: {others}), or name no step to load the newest intact one"
      )
      raise DamagedCheckpoint(f"damaged checkpoint {e}{details}; {instead}.", e.detail) from None
  for i in reversed(range(len(steps))):
    try:
      return checked_load(steps[i])
    except DamagedCheckpoint as e:
      details = ckpts.log_damage(steps[i], e)
      older = f"fall back to step {steps[i - 1]}" if i else "no older step is left"
      logging.warning("Checkpoint damaged, %s; left it in place and %s%s.", e, older, details)
  raise DamagedCheckpoint(
    f"every checkpoint step in {ckpts.directory} is damaged ({', '.join(map(str, steps))}); "
    f"the warnings above say what is wrong with each."
  )


def read_params(
  ckpts: Checkpoints, step: int, target: Any, tokenizer=None, tokenizer_path: str = ""
) -> LoadedParams:
  """The parameters of one step onto the shardings of `target` (a tree of
  ShapeDtypeStructs with shardings; a tree without shardings gives host arrays): the step's
  files checked first, its parameter shapes against `target` and `tokenizer` (when given)
  against the one it was trained with (CheckpointError), and after the read the parameters'
  checksums (DamagedCheckpoint)."""
  source = ckpts.source(step)
  item = ckpts.parameter_item(step)
  ckpts.check_files(step, (item, "meta", "config"))
  shapes = ckpts.saved_param_shapes(step)
  meta = ckpts.saved_json(step, "meta")
  config = ckpts.saved_json(step, "config")
  check_param_shapes(target, shapes, source)
  if tokenizer is not None:
    check_tokenizer(meta, tokenizer, tokenizer_path, source)
  params = ckpts.restore_params(step, target)
  # A training step's checksums are the whole state's: its parameters are under 'state/'.
  verify_checksums({"params": params}, meta, source, prefix="" if item == "params" else "state/")
  ckpts.warn_unverifiable(step, meta, tokenizer is not None)
  return LoadedParams(params, int(step), config, ckpts.directory)


def load_params(
  path: str,
  target: Any,
  step: int | None = None,
  tokenizer=None,
  tokenizer_path: str = "",
) -> LoadedParams:
  """The parameters of `step` (None: the newest intact step) of a workdir / export /
  checkpoint path, read and checked by `read_params`."""
  return load_intact(path, lambda c, s: read_params(c, s, target, tokenizer, tokenizer_path), step)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """The config of the latest run, beside the checkpoints, for humans and tools.

  Written by process 0 only: with several processes the workdir is shared, and concurrent
  writers of one temporary file would race.
  """
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def copy_tokenizer(source: str, workdir: str) -> str | None:
  """Copies the tokenizer saved with `source` (a workdir / export / checkpoint path) into
  `workdir/tokenizer/spm.model` unless one is there; returns the copy's path or None."""
  target = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.exists(target):
    return target
  found = tokenizer_beside(source)
  if found is None:
    return None
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.copyfile(found, target)
  logging.info("Using the tokenizer of %s", os.path.dirname(os.path.dirname(found)))
  return target
