"""The jitted train step gives the same numbers on one device and on a 2x2x2 mesh."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from m6_jax import config as config_lib
from m6_jax.parallel import partitioning
from m6_jax.train import setup as setup_lib

# Multi-device / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow


def run_steps(config, batches, devices, return_metrics=False):
  """Trains on `batches` with the train loop's own set-up (train/setup.py) on `devices`."""
  config_lib.validate(config, len(devices))
  setup = setup_lib.build(config, devices)
  state = setup.init_state(seed=0)
  losses = []
  with setup.mesh_context():
    for b in batches:
      state, metrics = setup.step(state, setup.put_batch(b))
      losses.append(float(metrics["loss"]))
  if return_metrics:  # the last step's
    return state, losses, jax.tree.map(np.asarray, jax.device_get(metrics))
  return state, losses


def _mesh(config, data, fsdp, tensor):
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  return config


def _one_layer(config):
  """One layer (per stack): the comparison holds at any depth; each layer adds compile time."""
  config.model.num_layers = 1
  return config


def _assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.parametrize("architecture", ["unified", "encoder_decoder"])
def test_2x2x2_mesh_matches_single_device(tiny_config, random_batch, architecture):
  # The unified model with the ResNet stem: the linear one (the default) runs on 2x2x2
  # meshes in the loop and checkpoint tests. The encoder-decoder with the linear stem (the
  # stems are shared; a cheaper compilation).
  _one_layer(tiny_config)
  tiny_config.model.image_stem = "resnet" if architecture == "unified" else "linear"
  tiny_config.model.architecture = architecture
  layer = "layer_0" if architecture == "unified" else "decoder_layer_0"
  # Near-zero gradient components (conv kernels, a few MLP kernel entries): see the note on
  # eps in the accumulation test below.
  tiny_config.train.eps = 1e-3
  batches = [random_batch(16, tiny_config, seed=s) for s in range(2)]
  single, single_losses = run_steps(_mesh(tiny_config, 1, 1, 1), batches, jax.devices()[:1])
  sharded, sharded_losses = run_steps(_mesh(tiny_config, 2, 2, 2), batches, jax.devices())
  np.testing.assert_allclose(sharded_losses, single_losses, atol=1e-5, rtol=0)
  assert single_losses[1] < single_losses[0]  # the first step really changed the params
  _assert_trees_close(sharded.params, single.params, atol=1e-5)
  # The parameters really are split over devices, not replicated (all but the small conv
  # stem, whose channel axes stay unsharded by the default rules).
  params = dict(sharded.params)
  params["image_embedding"] = {k: v for k, v in params["image_embedding"].items() if k != "stem"}
  split, total = partitioning.count_sharded_params(params)
  assert split == total, f"only {split} of {total} parameter arrays are sharded"
  kernel = sharded.params[layer]["mlp"]["wi"]["kernel"]
  assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (32, 64)  # (64/2, 128/2)
  mu = sharded.opt_state.inner_state[1][0].mu[layer]["mlp"]["wi"]["kernel"]
  assert mu.sharding.spec == PartitionSpec(
    "fsdp", "tensor"
  )  # optimizer state sharded like its param


def test_gradient_accumulation_matches_full_batch(tiny_config, random_batch):
  # Adam's first update is lr * g / (|g| + eps): for gradient components near zero, summing
  # micro-batches in another order flips their sign and moves the parameter by a whole lr.
  # A larger eps damps those components so the comparison tests the accumulated gradients.
  tiny_config.train.eps = 1e-3
  _one_layer(tiny_config)
  batches = [random_batch(16, tiny_config, seed=s) for s in range(2)]
  full, full_losses = run_steps(_mesh(tiny_config, 2, 1, 1), batches, jax.devices()[:2])
  tiny_config.train.grad_accum_steps = 4
  micro, micro_losses = run_steps(_mesh(tiny_config, 2, 1, 1), batches, jax.devices()[:2])
  np.testing.assert_allclose(micro_losses, full_losses, atol=1e-5, rtol=0)
  _assert_trees_close(micro.params, full.params, atol=1e-5)
