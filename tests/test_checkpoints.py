"""One checkpoint module: what is saved on one mesh resumes training and serves inference on
another (8 devices -> 2x2x2 with tensor parallelism -> 1; inference on 4 and on 1); a read
that fails leaves nothing behind."""

import asyncio
import gc
import logging
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from m6_jax.checkpoint import checkpoints, integrity
from m6_jax.errors import DamagedCheckpoint
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


def _read_like_orbax(arrays: int, late: list[str]) -> None:
  """What Orbax does to read a step: concurrent reads, each completed by a library's I/O
  thread (as TensorStore's), on an event loop made for them and closed as soon as the first
  read fails (here every read fails, the first soonest). A completion that finds the loop
  closed is what TensorStore prints as a traceback: here it goes to `late`."""
  threads = []

  async def read(i):
    loop, done = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()
    error = ValueError(f'OUT_OF_RANGE: Error reading "params.w{i}/0": byte range invalid')

    def complete():
      time.sleep(0.05 * i)
      try:
        loop.call_soon_threadsafe(done.set_exception, error)
      except RuntimeError as e:
        late.append(str(e))

    threads.append(threading.Thread(target=complete))
    threads[-1].start()
    await done

  async def read_all():
    await asyncio.gather(*(read(i) for i in range(arrays)))

  loop = asyncio.new_event_loop()
  try:
    loop.run_until_complete(read_all())
  finally:
    loop.close()
    for thread in threads:
      thread.join()


def test_a_failed_read_leaves_nothing_behind(caplog):
  """The reads still in flight when the first one fails finish inside `reading()`, so no
  completion arrives on a closed event loop and no error is left unretrieved; the failure is
  one DamagedCheckpoint in words, its traceback in the detail. (Outside `reading()`, the
  reads cut short complete on the closed loop: 'Event loop is closed'.)"""
  late = []
  with caplog.at_level(logging.DEBUG):
    with pytest.raises(DamagedCheckpoint) as error:
      with integrity.reading("DIR (step 4)"):
        _read_like_orbax(4, late)
    gc.collect()
  assert str(error.value) == "DIR (step 4): an array file is truncated (reading 'params.w0' failed)"
  assert "Traceback" in error.value.detail and "OUT_OF_RANGE" in error.value.detail
  assert (
    late == [] and [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
  )

  with pytest.raises(ValueError):
    _read_like_orbax(4, late)
  assert late == ["Event loop is closed"] * 3
