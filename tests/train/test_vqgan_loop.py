"""The VQGAN family through the one train loop: sharded over 8 devices, it learns, logs its
metrics, needs no tokenizer, its patch-GAN joins at disc_start, and a stopped run resumes
bit-exactly."""

import json

import jax
import numpy as np
import pytest

from m6_jax.train import loop

# Multi-process / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow


@pytest.fixture
def vqgan_config(tiny_config):
  c = tiny_config
  c.model.family = "vqgan"
  c.data.image_size = 16
  c.data.batch_size = 16
  c.data.num_train_examples = 64
  c.data.num_eval_examples = 16
  v = c.vqgan
  v.channels, v.channel_multipliers, v.downsample_factor = 8, (1, 1), 2
  v.codebook_size, v.code_dim = 16, 4
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 6, 1, 100
  c.train.lr = 3e-3
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1
  return c


def test_vqgan_with_its_gan_trains_sharded_and_resumes_bit_exactly(vqgan_config, tmp_path):
  # The patch-GAN joins at logged step 4 (disc_start 3: the train step counts from 0): the
  # stopped run below ends without it and the resumed run starts with it.
  v = vqgan_config.vqgan
  v.disc_weight, v.disc_start, v.disc_channels, v.disc_layers = 0.5, 3, 8, 1
  straight = loop.train(vqgan_config, str(tmp_path / "straight"))
  assert straight.final_step == 6
  assert straight.losses[-1] < 0.8 * straight.losses[0], straight.losses
  kernel = straight.state.params["generator"]["encoder"]["conv_in"]["kernel"]
  assert len(kernel.sharding.mesh.devices.flat) == 8  # the state lives on the 8-device mesh
  records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").open()]
  assert {"rec_loss", "commit_loss", "batch_usage", "codes_restarted"} <= set(records[0])
  # Counts start at 0: the first step restarts every code fewer than 25 vectors chose
  # (0.01 x count < dead_code_threshold 0.25).
  assert records[0]["codes_restarted"] > 0
  assert not (tmp_path / "straight" / "tokenizer").exists()
  assert set(straight.state.params) == {"generator", "discriminator"}
  gan = {r["step"]: r for r in records if "disc_factor" in r}
  assert [gan[s]["disc_factor"] for s in range(1, 7)] == [0.0] * 3 + [1.0] * 3
  assert all(np.isfinite(gan[s]["disc_loss"]) and gan[s]["adaptive_weight"] > 0 for s in (4, 5, 6))

  workdir = str(tmp_path / "stopped")
  first = loop.train(vqgan_config, workdir, should_stop=lambda step: step >= 3)
  assert first.final_step == 3
  second = loop.train(vqgan_config, workdir)
  assert second.resumed_from == 3 and second.final_step == 6
  assert first.losses + second.losses == straight.losses
  for a, b in zip(jax.tree.leaves(second.state), jax.tree.leaves(straight.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
