"""Learning-rate schedules and the weight-decay mask."""

import jax
import numpy as np
import pytest

from m6_jax.config import default_config
from m6_jax.model.m6 import M6, M6Config, dummy_batch
from m6_jax.train import optim


def _train(schedule, steps=100, warmup=10, lr=1.0, end=0.1):
  t = default_config().train
  t.schedule, t.steps, t.warmup_steps, t.lr, t.end_lr_fraction = schedule, steps, warmup, lr, end
  return t


@pytest.mark.parametrize("schedule", ["cosine", "linear", "rsqrt", "constant"])
def test_warmup_then_decay(schedule):
  fn = optim.learning_rate_schedule(_train(schedule))
  lrs = np.array([float(fn(s)) for s in range(101)])
  assert lrs[0] == 0.0
  np.testing.assert_allclose(lrs[5], 0.5, rtol=1e-6)  # linear warmup
  np.testing.assert_allclose(lrs[10], 1.0, rtol=1e-6)  # peak at the end of warmup
  assert (np.diff(lrs[:11]) > 0).all()
  if schedule == "constant":
    np.testing.assert_allclose(lrs[10:], 1.0)
  else:
    assert (np.diff(lrs[10:]) <= 1e-9).all() and lrs[100] < lrs[11]
  if schedule in ("cosine", "linear"):
    np.testing.assert_allclose(lrs[100], 0.1, rtol=1e-5)
  if schedule == "rsqrt":
    np.testing.assert_allclose(lrs[30], np.sqrt(10 / 30), rtol=1e-5)


def test_weight_decay_mask_skips_norms_biases_and_embeddings(tiny_config):
  cfg = M6Config.from_config(tiny_config)
  params = jax.eval_shape(M6(cfg).init, jax.random.PRNGKey(0), dummy_batch(cfg))["params"]
  mask = optim.weight_decay_mask(params, tiny_config.train)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = {k for k, v in flat.items() if v}
  assert "['layer_0']['mlp']['wi']['kernel'].value" in decayed
  assert "['layer_0']['attention']['query'].value" in decayed
  assert "['image_embedding']['stem']['projection']['kernel'].value" in decayed
  for k in flat:
    leaf = k.split("']")[-2].split("['")[-1]  # the parameter's own name
    if leaf in ("bias", "scale", "embedding") or leaf.endswith(("_bias", "_embedding")):
      assert k not in decayed, k
  tiny_config.train.decay_embeddings = True
  mask = optim.weight_decay_mask(params, tiny_config.train)
  assert mask["token_embedding"]["embedding"].value


def test_the_injected_lr_scale_scales_the_update():
  t = _train("cosine")
  tx = optim.make_optimizer(t)
  params = {"w": jax.numpy.ones((3, 4))}
  grads = {"w": jax.numpy.arange(12.0).reshape(3, 4) - 5.0}
  state = tx.init(params)
  assert float(optim.get_lr_scale(state)) == 1.0
  for _ in range(5):  # past step 0, whose learning rate is 0
    _, state = tx.update(grads, state, params)
  full, _ = tx.update(grads, state, params)
  halved_state = optim.set_lr_scale(state, 0.5)
  half, after = tx.update(grads, halved_state, params)
  assert float(np.abs(full["w"]).min()) > 0
  np.testing.assert_array_equal(np.asarray(half["w"]), np.asarray(full["w"]) * 0.5)
  assert float(optim.get_lr_scale(after)) == 0.5  # the update keeps the scale
  schedule = optim.learning_rate_schedule(t)
  assert float(optim.learning_rate(schedule, 5, halved_state)) == float(schedule(5)) * 0.5


def test_bfloat16_first_moment():
  """train.adam_mu_dtype=bfloat16 stores Adam's first moment in bfloat16 (half its memory),
  the second moment and the parameters' update stay float32, and the update is the float32
  one within bfloat16's rounding."""
  params = {"w": jax.numpy.ones((3, 4))}
  grads = {"w": (jax.numpy.arange(12.0).reshape(3, 4) - 5.0) / 7.0}
  updates = {}
  for dtype in ("float32", "bfloat16"):
    t = _train("constant")
    t.adam_mu_dtype = dtype
    tx = optim.make_optimizer(t)
    state = tx.init(params)
    for _ in range(12):
      update, state = tx.update(grads, state, params)
    adam = state.inner_state[1][0]  # chain(clip, adamw) -> adamw's scale_by_adam state
    assert adam.mu["w"].dtype == jax.numpy.dtype(dtype)
    assert adam.nu["w"].dtype == jax.numpy.float32 and update["w"].dtype == jax.numpy.float32
    updates[dtype] = np.asarray(update["w"])
  # bfloat16 keeps 8 bits of mantissa: about 0.4% per rounding, compounded over the steps.
  np.testing.assert_allclose(updates["bfloat16"], updates["float32"], rtol=3e-2, atol=1e-6)
  assert not np.array_equal(updates["bfloat16"], updates["float32"])
