"""The paper-scale configs: valid on their TPU topology, sizes within 5% of the papers'."""

import importlib
import math
import os
import sys

import pytest

from m6_jax.config import validate
from m6_jax.model import param_count

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAPER_CONFIGS = ("m6_base", "m6_large", "m6_10b", "m6_100b", "m6_t_1t", "m6_10t")


def topology_chips(topology: str) -> int:
  return math.prod(int(n) for n in topology.split(":")[1].split("x"))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_size_and_validity(name):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config()
  validate(config, num_devices=topology_chips(module.TOPOLOGY))
  counts = param_count.count_params(config)  # jax.eval_shape only: nothing is allocated
  assert counts["total"] == sum(counts[c] for c in param_count.COMPONENTS)
  if module.PUBLISHED_PARAMS:
    diff = abs(counts["total"] - module.PUBLISHED_PARAMS) / module.PUBLISHED_PARAMS
    assert diff < 0.05, f"{name}: {counts['total']:,} vs published {module.PUBLISHED_PARAMS:,}"
  if config.model.moe_num_experts:
    assert counts["experts"] > 0.95 * counts["total"] and counts["router"] > 0
  else:
    assert counts["experts"] == counts["router"] == 0


def test_params_report_prints_difference():
  module = importlib.import_module("configs.m6_10b")
  text, out = param_count.report(module.get_config(), module.PUBLISHED_PARAMS)
  assert "published total: 10.000B; ours 9.757B (-2.43%)" in text
  assert out["difference_percent"] == pytest.approx(-2.43, abs=0.01)


@pytest.mark.slow
def test_params_mode_cli(run_main):
  out = run_main("--mode=params", "--config=configs/m6_10t.py", timeout=120)
  assert out.returncode == 0, out.stderr
  assert "published total: 10.000T; ours 10.056T (+0.56%)" in out.stdout
  assert "experts" in out.stdout and "router" in out.stdout


def test_params_mode_checks_the_config_without_devices():
  """--mode=params counts without devices, but a config that could not run is still an error."""
  from m6_jax.config import validate_for_counting
  from m6_jax.errors import ConfigError

  for name in PAPER_CONFIGS:  # meshes of up to thousands of chips pass on this machine
    validate_for_counting(importlib.import_module(f"configs.{name}").get_config())
  config = importlib.import_module("configs.base").get_config()
  config.model.num_heads, config.mesh.tensor = 6, 4
  with pytest.raises(ConfigError, match="num_heads=6 is not divisible by mesh.tensor=4"):
    validate_for_counting(config)
