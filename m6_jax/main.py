"""The command line: `python -m m6_jax.main --mode=<mode> ...`, also installed as `m6-jax`.

Each mode is one module of m6_jax/cli/ that owns its flags and a `run()`. This file finds
the mode on the command line, imports that module (defining its flags) and the task modules
a `--config.data.task_modules=...` argument names (their tasks then have the
`--config.data.task_weights.<task>` keys the flags may set), parses the flags,
starts the process (m6_jax/cli/bootstrap.py: logging, huge pages, platform,
jax.distributed) and runs the mode. `--mode=<mode> --helpshort` lists a mode's flags;
docs/cli.md lists them all. Every mistake a user can make ends in one `error: ...` line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import signal
import sys

from absl import app, flags

from m6_jax.cli import bootstrap, common
from m6_jax.data import task_modules
from m6_jax.errors import UserError, exit_with

# --mode -> its module under m6_jax/cli/
MODES = {
  "train": "train",
  "generate": "generate",
  "eval": "evaluate",
  "export": "export",
  "prepare_data": "prepare_data",
  "encode_images": "encode_images",
  "convert": "convert",
  "params": "params",
  "aot": "aot",
  "export_world": "export_world",
  "scene_judge": "scene_judge",
  "text_to_image_eval": "text_to_image_eval",
  "serve": "serve",
}
MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to run (one module of m6_jax/cli/).")

USAGE = f"""M6 in JAX/Flax: pretrain, fine-tune, evaluate and generate on one CPU or a TPU pod.

  python -m m6_jax.main --mode=<mode> [flags]      (installed: m6-jax --mode=<mode> [flags])

modes: {", ".join(MODES)} (default: train).
`--mode=<mode> --helpshort` lists a mode's flags; docs/cli.md describes every mode.
"""


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of flag `name` on the command line (the last one given), or None."""
  value = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _mode_named(argv: list[str]) -> str | None:
  """The --mode value on the command line, or None."""
  return _flag_value(argv, "mode")


def run(argv: list[str] | None = None) -> None:
  """The program: imports the mode's module (an unknown mode is left to the flag's error)."""
  argv = sys.argv if argv is None else argv
  try:  # before the flags are parsed: the config they load may name the modules' tasks
    task_modules.import_all(_flag_value(argv, "config.data.task_modules") or "")
  except UserError as e:
    exit_with(str(e))
  named = _mode_named(argv)
  module = MODES.get(named or MODE.default)
  mode = importlib.import_module(f"m6_jax.cli.{module}") if module else None
  # --helpshort lists the main module's key flags (absl: the module named by argv[0], this
  # file or the installed m6-jax script): --mode, --config, --workdir and the mode's flags.
  for module in (sys.modules[__name__], common, mode):
    for flag in flags.FLAGS.get_key_flags_for_module(module) if module else ():
      flags.FLAGS.register_key_flag_for_module(argv[0], flag)
  # absl's help prints the __main__ module's docstring: the mode's, or how to use the program.
  sys.modules["__main__"].__doc__ = mode.__doc__ if named and mode is not None else USAGE

  def main(rest: list[str]) -> None:
    if len(rest) > 1:
      exit_with(common.stray_arguments(rest[1:], MODES))
    try:
      bootstrap.start()
      mode.run()
    except (UserError, FileNotFoundError) as e:
      exit_with(str(e))
    except KeyboardInterrupt as e:  # training saves on the first Ctrl-C; this is the second
      print(f"interrupted: {e or 'Ctrl-C'}", file=sys.stderr)
      sys.exit(130)
    finally:
      # The mode's work is over and the process only exits: a Ctrl-C now would kill it by
      # signal (Python's shutdown puts SIGINT's default action back), not change the outcome.
      signal.signal(signal.SIGINT, signal.SIG_IGN)

  app.run(main, argv=argv, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
