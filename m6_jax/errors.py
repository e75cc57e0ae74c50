"""The errors a user can cause, in one family.

The command line (m6_jax/main.py) turns every `UserError` into one `error: ...` line on stderr
and exit status 2;
anything else is a bug and keeps its traceback. Each message says what was wrong, where, and
how to fix it. The modules that raise them re-export their own (`config.ConfigError`,
`checkpoints.CheckpointError`, ...), so callers import them from where they are raised.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input, flags, config or files: reported in one line, never as a traceback."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key and the fix."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that is missing, damaged or does not fit the model or tokenizer."""


class DamagedCheckpoint(CheckpointError):
  """A checkpoint step that cannot be read, or whose arrays differ from their checksums.

  The message says what is wrong in one line; `detail` keeps the rest (tracebacks, what the
  libraries logged), for a file rather than the screen."""

  def __init__(self, message: str, detail: str = ""):
    super().__init__(message)
    self.detail = detail


class DataPreparationError(UserError, ValueError):
  """Data preparation cannot go on (bad arguments, too many bad records)."""


class BadDataError(UserError, ValueError):
  """More bad records in streamed shards than data.max_bad_fraction allows."""


class GenerationError(UserError, ValueError):
  """Bad generation input (missing or unreadable image, empty prompt, ...)."""


class EvaluationError(UserError, ValueError):
  """Evaluation cannot run with this data or config."""


class TrainingError(UserError, RuntimeError):
  """Training cannot continue (e.g. the loss diverged); the message says what was saved."""


class WorkdirError(UserError, OSError):
  """A workdir that cannot be created or written, or a disk too full for its checkpoints."""


class DistributedError(UserError, ValueError):
  """Bad multi-host flags, or jax.distributed could not start."""


class ImageError(UserError, ValueError):
  """An image file that is missing or cannot be decoded."""


def require(condition: bool, message: str) -> None:
  """ConfigError(message) unless `condition` (the config checks read as a list of rules)."""
  if not condition:
    raise ConfigError(message)


def exit_with(message: str) -> None:
  """The end of a command-line program on a user's mistake: one `error:` line, status 2."""
  import sys

  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def one_line(error: BaseException) -> str:
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
