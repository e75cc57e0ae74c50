"""Helpers shared by test modules (import as `from testing_utils import ...`: pytest puts
tests/ on sys.path; a name other than `conftest`, which tests/data/ has too)."""

from __future__ import annotations

import os

# Tests compile far more than they run (tiny models, a few steps each): XLA's backend
# optimisations cost more compile time than they save at run time here, and so do XLA:CPU's
# MLIR fusion emitters against its older LLVM IR ones (about a fifth of a compile's CPU time).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


# The config overrides of a tiny model on short texts and small images, for tests that train
# through the command line and assert nothing of the model's size.
TINY_RUN = {
  "model.num_layers": 1,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.head_dim": 16,
  "model.mlp_dim": 64,
  "model.vocab_size": 512,
  "data.image_size": 32,
  "data.batch_size": 8,
  "data.src_len": 16,
  "data.tgt_len": 16,
}


def cpu_env(devices: int = 1, platforms: str | None = "cpu") -> dict[str, str]:
  """The environment of a subprocess the tests start: `devices` CPU devices and the tests'
  compile flags; `platforms=None` leaves JAX_PLATFORMS unset (as a user would)."""
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)
  if platforms:
    env["JAX_PLATFORMS"] = platforms
  flags = FAST_COMPILE + (
    f" --xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  )
  env["XLA_FLAGS"] = flags
  return env


def assert_every_step_once(records, last_step):
  """Each metrics record covers the steps since the previous one, none twice, none lost."""
  metrics = [r for r in records if "event" not in r]
  steps = [r["step"] for r in metrics]
  assert steps == sorted(set(steps)), steps
  covered = [r["steps_averaged"] + r.get("steps_nonfinite", 0) for r in metrics]
  assert covered == [b - a for a, b in zip([0] + steps, steps)], list(zip(steps, covered))
  assert steps[-1] == last_step


# -- damaged checkpoints ---------------------------------------------------------------------

# Each kind of damage to a training step, and the words its one report line must hold.
DAMAGE = {
  "truncated_file": "an array file is truncated",
  "flipped_byte": "does not match its checksum",
  "flipped_index_byte": "the array index was changed or is corrupt",
  "garbage_file": "an array file was changed or is corrupt",
  "deleted_metadata": "missing metadata (state/_METADATA)",
  "deleted_meta_item": "missing item 'meta'",
  "deleted_data_iterator": "missing item 'data'",
  "empty_step": "the step folder is empty",
  "plain_file": "it is a file, not a checkpoint step folder",
}
# What a failed read must not leave on the screen (the detail goes to a file).
LIBRARY_NOISE = (
  "Traceback",
  "never retrieved",
  "Event loop is closed",
  "DATA_LOSS",
  "OUT_OF_RANGE",
)
LIBRARY_PATHS = ("/orbax/", "/grain/", "/tensorstore/", "/asyncio/")


def _flip_byte(path: str, offset: int | None = None) -> None:
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2 if offset is None else offset)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))


def _largest_parameter(step_dir: str) -> tuple[str, int, int]:
  """(file, offset, length) of the bytes of the largest parameter of a step, from its
  OCDBT index (a byte flipped there changes a parameter, not the optimizer state)."""
  import glob

  import tensorstore as ts

  item = glob.glob(f"{step_dir}/*/_METADATA")[0].split("/")[-2]  # 'state' or 'params'
  kvstore = ts.KvStore.open({"driver": "file", "path": f"{step_dir}/{item}/"}).result()
  dump = ts.ocdbt.dump(kvstore).result()
  values, nodes = [], [dump["versions"][-1]["root"]["location"]]
  while nodes:
    for entry in ts.ocdbt.dump(kvstore, nodes.pop()).result()["entries"]:
      if "node" in entry or "location" in entry:
        nodes.append(entry.get("node", entry.get("location")))
      elif "indirect_value" in entry and (item == "params" or entry["key"].startswith(b"params.")):
        directory, name, offset, length = entry["indirect_value"].split(":")[1:]
        values.append(
          (f"{step_dir}/{item}/{directory.strip('/')}/{name}", int(offset), int(length))
        )
  return max(values, key=lambda v: v[2])


def _flip_parameter_byte(step_dir: str) -> None:
  path, offset, length = _largest_parameter(step_dir)
  _flip_byte(path, offset + length // 2)


def damage_step(step_dir: str, kind: str) -> None:
  """Damages a saved step as a disk or a person could (`kind`: a key of DAMAGE, or
  'unverifiable_flip': a flipped byte in an array file with the checksums deleted)."""
  import glob
  import json
  import shutil

  if kind == "truncated_file":  # in the middle of a parameter: no reader gets past it
    path, offset, length = _largest_parameter(step_dir)
    with open(path, "r+b") as f:
      f.truncate(offset + length // 2)
  elif kind == "flipped_byte":  # inside a parameter's bytes: Orbax reads it without an error
    _flip_parameter_byte(step_dir)
  elif kind == "flipped_index_byte":  # the index TensorStore reads every array through
    _flip_byte(glob.glob(f"{step_dir}/*/d/*")[0])
  elif kind == "garbage_file":  # the file that holds the largest parameter
    path = _largest_parameter(step_dir)[0]
    size = os.path.getsize(path)
    with open(path, "wb") as f:
      f.write(os.urandom(size))
  elif kind == "deleted_metadata":
    os.remove(glob.glob(f"{step_dir}/*/_METADATA")[0])
  elif kind == "deleted_meta_item":
    _flip_parameter_byte(step_dir)
    shutil.rmtree(f"{step_dir}/meta")
  elif kind == "deleted_data_iterator":
    os.remove(f"{step_dir}/data/process_0-of-1.json")
  elif kind == "empty_step":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  elif kind == "plain_file":
    shutil.rmtree(step_dir)
    with open(step_dir, "w") as f:
      f.write("not a checkpoint")
  elif kind == "unverifiable_flip":
    _flip_parameter_byte(step_dir)
    with open(f"{step_dir}/meta/metadata") as f:
      meta = json.load(f)
    del meta["checksums"]
    with open(f"{step_dir}/meta/metadata", "w") as f:
      json.dump(meta, f)
  else:
    raise ValueError(kind)


def warnings_and_noise(records, err: str) -> tuple[list[str], list[str]]:
  """(the warning lines, the library noise) of what a run logged (`records`, pytest's
  caplog.records) and printed on stderr (`err`, after a gc.collect(): late errors of a
  failed read surface when their futures are collected)."""
  warnings = [r.getMessage() for r in records if r.levelno >= 30]
  noise = [
    r.getMessage()[:300]
    for r in records
    if r.levelno >= 30 and any(p in r.pathname for p in LIBRARY_PATHS)
  ]
  noise += [l[:300] for l in err.splitlines() if any(n in l for n in LIBRARY_NOISE)]
  noise += [w[:300] for w in warnings if any(n in w for n in LIBRARY_NOISE)]
  return warnings, noise
