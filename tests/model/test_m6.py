"""The prefix-LM mask, checked on the mask itself and on the model's outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6_jax.model.attention import prefix_lm_mask
from m6_jax.model.m6 import M6, M6Config, dummy_batch


def test_mask_prefix_never_sees_target_and_target_is_causal():
  prefix_valid = jnp.array([[1, 1, 1, 0, 1]], bool)  # one padded prefix position
  target_valid = jnp.array([[1, 1, 1, 0]], bool)  # one padded target position
  mask = np.asarray(prefix_lm_mask(prefix_valid, target_valid))[0]
  p, t = 5, 4
  # Prefix queries: every real prefix key, no target key.
  assert not mask[:p, p:].any()
  np.testing.assert_array_equal(mask[:p, :p], np.tile([1, 1, 1, 0, 1], (p, 1)).astype(bool))
  # Target queries: every real prefix key, and target keys at or before themselves.
  np.testing.assert_array_equal(mask[p:, :p], np.tile([1, 1, 1, 0, 1], (t, 1)).astype(bool))
  expected_causal = np.tril(np.ones((t, t), bool)) & np.array([1, 1, 1, 0], bool)[None]
  np.testing.assert_array_equal(mask[p:, p:], expected_causal)


def test_attention_pairs_are_the_blocks_the_mask_can_allow(tiny_config):
  """The model-FLOP counts' attention pairs (prefix x prefix + target x all) cover every
  pair the prefix-LM mask allows and leave out only the prefix-to-target block."""
  c = M6Config.from_config(tiny_config)
  p, t, length = c.seq_len - c.tgt_len, c.tgt_len, c.seq_len
  mask = np.asarray(prefix_lm_mask(jnp.ones((1, p), bool), jnp.ones((1, t), bool)))[0]
  assert not mask[:p, p:].any()
  assert c.attention_pairs == length * length - p * t == mask[:p, :p].size + mask[p:].size


def _model_and_params(tiny_config, stem="linear"):
  tiny_config.model.image_stem = stem
  cfg = M6Config.from_config(tiny_config)
  model = M6(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), dummy_batch(cfg))["params"])
  return model, params


def _logits(model, params, batch):
  return np.asarray(model.apply({"params": params}, jax.tree.map(jnp.asarray, batch)))


def test_future_target_token_does_not_change_earlier_logits(tiny_config, random_batch):
  model, params = _model_and_params(tiny_config)
  batch = random_batch(4, tiny_config)
  batch["tgt_input"][:, :] = np.random.default_rng(1).integers(4, 500, batch["tgt_input"].shape)
  before = _logits(model, params, batch)
  j = 6
  changed = dict(batch, tgt_input=batch["tgt_input"].copy())
  changed["tgt_input"][:, j] = (changed["tgt_input"][:, j] + 17) % 500 + 4
  after = _logits(model, params, changed)
  np.testing.assert_array_equal(before[:, :j], after[:, :j])
  assert np.abs(before[:, j:] - after[:, j:]).max() > 1e-4  # later positions do see it


def test_prefix_is_seen_by_every_target_position(tiny_config, random_batch):
  model, params = _model_and_params(tiny_config)
  batch = random_batch(2, tiny_config)
  batch["src_tokens"][:, :] = 5
  before = _logits(model, params, batch)
  batch["src_tokens"][:, -1] = 9  # the last prefix token
  after = _logits(model, params, batch)
  assert (np.abs(before - after).max(axis=-1) > 1e-5).all()  # every target position moved


@pytest.mark.parametrize("stem", ["linear", "resnet"])
def test_masked_image_and_padding_are_ignored(tiny_config, random_batch, stem):
  model, params = _model_and_params(tiny_config, stem)
  batch = random_batch(4, tiny_config)
  batch["has_image"][:] = 0
  batch["src_tokens"][:, -3:] = 0  # padding at the end of the source
  before = _logits(model, params, batch)
  noisy = dict(batch, image=np.random.default_rng(3).random(batch["image"].shape, np.float32))
  np.testing.assert_allclose(_logits(model, params, noisy), before, atol=1e-6)
  # With the image switched on, the same pixels do matter.
  noisy["has_image"] = np.ones_like(batch["has_image"])
  assert np.abs(_logits(model, params, noisy) - before).max() > 1e-4


def test_every_parameter_has_logical_axis_names(tiny_config):
  for stem in ("linear", "resnet"):
    tiny_config.model.image_stem = stem
    cfg = M6Config.from_config(tiny_config)
    boxed = jax.eval_shape(M6(cfg).init, jax.random.PRNGKey(0), dummy_batch(cfg))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [x for x in leaves if not isinstance(x, nn.Partitioned)]
    assert not unnamed
    for x in leaves:
      assert len(x.names) == len(x.value.shape), x
