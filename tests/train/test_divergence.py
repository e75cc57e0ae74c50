"""Divergence and damage: a non-finite update is never applied, a divergence mid-run rolls
back to the newest good checkpoint and finishes, a damaged latest checkpoint falls back to
the one before it, and a workdir or config that cannot work is one error line."""

import glob
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from testing_utils import assert_every_step_once

from m6_jax.checkpoint import checkpoints
from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.errors import CheckpointError, DamagedCheckpoint, WorkdirError
from m6_jax.train import divergence, loop, preflight
from m6_jax.train import setup as setup_lib

BASE = ("--config=configs/base.py:runlocal", "--config.model.num_layers=1")


def test_monitor_flags_non_finite_streaks_and_spikes():
  m = divergence.Monitor(max_nan_steps=1, spike_factor=3.0, spike_window=4)
  assert m.observe(float("nan"), False) is None  # one non-finite step is tolerated
  assert "2 step(s) in a row" in m.observe(float("nan"), False)
  m.reset()
  for loss in (2.0, 1.0, 1.0, 1.0):  # the window fills; no spike check before that
    assert m.observe(loss, True) is None
  assert m.observe(2.9, True) is None  # under 3 x the median 1.0
  assert "loss spike: 3.5 > train.spike_factor=3" in m.observe(3.5, True)
  assert divergence.Monitor(0, 0.0, 2).observe(1e9, True) is None  # spike check off
  # Near zero, a tenfold rise that stays below spike_min_increase is noise, not a spike.
  tiny = divergence.Monitor(0, 10.0, 3, spike_min_increase=1.0)
  for loss in (0.001, 0.001, 0.001):
    assert tiny.observe(loss, True) is None
  assert tiny.observe(0.05, True) is None
  assert "spike_min_increase=1" in tiny.observe(2.0, True)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_non_finite_update_is_not_applied(tiny_config, random_batch):
  """An overflowing learning rate (beyond what validation allows) gives finite gradients but
  non-finite parameters: the step reports it and keeps the old state."""
  tiny_config.train.lr = 1e39  # inf in float32
  tiny_config.mesh.data = 1
  setup = setup_lib.build(tiny_config, jax.devices()[:1])
  state = setup.init_state(seed=0)
  before = jax.tree.map(np.asarray, state.params)
  with setup.mesh_context():
    new, metrics = setup.step(state, setup.put_batch(random_batch(16, tiny_config)))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert not bool(metrics["finite"])
  assert int(new.step) == 1
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(x, np.asarray(y))


def _all_finite(step_dir):
  """Every float array of a saved state is finite (read as saved, without a target)."""
  state = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
  return all(
    np.isfinite(np.asarray(x)).all()
    for x in jax.tree.leaves(state)
    if np.issubdtype(np.asarray(x).dtype, np.floating)
  )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided:UserWarning")
def test_a_forced_divergence_rolls_back_skips_batches_and_finishes(run_main, tmp_path):
  """Batch 10 of the data stream has NaN images (a corrupt batch). Step 11 diverges; the run
  rolls back to step 8 (confirmed good two steps after it was saved), skips batches 8-9,
  meets batch 10 again at step 9, rolls back again skipping 8-11, and finishes."""
  workdir = tmp_path / "run"
  proc = run_main(
    *BASE,
    f"--workdir={workdir}",
    "--config.train.steps=16",
    "--config.train.checkpoint_every=4",
    "--config.train.log_every=3",
    "--config.train.checkpoint_confirm_steps=2",
    "--config.train.rollback_skip_batches=2",
    "--config.train.debug_nonfinite_batches=10",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Diverged at step 11: non-finite" in proc.stderr
  assert "Rolled back to step 8 (rollback 1 of at most 3), skipped batches 8-9" in proc.stderr
  assert "Rolled back to step 8 (rollback 2 of at most 3), skipped batches 8-11" in proc.stderr
  assert "Finished at step 16" in proc.stderr
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  events = [r for r in records if r.get("event") == "rollback"]
  assert [(e["step"], e["diverged_at"], e["skipped_batches"]) for e in events] == [
    (8, 11, [8, 10]),
    (8, 9, [8, 12]),
  ]
  assert_every_step_once(records, 16)
  ckpts = checkpoints.Checkpoints(checkpoints.checkpoint_dir(str(workdir)), create=False)
  assert ckpts.steps() == [8, 12, 16] and ckpts.good_steps() == [8, 12]  # 4: rotated out
  assert all(_all_finite(os.path.join(ckpts.directory, str(s))) for s in ckpts.steps())


def _damage(step_dir, kind):
  largest = max(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)
  if kind == "truncated_file":
    with open(largest, "r+b") as f:
      f.truncate(os.path.getsize(largest) // 2)
  elif kind == "deleted_metadata":
    os.remove(f"{step_dir}/state/_METADATA")
  elif kind == "deleted_data_iterator":
    os.remove(f"{step_dir}/data/process_0-of-1.json")
  elif kind == "empty_step":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  elif kind == "flipped_byte":
    with open(largest, "r+b") as f:
      f.seek(os.path.getsize(largest) // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, run_main):
  trained = tmp_path / "trained"
  flags = (*BASE, "--config.train.steps=4", "--config.train.checkpoint_every=2")
  proc = run_main(*flags, f"--workdir={trained}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = ml_collections.ConfigDict(json.loads((trained / "config.json").read_text()))
  setup = setup_lib.build(config, jax.devices()[:1])
  tokenizer = tokenizer_lib.Tokenizer.from_file(str(trained / "tokenizer" / "spm.model"))
  for kind in ("truncated_file", "deleted_metadata", "deleted_data_iterator", "empty_step"):
    workdir = tmp_path / kind
    shutil.copytree(trained, workdir)
    _damage(str(workdir / "checkpoints" / "4"), kind)
    ckpts = checkpoints.Checkpoints(checkpoints.checkpoint_dir(str(workdir)), 3)
    data_iter = loop._data_iterator(config, tokenizer)
    state, step, _ = ckpts.restore_intact_train_state(setup.abstract_state(), data_iter)
    assert (step, int(state.step), data_iter.get_state()["next_index"]) == (2, 2, 2), kind
    assert ckpts.steps() == [2], kind
    assert os.listdir(workdir / "checkpoints.damaged") == ["4"], kind

  # Flipped bytes restore without an error; only the checksums show them. The whole path:
  # a rerun reports the damage in one line, resumes from step 2 and trains to the end.
  workdir = tmp_path / "flipped_byte"
  shutil.copytree(trained, workdir)
  _damage(str(workdir / "checkpoints" / "4"), "flipped_byte")
  proc = run_main(*flags, f"--workdir={workdir}", "--config.train.steps=5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  damaged = [l for l in proc.stderr.splitlines() if "Checkpoint damaged" in l]
  assert len(damaged) == 1 and "does not match its checksum" in damaged[0], proc.stderr
  assert "fall back to step 2" in damaged[0] and "Resumed from step 2" in proc.stderr
  assert "Finished at step 5" in proc.stderr

  # A config that does not fit the checkpoint: one line naming the parameter.
  proc = run_main(*flags, f"--workdir={trained}", "--config.model.d_model=32")
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
  assert "does not fit this config: parameter" in errors[0] and "(32,)" in errors[0]
  assert "Traceback" not in proc.stderr and "Resumed" not in proc.stderr


def test_a_checkpoint_of_the_old_optimizer_state_is_one_error_not_damage(tiny_config, tmp_path):
  """A train state saved before the learning-rate scale was injected into the optimizer
  state cannot be resumed: one CheckpointError saying how to go on (its parameters, through
  init_from), and the step is neither set aside as damaged nor silently replaced by a fresh
  start. Its parameters still load."""
  setup = setup_lib.build(tiny_config, jax.devices()[:1])
  state = setup.init_state(seed=0)
  old_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))  # no injection
  old = state.replace(opt_state=old_tx.init(state.params))
  workdir = tmp_path / "old"
  ckpts = checkpoints.Checkpoints(checkpoints.checkpoint_dir(str(workdir)), 3)
  ckpts.save(2, config=tiny_config, tokenizer=None, state=old)
  ckpts.wait()
  with pytest.raises(CheckpointError) as error:
    ckpts.restore_intact_train_state(setup.abstract_state(), None)
  assert not isinstance(error.value, DamagedCheckpoint)
  message = str(error.value)
  assert "(step 2) predates this version's optimizer state (it has no 'opt_state/" in message
  assert f"train in a new workdir with --config.init_from={workdir}" in message
  assert "\n" not in message
  assert ckpts.steps() == [2] and not os.path.exists(f"{ckpts.directory}.damaged")
  loaded = checkpoints.load_params(str(workdir), setup.abstract_state().params)
  np.testing.assert_array_equal(
    np.asarray(jax.tree.leaves(loaded.params)[0]), np.asarray(jax.tree.leaves(state.params)[0])
  )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["a_file", "under_a_file"])
def test_a_workdir_that_cannot_be_written_is_one_error_line(run_main, tmp_path, kind):
  (tmp_path / "file").write_text("not a directory")
  workdir = tmp_path / "file" if kind == "a_file" else tmp_path / "file" / "run"
  proc = run_main(*BASE, f"--workdir={workdir}")
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
  assert f"--workdir={workdir}" in errors[0]
  assert ("is a file" if kind == "a_file" else "cannot be written") in errors[0]
  assert "Traceback" not in proc.stderr


def test_a_disk_without_room_for_two_checkpoints_is_one_error(tiny_config, tmp_path):
  setup = setup_lib.build(tiny_config, jax.devices()[:1])
  size = preflight.state_bytes(setup.abstract_state())
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state().params))
  assert size >= 3 * 4 * params  # float32 parameters and Adam's two moments
  free = shutil.disk_usage(tmp_path).free
  preflight.check_disk_space(str(tmp_path), free // 2)
  with pytest.raises(WorkdirError, match="MiB free, but 2 checkpoints of this model need"):
    preflight.check_disk_space(str(tmp_path), free * 2)
