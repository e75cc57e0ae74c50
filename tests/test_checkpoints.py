"""One checkpoint module: what is saved on one mesh resumes training and serves inference on
another (8 devices -> 2x2x2 with tensor parallelism -> 1; inference on 4 and on 1)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from m6_jax.checkpoint import checkpoints
from m6_jax.infer import generate
from m6_jax.train import loop

STEPS = 8
# (data, fsdp, tensor) and the step each run stops at; the last run has one device.
MESHES = [((8, 1, 1), 3), ((2, 2, 2), 6), ((1, 1, 1), STEPS)]


@pytest.fixture
def config(tiny_config, tokenizer_path):
  c = tiny_config
  c.model.d_model, c.model.num_layers, c.model.mlp_dim = 32, 1, 64
  c.model.num_heads, c.model.head_dim = 2, 16
  c.data.tokenizer_path = tokenizer_path
  c.data.batch_size, c.data.num_train_examples = 8, 64
  c.train.steps, c.train.log_every, c.train.checkpoint_every = STEPS, 1, 100
  # Adam's first updates divide by |g| + eps: a larger eps keeps rounding differences of
  # the reductions on another mesh from being amplified (see test_sharded_step.py).
  c.train.eps = 1e-3
  return c


def _on(config, data, fsdp, tensor):
  c = config.copy_and_resolve_references()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


@pytest.mark.slow
def test_a_checkpoint_moves_between_meshes_for_training_and_inference(config, tmp_path):
  straight = loop.train(_on(config, 8, 1, 1), str(tmp_path / "straight"))
  workdir = str(tmp_path / "moved")
  losses = []
  for (data, fsdp, tensor), stop in MESHES:
    result = loop.train(_on(config, data, fsdp, tensor), workdir, should_stop=lambda s: s >= stop)
    assert result.final_step == stop
    kernel = result.state.params["layer_0"]["mlp"]["wi"]["kernel"]
    assert len(kernel.sharding.mesh.devices.flat) == data * fsdp * tensor
    if tensor > 1:
      assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    losses += result.losses
  assert len(losses) == STEPS
  # The first run is on the uninterrupted run's mesh: bit-exact; the others within rounding.
  assert losses[:3] == straight.losses[:3]
  np.testing.assert_allclose(losses, straight.losses, rtol=1e-4)
  assert losses[-1] < losses[0]

  # Inference: the final checkpoint (written on one device) onto 4 devices and onto 1.
  saved = checkpoints.open_steps(workdir)
  shapes = saved.saved_param_shapes(STEPS)
  host = saved.restore_params(
    STEPS, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), shapes)
  )
  for devices in (jax.devices()[:4], jax.devices()[:1]):
    data = len(devices)
    model = generate.load_model(workdir, config=_on(config, data, 1, 1), devices=devices)
    assert model.step == STEPS and model.mesh.devices.size == data
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(host)):
      np.testing.assert_array_equal(np.asarray(a), b)
