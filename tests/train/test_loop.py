"""The train loop end to end on the synthetic data: outputs, divergence. (Resuming: the
subprocess tests in test_preemption.py.)"""

import json
import os

import numpy as np
import pytest

from m6_jax.train import loop, optim
from m6_jax.train import step as step_lib


@pytest.fixture
def loop_config(tiny_config, tokenizer_path):
  c = tiny_config
  c.data.tokenizer_path = tokenizer_path
  c.data.image_size = 48
  c.data.src_len = 24
  c.data.tgt_len = 24
  c.data.batch_size = 8
  c.data.num_train_examples = 64
  c.train.steps = 6
  c.train.log_every = 2
  c.train.checkpoint_every = 100
  c.train.schedule = "cosine"
  c.train.warmup_steps = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


@pytest.mark.slow
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


@pytest.mark.slow
def test_an_lr_spike_rolls_back_then_stops_with_one_message_and_no_bad_checkpoint(
  loop_config, tmp_path
):
  """lr=1e30: step 1's update is finite but huge (saved: checkpoint_every=1), step 2 is not
  finite. No checkpoint was confirmed good, so each rollback restarts from the initial state
  and deletes the unconfirmed checkpoints; after train.max_rollbacks the run stops."""
  loop_config.train.lr = 1e30
  loop_config.train.grad_clip_norm = 1e30
  loop_config.train.schedule = "constant"
  loop_config.train.warmup_steps = 0
  loop_config.train.checkpoint_every = 1
  loop_config.train.max_rollbacks = 1
  workdir = tmp_path / "nan"
  with pytest.raises(loop.TrainingError, match="diverged at step 2: non-finite") as error:
    loop.train(loop_config, str(workdir))
  assert "rolled back 1 time(s)" in str(error.value)
  assert "no checkpoint was confirmed good" in str(error.value)
  assert not [s for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  events = [r for r in records if r.get("event") == "rollback"]
  assert [e["diverged_at"] for e in events] == [2]
  assert [e["skipped_batches"] for e in events] == [[0, 20]]


@pytest.mark.slow
def test_a_rollback_lowers_the_learning_rate_without_compiling_the_step_again(
  loop_config, tmp_path, monkeypatch
):
  """Batch 10 is corrupt: step 11 diverges, the run rolls back to step 8 (skipping batches
  8-10) with rollback_lr_factor=0.5. The scale is a value in the optimizer state: the step is
  traced once in the whole run, and the learning rate after the rollback is half the
  schedule's (before it, the schedule's)."""
  traces = []
  make_train_step = step_lib.make_train_step

  def counting_make_train_step(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def traced(state, batch):
      traces.append(1)  # runs only while jax traces the step
      return train_step(state, batch)

    return traced

  monkeypatch.setattr(step_lib, "make_train_step", counting_make_train_step)
  t = loop_config.train
  t.steps, t.log_every, t.checkpoint_every, t.checkpoint_confirm_steps = 12, 1, 4, 2
  t.schedule, t.warmup_steps = "cosine", 4  # a learning rate that differs at every step
  t.rollback_skip_batches, t.rollback_lr_factor = 3, 0.5
  t.debug_nonfinite_batches = "10"
  workdir = tmp_path / "run"
  result = loop.train(loop_config, str(workdir))
  assert result.final_step == 12
  assert len(traces) == 1  # one shape, one compilation: the rollback compiled nothing
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  events = [r for r in records if r.get("event") == "rollback"]
  assert [(e["step"], e["diverged_at"], e["lr_scale"]) for e in events] == [(8, 11, 0.5)]
  schedule = optim.learning_rate_schedule(t)
  lrs = {r["step"]: r["learning_rate"] for r in records if "event" not in r}
  assert sorted(lrs) == list(range(1, 13))
  for step, lr in lrs.items():  # a record's rate is its last step's: schedule(step - 1)
    scale = 0.5 if step > 8 else 1.0
    assert lr == float(np.float32(schedule(step - 1)) * np.float32(scale)), step
  assert float(optim.get_lr_scale(result.state.opt_state)) == 0.5  # saved with the state
