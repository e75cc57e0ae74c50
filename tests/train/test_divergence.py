"""Divergence and damage: a non-finite update is never applied, a divergence mid-run rolls
back to the newest good checkpoint and finishes, a damaged latest checkpoint falls back to
the one before it, and a workdir or config that cannot work is one error line."""

import gc
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from testing_utils import DAMAGE, assert_every_step_once, damage_step, warnings_and_noise

from m6_jax.checkpoint import checkpoints
from m6_jax.config import default_config
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


def _small_config(tokenizer_path, steps):
  """A model with many small arrays (a failed read leaves many reads in flight), a
  checkpoint every 2 steps, all kept."""
  c = default_config()
  c.model.vocab_size, c.model.d_model, c.model.num_layers = 512, 32, 4
  c.model.num_heads, c.model.head_dim, c.model.mlp_dim = 2, 16, 64
  c.data.tokenizer_path = tokenizer_path
  c.data.batch_size, c.data.num_train_examples = 8, 64
  c.data.src_len, c.data.tgt_len, c.data.image_size, c.model.patch_size = 12, 10, 32, 16
  c.train.steps, c.train.checkpoint_every, c.train.log_every = steps, 2, 1
  c.train.keep_checkpoints = 10
  return c


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided:UserWarning")
def test_a_forced_divergence_rolls_back_skips_batches_and_finishes(
  tokenizer_path, tmp_path, caplog
):
  """Batch 10 of the data stream has NaN images (a corrupt batch). Step 11 diverges; the run
  rolls back to step 8 (confirmed good two steps after it was saved), skips batches 8-9,
  meets batch 10 again at step 9, rolls back again skipping 8-11, and finishes. (The model of
  the damage tests below: their train step, compiled once.)"""
  workdir = tmp_path / "run"
  config = _small_config(tokenizer_path, 16)
  config.train.checkpoint_every, config.train.log_every = 4, 3
  config.train.keep_checkpoints = 3
  config.train.checkpoint_confirm_steps = 2
  config.train.rollback_skip_batches = 2
  config.train.debug_nonfinite_batches = "10"
  with caplog.at_level(logging.INFO):
    result = loop.train(config, str(workdir))
  assert result.final_step == 16
  assert "Diverged at step 11: non-finite" in caplog.text
  assert "Rolled back to step 8 (rollback 1 of at most 3), skipped batches 8-9" in caplog.text
  assert "Rolled back to step 8 (rollback 2 of at most 3), skipped batches 8-11" in caplog.text
  assert "Finished at step 16" in caplog.text
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_path):
  """A run of 8 steps, with checkpoints at steps 2, 4, 6 and 8."""
  path = tmp_path_factory.mktemp("trained") / "run"
  loop.train(_small_config(tokenizer_path, 8), str(path))
  return path


def _resume_damaged(trained, tokenizer_path, workdir, damage, caplog, capfd, steps=9):
  """Resumes a copy of `trained` whose steps have damage ({step: kind}) to step `steps`;
  returns the result, the warning lines and the library noise on the screen."""
  shutil.copytree(trained, workdir)
  for step, kind in damage.items():
    damage_step(str(workdir / "checkpoints" / str(step)), kind)
  capfd.readouterr()
  with caplog.at_level(logging.INFO):
    result = loop.train(_small_config(tokenizer_path, steps), str(workdir))
    gc.collect()  # a failed read's late errors surface when its futures are collected
  return (result, *warnings_and_noise(caplog.records, capfd.readouterr().err))


# Three kinds of damage per run, on steps 8, 6 and 4: each is met in turn by the fallback.
DAMAGE_RUNS = [
  ("truncated_file", "garbage_file", "flipped_index_byte"),  # reads that fail
  ("flipped_byte", "deleted_metadata", "deleted_meta_item"),
  ("deleted_data_iterator", "empty_step", "plain_file"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kinds", DAMAGE_RUNS, ids=lambda kinds: "+".join(kinds))
def test_each_damaged_step_is_one_warning_line_and_training_falls_back(
  trained, tokenizer_path, tmp_path, kinds, caplog, capfd
):
  """Each damaged step: one warning line naming the step and what is wrong, nothing of the
  failed read on the screen (the detail of a failed read is in checkpoints.damaged/N.log);
  the run moves the step to checkpoints.damaged/, resumes from the intact step 2 and
  finishes (at step 3: one step and one save past the fallback)."""
  workdir = tmp_path / "run"
  damage = dict(zip((8, 6, 4), kinds))
  args = (trained, tokenizer_path, workdir, damage, caplog, capfd)
  result, warnings, noise = _resume_damaged(*args, steps=3)
  assert noise == [], noise
  assert len(warnings) == 3, warnings
  by_step = {int(re.search(r"\(step (\d+)\)", line).group(1)): line for line in warnings}
  for step, kind in damage.items():
    line = by_step[step]
    assert line.startswith(f"Checkpoint damaged, {workdir}/checkpoints (step {step}): "), line
    assert DAMAGE[kind] in line, line
    if kind == "plain_file":  # set aside when the directory is opened, before any restore
      continue
    below = max(s for s in (2, 4, 6) if s < step and damage.get(s) != "plain_file")
    assert f"fall back to step {below}" in line, line
    if kind in DAMAGE_RUNS[0]:
      log = workdir / "checkpoints.damaged" / f"{step}.log"
      assert f"(details in {log})" in line and "Traceback" in log.read_text()
  assert (result.resumed_from, result.final_step) == (2, 3)
  assert {"4", "6", "8"} <= set(os.listdir(workdir / "checkpoints.damaged"))


@pytest.mark.slow
def test_a_step_without_checksums_is_named_and_resumed_from(
  trained, tokenizer_path, tmp_path, caplog, capfd
):
  """A flipped byte with the checksums deleted from the step's meta: it cannot be verified,
  which the first warning line says; training goes on from it (a step of a version before
  checksums has nothing better to fall back to: no older step has checksums either)."""
  workdir = tmp_path / "unverifiable"
  args = (trained, tokenizer_path, workdir, {8: "unverifiable_flip"}, caplog, capfd)
  result, warnings, noise = _resume_damaged(*args)
  assert noise == [], noise
  assert "(step 8) has no checksums, so it cannot be verified" in warnings[0], warnings
  assert not any("Checkpoint damaged" in line for line in warnings), warnings
  assert result.resumed_from == 8  # (its flipped byte then diverges: the rollback's warnings)


@pytest.mark.slow
def test_a_config_that_does_not_fit_the_checkpoint_names_the_parameter(trained, tokenizer_path):
  config = _small_config(tokenizer_path, 9)
  config.model.d_model = 64
  with pytest.raises(CheckpointError, match=r"does not fit this config: parameter .*\(64,\)"):
    loop.train(config, str(trained))
  assert not os.path.exists(f"{trained}/checkpoints.damaged")


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
