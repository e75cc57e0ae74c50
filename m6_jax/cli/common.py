"""What several modes share: the --config and --workdir flags, flag parsing that ends a
mistake in one `error:` line, and reading the config file (its values and module-level
constants such as PUBLISHED_PARAMS and TOPOLOGY)."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Iterable

import ml_collections
from absl import flags
from ml_collections import config_flags

from m6_jax.data import drawings, synthetic
from m6_jax.errors import exit_with, one_line

CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/base.py (variants: configs/base.py:runlocal); override any value "
  "with --config.<key>=<value>, e.g. --config.train.steps=50.",
  lock_config=True,
)
WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Directory for checkpoints, metrics.jsonl, TensorBoard events, the tokenizer and "
  "config.json; a workdir holding a checkpoint resumes from it (train) or is read from.",
)

EVAL_SPLIT = flags.DEFINE_enum(
  "split",
  "validation",
  ["validation", synthetic.UNSEEN_SPLIT, drawings.SPLIT],
  "--mode=eval / text_to_image_eval: the held-out split; unseen_combinations (synthetic world "
  "only): scenes of (colour, shape, cell) combinations no training scene holds; drawings "
  "(--mode=eval on the synthetic world only): one object drawn as in an image editor, of "
  "any size, place, canvas and grey, some saved as JPEG.",
)

# What config_flags raises: an unknown `--config.x.y` key, a wrong type, a failing config file.
CONFIG_ERRORS = (AttributeError, KeyError, ValueError, TypeError, OSError)


def _config_args(argv: list[str]) -> str:
  return " ".join(a for a in argv[1:] if a.startswith("--config"))


def _config_file(argv: list[str]) -> str | None:
  """The --config file named on the command line (without its :variant), or None."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return None


def fail_config(argv: list[str], error: BaseException) -> None:
  """One `error:` line for a config that did not load: a missing file lists the shipped ones."""
  path = _config_file(argv)
  if path and not os.path.isfile(path):
    shipped = (
      sorted(f for f in os.listdir("configs") if f.endswith(".py"))
      if os.path.isdir("configs")
      else []
    )
    exit_with(
      f"no such config file: {path}"
      + (f"; the shipped ones are configs/{{{','.join(shipped)}}}" if shipped else "")
    )
  exit_with(f"bad config ({_config_args(argv)}): {one_line(error)}")


def stray_arguments(args: list[str], modes: Iterable[str]) -> str:
  """The error for arguments that are not flags, with the flag the first one probably meant."""
  first = args[0]
  if first.split(":")[0].endswith(".py"):
    hint = f"did you mean --config={first}?"
  elif first in modes:
    hint = f"did you mean --mode={first}?"
  elif first.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
    hint = f"did you mean --image={first}?"
  elif "=" in first and not first.startswith("-"):
    hint = f"did you mean --{first}?"
  else:
    hint = "flags are --name=value; --mode=<mode> --helpshort lists a mode's flags"
  quoted = " ".join(repr(a) for a in args)
  return f"unexpected argument{'s' if len(args) > 1 else ''} {quoted}; {hint}"


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for `app.run(..., flags_parser=parse_flags)`: a bad or missing flag,
  or a config that fails to load, is one `error:` line and status 2, not absl's usage dump;
  asking for help succeeds (status 0)."""
  path = _config_file(argv)
  if path and not os.path.isfile(path):  # config files load lazily: say it before JAX starts
    fail_config(argv, FileNotFoundError(path))
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl exits with 1 after printing the help that was asked for
    if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    exit_with(
      f"{one_line(e)} (flags: {_config_args(argv) or ' '.join(argv[1:])}). "
      "Pass --mode=<mode> --helpshort to see a mode's flags."
    )
  except CONFIG_ERRORS as e:
    fail_config(argv, e)


def load_config(
  mode: str, required: bool = True, workdir_hint: str | None = None
) -> ml_collections.ConfigDict | None:
  """The --config value (None when absent and not `required`); exits with one line if it
  failed to load or is missing. `workdir_hint` makes --workdir required too."""
  try:
    config = CONFIG.value
    if config is not None:
      config.to_dict()  # a config file that failed to load raises its error here
  except CONFIG_ERRORS as e:
    fail_config(sys.argv, e)
  if config is None and required:
    exit_with(f"--mode={mode} needs --config, e.g. --config=configs/base.py")
  if workdir_hint and not WORKDIR.value:
    exit_with(f"--mode={mode} needs --workdir ({workdir_hint}).")
  return config


def config_overrides() -> set[str]:
  """The config keys the command line sets (`--config.model.vocab_size=8`: model.vocab_size)."""
  return set(config_flags.get_override_values(flags.FLAGS["config"]))


def config_file_constant(name: str) -> Any:
  """A module-level constant of the --config file (e.g. PUBLISHED_PARAMS, TOPOLOGY), or None."""
  path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
  spec = importlib.util.spec_from_file_location("_m6_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return getattr(module, name, None)
