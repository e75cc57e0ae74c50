"""Task modules: importable modules whose ``register(...)`` calls add tasks, record fields
and eval kinds, named in the config key ``data.task_modules`` (comma-separated), as t5x /
seqio do with MIXTURE_OR_TASK_MODULE.

They are imported before a config is built or checked, so that the tasks they register have
their ``data.task_weights`` keys: ``m6_jax/main.py`` imports those named by a
``--config.data.task_modules=...`` argument before the flags are parsed, reading a saved
config (``config.merged_with_defaults``: generate, eval, export, init_from) imports those it
names first, and validation imports them again (one ``ConfigError`` line when one cannot be
imported). A config file may also simply import its module itself. Importing a module twice
runs it once (Python keeps it in ``sys.modules``).
"""

from __future__ import annotations

import importlib

from m6_jax.errors import ConfigError, one_line


def module_names(spec: str) -> tuple[str, ...]:
  """The module names of a ``data.task_modules`` value ("a.b, c" -> ("a.b", "c"))."""
  return tuple(name.strip() for name in str(spec or "").split(",") if name.strip())


def import_all(spec: str, what: str = "data.task_modules") -> tuple[str, ...]:
  """Imports every module ``spec`` names; ConfigError naming the first that cannot be (and
  ``what`` named it: the config key, or ``--mode=prepare_data``'s ``--task_modules``)."""
  names = module_names(spec)
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ConfigError(
        f"{what} names {name!r}, which cannot be imported ({one_line(e)}); fix the "
        "name or put the module's folder on PYTHONPATH."
      ) from None
  return names
