"""`--mode=params`: the parameters of --config counted with jax.eval_shape (nothing
allocated), by component, against the config file's PUBLISHED_PARAMS.

    python -m m6_jax.main --mode=params --config=configs/m6_10t.py
"""

from __future__ import annotations

from m6_jax.cli import common


def run() -> None:
  from m6_jax import config as config_lib
  from m6_jax.model import param_count

  config = common.load_config("params")
  config_lib.validate_for_counting(config)
  text, _ = param_count.report(config, common.config_file_constant("PUBLISHED_PARAMS"))
  print(text)
