"""Entry point: `python -m m6_jax.main --config=configs/base.py --workdir=/tmp/m6`.

Flags:
  --config     a config file (`configs/<name>.py`, optionally `:variant`); override any value
               with `--config.<key>=<value>`, e.g. `--config.train.steps=50`.
  --workdir    where checkpoints, metrics.jsonl, TensorBoard events, the tokenizer and
               config.json go. A workdir holding a checkpoint resumes from it.
  --mode       train: train or resume in --workdir (needs --config, --workdir).
               prepare_data: convert user data (image folder + JSONL, or MUGE TSV) into a
               TFDS array_record dataset under --data_dir/--name (needs the prepare_data
               flags below, no config).

Every user mistake (bad flag, unknown config key, impossible mesh, missing file) ends with one
`error: ...` line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/base.py (variants: configs/base.py:runlocal).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "prepare_data"], "What to run.")

# --mode=prepare_data
_INPUT_FORMAT = flags.DEFINE_enum(
  "input_format",
  "image_folder_jsonl",
  ["image_folder_jsonl", "muge_tsv"],
  "prepare_data: image_folder_jsonl (images + JSONL with image/caption/question/answer) or "
  "muge_tsv (id<TAB>base64 image TSV + JSONL of texts keyed by image id).",
)
_INPUT_PATH = flags.DEFINE_string(
  "input_path",
  None,
  "prepare_data: a JSONL file, 'train=a.jsonl,validation=b.jsonl' (MUGE: "
  "'train=texts.jsonl+images.tsv,...'), or a folder whose file names contain the split.",
)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "prepare_data: TFDS data_dir to write into.")
_NAME = flags.DEFINE_string("name", None, "prepare_data: dataset name (a folder in data_dir).")
_IMAGE_DIR = flags.DEFINE_string(
  "image_dir",
  "",
  "prepare_data: folder the JSONL image paths are relative to (default: the JSONL's folder).",
)
_VALIDATION_FRACTION = flags.DEFINE_float(
  "validation_fraction",
  0.0,
  "prepare_data: share of images (by hash of the image) held out as the validation split "
  "when no validation file is given.",
)
_MAX_TEXT_CHARS = flags.DEFINE_integer(
  "max_text_chars", 1000, "prepare_data: longer texts are rejected as text_too_long."
)
_MAX_IMAGE_SIZE = flags.DEFINE_integer(
  "max_image_size", 512, "prepare_data: images are re-encoded with their long side at most this."
)
_MAX_REJECTED_FRACTION = flags.DEFINE_float(
  "max_rejected_fraction",
  0.1,
  "prepare_data: stop with an error when a split rejects more than this share of records.",
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "prepare_data: replace an existing dataset of the same name."
)

# What config_flags raises for an unknown `--config.x.y` key, a value of the wrong type, a
# missing config file, or a config file whose get_config() fails.
_CONFIG_ERRORS = (AttributeError, KeyError, ValueError, TypeError, OSError)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _one_line(error: BaseException) -> str:
  """An error's text on one line; for text that embeds a traceback, its last line."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if any(l.startswith("Traceback") for l in lines):
    lines = lines[-1:]
  if isinstance(error, (KeyError, AttributeError)) and lines:
    # ml_collections words an unknown key as "'lrr'\nDid you mean "lr" instead of "lrr"?".
    lines = [f"unknown key '{lines[0].strip(chr(39) + chr(34))}'."] + [
      l.strip("'") for l in lines[1:]
    ]
  return " ".join(lines) or type(error).__name__


def _config_args(argv: list[str]) -> str:
  return " ".join(a for a in argv[1:] if a.startswith("--config"))


class _QuietLibraries(pylogging.Filter):
  """Keeps our INFO progress lines readable: libraries only speak up at WARNING or above."""

  _NOISY = ("/orbax/", "/grain/", "/jax/", "/tensorstore/")

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or not any(
      part in record.pathname for part in self._NOISY
    )


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(
      f"{_one_line(e)} (flags: {_config_args(argv) or ' '.join(argv[1:])}). "
      "Pass --helpshort to see the flags."
    )
  except _CONFIG_ERRORS as e:
    _fail(f"bad config ({_config_args(argv)}): {_one_line(e)}")


def _load_config():
  """The --config value; exits with one line if it is missing or failed to load."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.to_dict()  # a config file that failed to load raises its error here
  except _CONFIG_ERRORS as e:
    _fail(f"bad config ({_config_args(sys.argv)}): {_one_line(e)}")
  if config is None:
    _fail("--config is required, e.g. --config=configs/base.py")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=/tmp/m6_base")
  return config


def run_train() -> None:
  from m6_jax.train import loop

  result = loop.train(_load_config(), _WORKDIR.value)
  first, last, key = result.first_metrics, result.last_metrics, "image_to_text_loss"
  if key in first and key in last:
    print(
      f"image_to_text loss: step {first['step'] - 1} (initial parameters): "
      f"{first[key]:.4f} -> step "
      f"{last['step']}: {last[key]:.4f} ({last[key] / first[key]:.2f}x)"
    )


def run_prepare_data() -> None:
  from m6_jax.data import sources

  if not _INPUT_PATH.value or not _NAME.value:
    _fail("--mode=prepare_data needs --input_path and --name (and usually --data_dir).")
  sources.prepare_data(
    _INPUT_FORMAT.value,
    _INPUT_PATH.value,
    _DATA_DIR.value,
    _NAME.value,
    validation_fraction=_VALIDATION_FRACTION.value,
    image_dir=_IMAGE_DIR.value or None,
    max_text_chars=_MAX_TEXT_CHARS.value,
    max_image_size=_MAX_IMAGE_SIZE.value,
    max_rejected_fraction=_MAX_REJECTED_FRACTION.value,
    overwrite=_OVERWRITE.value,
  )


MODES = {"train": run_train, "prepare_data": run_prepare_data}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  # Imported here so that `--help` and flag errors are instant and don't start JAX.
  from m6_jax import config as config_lib
  from m6_jax.data import sources
  from m6_jax.train import loop

  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  user_errors = (
    config_lib.ConfigError,
    loop.TrainingError,
    sources.DataPreparationError,
    FileNotFoundError,
  )
  try:
    MODES[_MODE.value]()
  except user_errors as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
