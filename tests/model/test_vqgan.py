"""The VQGAN: quantizer, straight-through gradient, shapes, EMA codebook with dead-code
restarts, the GAN terms and their adaptive weight, and the config checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6_jax import config as config_lib
from m6_jax.model import vqgan as vqgan_lib
from m6_jax.model import vqgan_loss

TINY = vqgan_lib.VQGANConfig(
  image_size=16, channels=8, channel_multipliers=(1, 1), downsample_factor=2, codebook_size=16,
  code_dim=4,
)  # fmt: skip


def _params(config, seed=0):
  return nn.unbox(vqgan_lib.init_params(config, jax.random.PRNGKey(seed)))


def _images(n, size, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((n, size, size, 3), np.float32))


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_the_quantizer_outputs_the_nearest_codebook_entry_exactly(l2_normalize):
  config = vqgan_lib.VQGANConfig(**{**TINY.__dict__, "l2_normalize": l2_normalize})
  params = _params(config)
  out = jax.jit(vqgan_lib.VQGAN(config).apply)({"params": params["generator"]}, _images(3, 16))
  codebook = np.asarray(params["generator"]["quantizer"]["codebook"])
  z = np.asarray(out["z"]).reshape(-1, config.code_dim)
  codes = np.asarray(out["codes"]).reshape(-1)
  np.testing.assert_array_equal(np.asarray(out["quantized"]).reshape(z.shape), codebook[codes])
  distances = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(codes, distances.argmin(axis=1))
  assert len(set(codes.tolist())) > 1  # a real choice was made


def test_the_straight_through_gradient_reaches_the_encoder_and_not_the_codebook():
  params = _params(TINY)
  model, weights = vqgan_lib.VQGAN(TINY), vqgan_loss.LossWeights()

  def loss(p):
    return vqgan_loss.loss_and_metrics(p, _images(4, 16), jnp.int32(0), model, weights)[0]

  grads = jax.jit(jax.grad(loss))(params)["generator"]
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["encoder"]))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["decoder"]))
  # The codebook is the EMA's alone (m6_jax/model/vqgan.py).
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["quantizer"]))


@pytest.mark.parametrize("factor, grid", [(4, 12), (8, 6)])
def test_encoder_codes_decoder_shapes(factor, grid):
  levels = vqgan_lib.levels_for_factor(factor)
  config = vqgan_lib.VQGANConfig(
    image_size=48, channels=8, channel_multipliers=(1,) * levels, downsample_factor=factor
  )
  assert config.grid == (grid, grid)
  model = vqgan_lib.VQGAN(config)
  variables = {"params": _params(config)["generator"]}
  apply = jax.jit(model.apply, static_argnames="method")
  codes = apply(variables, _images(2, 48), method="tokenize")
  assert codes.shape == (2, grid, grid) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < config.codebook_size
  images = apply(variables, codes, method="decode_codes")
  assert images.shape == (2, 48, 48, 3)
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def _quantizer(count, codebook):
  return {
    "codebook": jnp.asarray(codebook),
    "ema_count": jnp.asarray(count, jnp.float32),
    "ema_sum": jnp.asarray(codebook) * jnp.asarray(count, jnp.float32)[:, None],
  }


def test_ema_moves_used_codes_to_the_mean_of_their_vectors_and_keeps_unused_live_ones():
  codebook = np.eye(3, dtype=np.float32)
  quantizer = _quantizer([1.0, 1.0, 1.0], codebook)
  z = jnp.asarray([[0.0, 2.0, 0.0], [0.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
  codes = jnp.asarray([1, 1, 0])
  new, restarted = vqgan_lib.ema_update(quantizer, z, codes, jax.random.PRNGKey(0), 0.9, 0.5, False)
  assert int(restarted) == 0
  np.testing.assert_allclose(new["ema_count"], [0.9 + 0.1, 0.9 + 0.2, 0.9], rtol=1e-6)
  # code 1: (0.9 * e1 + 0.1 * (2 + 4) e1) / 1.1
  np.testing.assert_allclose(new["codebook"][1], [0.0, (0.9 + 0.6) / 1.1, 0.0], rtol=1e-6)
  np.testing.assert_allclose(new["codebook"][0], codebook[0], rtol=1e-6)
  np.testing.assert_allclose(new["codebook"][2], codebook[2], rtol=1e-6)  # unused, alive


def test_dead_codes_restart_on_encoder_outputs_and_a_fresh_codebook_restarts_whole():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(20, 4)).astype(np.float32))
  z = vqgan_lib.normalize(z)
  codebook = np.asarray(vqgan_lib.normalize(jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)))
  # Codes 0-2 are alive and chosen; 3-5 have counts below the threshold 0.5.
  quantizer = _quantizer([2.0, 2.0, 2.0, 0.4, 0.1, 0.0], codebook)
  codes = jnp.asarray([0, 1, 2] * 6 + [0, 1])
  new, restarted = vqgan_lib.ema_update(quantizer, z, codes, jax.random.PRNGKey(1), 0.99, 0.5, True)
  assert int(restarted) == 3
  rows = np.asarray(z)
  for k in (3, 4, 5):  # each restarted code is one of the batch's vectors, count = threshold
    assert np.abs(rows - np.asarray(new["codebook"][k])).max(axis=1).min() < 1e-6
    assert float(new["ema_count"][k]) == pytest.approx(0.5)
  for k in (0, 1, 2):
    assert np.abs(rows - np.asarray(new["codebook"][k])).max(axis=1).min() > 1e-3
  # A new model's counts are 0: its first step puts every code on an encoder output.
  fresh = nn.unbox(vqgan_lib.init_params(TINY, jax.random.PRNGKey(0)))["generator"]["quantizer"]
  z = vqgan_lib.normalize(jnp.asarray(rng.normal(size=(40, TINY.code_dim)), jnp.float32))
  new, restarted = vqgan_lib.ema_update(
    fresh, z, jnp.zeros(40, jnp.int32), jax.random.PRNGKey(2), 0.99, 0.25, True
  )
  assert int(restarted) == TINY.codebook_size - 1  # code 0 got all 40 vectors this step
  restarted_rows = np.asarray(new["codebook"][1:])
  assert (np.abs(np.asarray(z)[None] - restarted_rows[:, None]).max(-1).min(-1) < 1e-6).all()


def test_the_gan_counts_from_disc_start_with_a_finite_adaptive_weight():
  config = vqgan_lib.VQGANConfig(**{**TINY.__dict__, "use_discriminator": True})
  params = _params(config)
  assert set(params) == {"generator", "discriminator"}
  model = vqgan_lib.VQGAN(config)
  weights = vqgan_loss.LossWeights(disc_weight=0.8, disc_start=5)
  images = _images(4, 16)

  # Jitted, as the train step runs it (op by op it took seconds): the step is traced, so
  # steps 4 and 5 are one compilation.
  fn = jax.jit(jax.value_and_grad(vqgan_loss.loss_and_metrics, has_aux=True), static_argnums=(3, 4))

  def run(step):
    (objective, (metrics, _)), grads = fn(params, images, jnp.int32(step), model, weights)
    return float(objective), metrics, grads

  before, metrics, grads = run(4)
  assert before == pytest.approx(float(metrics["loss"]))  # reconstruction + commitment only
  assert float(metrics["disc_factor"]) == 0.0
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["discriminator"]))
  without_gan = jax.jit(
    jax.grad(
      lambda p: vqgan_loss.loss_and_metrics(
        p, images, jnp.int32(4), vqgan_lib.VQGAN(TINY), vqgan_loss.LossWeights()
      )[0]
    )
  )({"generator": params["generator"]})
  # Two programs of the same sum: equal up to float32 rounding (the GAN term, were it
  # counted, would move them by far more).
  for a, b in zip(jax.tree.leaves(grads["generator"]), jax.tree.leaves(without_gan)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  after, metrics, grads = run(5)
  weight = float(metrics["adaptive_weight"])
  assert np.isfinite(weight) and 0 < weight <= vqgan_loss.MAX_ADAPTIVE_WEIGHT
  expected = float(metrics["loss"]) + 0.8 * weight * float(metrics["gan_loss"])
  assert after == pytest.approx(expected + float(metrics["disc_loss"]), rel=1e-5)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["discriminator"]))


@pytest.mark.parametrize(
  "changes, pattern",
  [
    ({"downsample_factor": 5}, "power of two"),
    ({"downsample_factor": 32, "channel_multipliers": (1,) * 6}, "not divisible by"),
    ({"codebook_size": 1}, r"codebook_size=1 must be in \[2, 65536\]"),
    ({"channel_multipliers": (1, 2)}, "needs 4 entries"),
    ({"channels": 12}, "multiples of 8"),
    ({"l1_weight": 0.0, "l2_weight": 0.0}, "positive l1_weight or l2_weight"),
  ],
)
def test_bad_vqgan_configs_are_one_clear_error(changes, pattern):
  c = config_lib.default_config()
  c.model.family = "vqgan"
  for key, value in changes.items():
    c.vqgan[key] = value
  with pytest.raises(config_lib.ConfigError, match=pattern) as error:
    config_lib.validate(c, 8)
  assert "\n" not in str(error.value)


def test_a_vqgan_needs_a_vqgan_eval_metric(tmp_path):
  """The family's evaluator checks train.eval_metric when it is built, before training."""
  from m6_jax.train import families

  c = config_lib.default_config()
  c.model.family = "vqgan"
  c.train.eval_every = 10
  with pytest.raises(config_lib.ConfigError, match="eval_metric=psnr"):
    families.get(c).evaluator(str(tmp_path))
  c.train.eval_metric = "psnr"
  assert families.get(c).evaluator(str(tmp_path)) is not None
