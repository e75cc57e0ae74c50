"""`--mode=export`: a checkpoint step's parameters alone (no optimizer state), with the config
and the tokenizer, in a workdir's shape, so that generate, eval and init_from read it as they
read a workdir."""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from m6_jax.checkpoint import checkpoints
from m6_jax.errors import CheckpointError


def _disk_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
  )


def export(
  params: Any,
  step: int,
  source_dir: str,
  config: ml_collections.ConfigDict,
  tokenizer,
  tokenizer_path: str,
  out_dir: str,
) -> dict[str, Any]:
  """Writes `params` (step `step` of the checkpoint directory `source_dir`) with the config
  and the tokenizer into `out_dir`, in a workdir's shape (`checkpoints/<step>/params`,
  `config.json`, `tokenizer/spm.model`). Returns the sizes on disk of the export's step and
  of the step it came from."""
  out_dir = os.path.abspath(out_dir)
  target = checkpoints.checkpoint_dir(out_dir)
  if os.path.isdir(target) and os.listdir(target):
    raise CheckpointError(f"{out_dir} already holds an export; pick a new --export_dir.")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.tokenizer_path = ""  # the export's own tokenizer/spm.model
  ckpts = checkpoints.Checkpoints(target, async_save=False)
  ckpts.save(step, config=config, tokenizer=tokenizer, params=params)
  ckpts.wait()
  if jax.process_index() == 0:
    os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, checkpoints.TOKENIZER_FILE))
  checkpoints.write_config(out_dir, config)
  return {
    "step": step,
    "export_bytes": _disk_bytes(os.path.join(target, str(step))),
    "source_bytes": _disk_bytes(os.path.join(source_dir, str(step))),
    "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
  }
