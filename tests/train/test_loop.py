"""The train loop end to end on the synthetic data: resume, outputs, divergence."""

import json
import os

import jax
import numpy as np
import pytest

from m6_jax.train import loop


@pytest.fixture
def loop_config(tiny_config, tokenizer_path):
  c = tiny_config
  c.data.tokenizer_path = tokenizer_path
  c.data.image_size = 48
  c.data.src_len = 24
  c.data.tgt_len = 24
  c.data.batch_size = 8
  c.data.num_train_examples = 64
  c.model.dropout_rate = 0.1  # so resuming must also reproduce the dropout masks
  c.train.steps = 6
  c.train.log_every = 2
  c.train.checkpoint_every = 100
  c.train.schedule = "cosine"
  c.train.warmup_steps = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


def test_resumed_run_is_bit_exact(loop_config, tmp_path):
  straight = loop.train(loop_config, str(tmp_path / "straight"))
  first = loop.train(loop_config, str(tmp_path / "resumed"), should_stop=lambda step: step >= 3)
  assert first.final_step == 3
  second = loop.train(loop_config, str(tmp_path / "resumed"))
  assert second.final_step == 6
  assert straight.losses == first.losses + second.losses
  for x, y in zip(jax.tree.leaves(straight.state), jax.tree.leaves(second.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert straight.losses[-1] != straight.losses[0]  # it trained at all


def test_outputs_in_workdir(loop_config, tmp_path):
  workdir = tmp_path / "run"
  loop_config.train.peak_flops = 1e11  # per device: the MFU is logged against it
  result = loop.train(loop_config, str(workdir))
  assert result.final_step == 6
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 4, 6]
  assert [l["steps_averaged"] for l in lines] == [1, 1, 2, 2]
  for key in ("loss", "accuracy", "grad_norm", "learning_rate", "steps_per_sec", "tokens_per_sec"):
    assert all(np.isfinite(l[key]) for l in lines), key
  # Model FLOPs / time / (8 devices x peak): positive, and below 1 on this CPU.
  assert all(0 < l["mfu"] < 1 for l in lines), [l["mfu"] for l in lines]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["train"]["steps"] == 6 and saved["mesh"]["tensor"] == 2
  assert sorted(os.listdir(workdir / "checkpoints")) == ["6"]
  # Running again in a finished workdir resumes at the end and does no more steps.
  again = loop.train(loop_config, str(workdir))
  assert again.final_step == 6 and again.losses == []


def test_divergence_stops_with_clear_error_and_keeps_a_finite_state(loop_config, tmp_path):
  loop_config.train.lr = 1e30
  loop_config.train.grad_clip_norm = 1e30
  loop_config.train.schedule = "constant"
  loop_config.train.warmup_steps = 0
  workdir = tmp_path / "nan"
  with pytest.raises(loop.TrainingError, match="Non-finite loss at step"):
    loop.train(loop_config, str(workdir))
  steps = [int(s) for s in os.listdir(workdir / "checkpoints")]
  assert len(steps) == 1
  # The saved state is the one before the non-finite step: every parameter finite.
  from m6_jax import checkpoints

  ckpts = checkpoints.Checkpoints(checkpoints.checkpoint_dir(str(workdir)), create=False)
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), ckpts.saved_param_shapes(steps[0])
  )
  for leaf in jax.tree.leaves(ckpts.restore_params(steps[0], target)):
    assert np.isfinite(np.asarray(leaf)).all()
