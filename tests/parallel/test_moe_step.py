"""configs/moe_base.py: the MoE train step on a (data, expert) mesh matches one device."""

import os
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from test_sharded_step import _assert_trees_close, run_steps

from m6_jax.train import progress

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import moe_base  # noqa: E402


@pytest.fixture
def moe_config(tiny_config):
  c = moe_base.get_config()
  for group in ("data", "train"):
    for key, value in tiny_config[group].items():
      c[group][key] = value
  for key in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_dim"):
    c.model[key] = tiny_config.model[key]
  c.model.patch_size = tiny_config.model.patch_size
  # Adam's first update is lr * g / (|g| + eps): gradient components near zero (many in the
  # rarely-routed experts and the router) flip sign under a different summation order and
  # move by a whole lr; a larger eps makes the comparison test the gradients themselves.
  c.train.eps = 1e-3
  return c


@pytest.mark.slow
def test_moe_base_on_data_expert_mesh_matches_single_device(moe_config, random_batch):
  c = moe_config
  assert c.model.moe_num_experts == 8 and c.model.moe_every == 2 and c.model.num_layers == 2
  batches = [random_batch(16, c, seed=s) for s in range(2)]
  c.mesh.data = 1
  single, single_losses, single_metrics = run_steps(c, batches, jax.devices()[:1], True)
  c.mesh.data, c.mesh.expert = 2, 4
  sharded, sharded_losses, sharded_metrics = run_steps(c, batches, jax.devices(), True)

  np.testing.assert_allclose(sharded_losses, single_losses, atol=1e-5, rtol=0)
  assert single_losses[1] < single_losses[0]
  _assert_trees_close(sharded.params, single.params, atol=1e-5)
  for name in ("moe_load_balance_loss", "moe_router_z_loss", "moe_dropped_fraction"):
    assert np.isfinite(single_metrics[name]), name
    assert sharded_metrics[name] == pytest.approx(single_metrics[name], abs=1e-5), name
  assert single_metrics["moe_load_balance_loss"] >= 1.0 - 1e-5  # 1.0 when perfectly balanced

  # Layer 1 is MoE (moe_every=2), layer 0 dense; the experts are split over `expert`.
  assert "wi" in sharded.params["layer_0"]["mlp"]
  kernel = sharded.params["layer_1"]["mlp"]["experts"]["wi_kernel"]
  assert kernel.sharding.spec == PartitionSpec("expert", "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape[0] == 8 // 4


def test_loop_reports_moe_metrics():
  """The loop's interval summary averages the MoE metrics over steps (absent for dense)."""
  step = {
    "loss_sum": 4.0,
    "weight_sum": 2.0,
    "correct_sum": 1.0,
    "task_loss_sum": np.array([4.0, 0.0, 0.0, 0.0]),
    "task_weight_sum": np.array([2.0, 0.0, 0.0, 0.0]),
    "grad_norm": 1.0,
    "learning_rate": 0.1,
  }
  sums = None
  for drop in (0.1, 0.3):
    sums = progress.accumulate(sums, dict(step, moe_dropped_fraction=drop))
  summary = progress.summarize(sums)
  assert summary["moe_dropped_fraction"] == pytest.approx(0.2)
  assert summary["loss"] == pytest.approx(2.0)
  assert "moe_dropped_fraction" not in progress.summarize(progress.accumulate(None, step))
