"""Entry point: `python -m m6_jax.main --config=configs/base.py --workdir=/tmp/m6`.

Flags:
  --config     a config file (`configs/<name>.py`, optionally `:variant`); override any value
               with `--config.<key>=<value>`, e.g. `--config.train.steps=50`.
  --workdir    where checkpoints, metrics.jsonl, TensorBoard events, the tokenizer and
               config.json go. A workdir holding a checkpoint resumes from it.
  --mode       train (more modes arrive with their features).

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
_MODE = flags.DEFINE_enum("mode", "train", ["train"], "What to run.")

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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
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

  # Imported here so that `--help` and flag errors are instant and don't start JAX.
  from m6_jax import config as config_lib
  from m6_jax.train import loop

  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    if _MODE.value == "train":
      result = loop.train(config, _WORKDIR.value)
      first, last, key = result.first_metrics, result.last_metrics, "image_to_text_loss"
      if key in first and key in last:
        print(
          f"image_to_text loss: step {first['step'] - 1} (initial parameters): "
          f"{first[key]:.4f} -> step "
          f"{last['step']}: {last[key]:.4f} ({last[key] / first[key]:.2f}x)"
        )
  except (config_lib.ConfigError, loop.TrainingError, FileNotFoundError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
