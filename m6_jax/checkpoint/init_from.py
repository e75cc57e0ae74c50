"""Fine-tuning (`init_from`): the model a run starts from is the checkpoint's, not the config's.

A fine-tuning config (configs/finetune_*.py) says what to train on and how; the model's
shape is the pretrained checkpoint's. With `config.init_from` set, `model_of_checkpoint`
returns the config with the `model.*` keys (all but `model.family`) and the data keys that
size the position tables (`data.image_size`, `data.src_len`, `data.tgt_len`) of the
checkpoint the run starts from: the workdir's own latest step when it holds one (a
fine-tune that resumes), else the latest step of `init_from`. Keys the user set on purpose
(`explicit`: the command line's `--config.<key>` overrides) are kept; one that changes a
parameter's shape then stops the run with the shape error, which names the key
(`explain_shape_error`). The tokenizer comes from the checkpoint too (m6_jax/train/loop.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection

import ml_collections
from absl import logging

from m6_jax import config as config_lib
from m6_jax.checkpoint import checkpoints
from m6_jax.errors import CheckpointError

# The data keys whose values size parameters (the image and text position tables).
SHAPE_DATA_KEYS = ("data.image_size", "data.src_len", "data.tgt_len")


@dataclasses.dataclass(frozen=True)
class StartingModel:
  """The config to train with, and the explicit keys that differ from the checkpoint's
  ({key: (the config's value, the checkpoint's)})."""

  config: ml_collections.ConfigDict
  kept: dict[str, tuple[Any, Any]]


def _saved_config(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, str]:
  """(config, directory) of the checkpoint the run starts from: the workdir's own latest
  step (a resume), else init_from's."""
  try:
    ckpts, where = checkpoints.open_steps(workdir), workdir
  except CheckpointError:  # no checkpoint of its own yet: a fresh start from init_from
    ckpts, where = checkpoints.open_steps(config.init_from), config.init_from
  return checkpoints.saved_config(ckpts, ckpts.latest_step(), where), ckpts.directory


def _keys(config: ml_collections.ConfigDict) -> list[str]:
  model = [f"model.{k}" for k in config.model.keys() if k != "family"]
  return model + list(SHAPE_DATA_KEYS)


def _get(tree: Any, key: str) -> Any:
  for part in key.split("."):
    if part not in tree:
      return None
    tree = tree[part]
  return tree


def _same(a: Any, b: Any) -> bool:
  as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON)
  return as_list(a) == as_list(b)


def model_of_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, explicit: Collection[str] = ()
) -> StartingModel:
  """`config` with the model of the checkpoint the run starts from (see the module
  docstring); unchanged without `config.init_from`, or when the checkpoint is of another
  model family (the parameters' shapes then say what differs)."""
  if not config.init_from:
    return StartingModel(config, {})
  saved, directory = _saved_config(config, workdir)
  saved = config_lib.as_trained(saved)  # a key added since reads as the model was trained
  if saved.get("model", {}).get("family", "m6") != config.model.family:
    return StartingModel(config, {})
  config = config.copy_and_resolve_references()
  taken, kept = [], {}
  for key in _keys(config):
    theirs, mine = _get(saved, key), _get(config, key)
    if theirs is None or _same(mine, theirs):
      continue
    if key in explicit:
      kept[key] = (mine, theirs)
      continue
    section, leaf = key.split(".")
    with config.unlocked():
      config[section][leaf] = tuple(theirs) if isinstance(theirs, list) else theirs
    taken.append(f"{key}={theirs!r} (the config had {mine!r})")
  if taken:
    logging.info("The model of %s: %s.", directory, ", ".join(taken))
  for key, (mine, theirs) in kept.items():
    logging.warning("Keeping --config.%s=%r; the checkpoint's is %r.", key, mine, theirs)
  return StartingModel(config, kept)


def explain_shape_error(error: CheckpointError, kept: dict[str, tuple[Any, Any]]) -> Exception:
  """The shape error of a run whose command line set model keys the checkpoint does not
  have, with those keys named (else `error` itself)."""
  if not kept or "does not fit this config" not in str(error):
    return error
  keys = ", ".join(
    f"--config.{k}={mine!r} (the checkpoint's: {theirs!r})" for k, (mine, theirs) in kept.items()
  )
  return CheckpointError(
    f"{error} The command line sets {keys}: leave out what changes a parameter's shape to "
    "fine-tune the checkpoint's model."
  )
