"""Image positions reach the output in both architectures however large the patch features
grow: the patch projection's output outgrew the 2-D position embeddings in training until the
model could not tell one background patch from another (docs/positions.md);
model.patch_norm layer-normalises the patch features before the positions are added."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import init_model

from m6_jax import config as config_lib
from m6_jax.model.m6 import M6Config


def _config(tiny_config, architecture, patch_norm=True):
  tiny_config.model.architecture = architecture
  tiny_config.model.patch_norm = patch_norm
  return M6Config.from_config(tiny_config)


def _grown(params, factor):
  """`params` with the patch projection's output `factor` times larger (training's growth)."""
  params = jax.tree.map(lambda x: x, params)
  stem = dict(params["image_embedding"]["stem"])
  stem["projection"] = jax.tree.map(lambda x: x * factor, stem["projection"])
  params["image_embedding"] = {**params["image_embedding"], "stem": stem}
  return params


def _object_at(cfg, cell):
  """A light image with one dark square filling patch `cell`; the same text in every row."""
  grid = cfg.image_size // cfg.patch_size
  image = np.full((cfg.image_size, cfg.image_size, 3), 0.9, np.float32)
  row, col = divmod(cell, grid)
  p = cfg.patch_size
  image[row * p : (row + 1) * p, col * p : (col + 1) * p] = (0.8, 0.1, 0.1)
  return image


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, batch):
  return model.apply({"params": params}, batch)


def _output_change(model, params, cfg):
  """How far the logits move when the object moves from the first patch to the last."""
  n = cfg.num_patches
  batch = {
    "image": jnp.asarray(np.stack([_object_at(cfg, 0), _object_at(cfg, n - 1)])),
    "has_image": jnp.ones((2,), jnp.int32),
    "src_tokens": jnp.asarray(np.tile(np.arange(5, 5 + cfg.src_len), (2, 1)), jnp.int32),
    "tgt_input": jnp.asarray(np.tile(np.arange(2, 2 + cfg.tgt_len), (2, 1)), jnp.int32),
  }
  logits = _apply(model, params, batch)
  return float(jnp.abs(logits[0] - logits[1]).max())


@pytest.mark.parametrize("architecture", ["unified", "encoder_decoder"])
def test_moving_an_object_moves_the_output_however_large_the_patch_features_grow(
  tiny_config, architecture
):
  cfg = _config(tiny_config, architecture)
  model, params = init_model(cfg)
  at_init = _output_change(model, params, cfg)
  grown = _output_change(model, _grown(params, 100.0), cfg)
  assert at_init > 1e-3
  # The same patches in other places: only the positions tell the two images apart. Without
  # the norm the grown features leave them a hundredth of their share (measured: 0.01).
  assert grown > 0.9 * at_init, (at_init, grown)


def test_without_patch_norm_grown_features_drown_the_positions(tiny_config):
  """What the test above guards against: the model as it was (patch_norm off)."""
  cfg = _config(tiny_config, "unified", patch_norm=False)
  model, params = init_model(cfg)
  assert "patch_norm" not in params["image_embedding"]
  at_init = _output_change(model, params, cfg)
  assert _output_change(model, _grown(params, 100.0), cfg) < 0.1 * at_init


def test_a_config_saved_before_patch_norm_reads_it_off():
  saved = config_lib.default_config().to_dict()
  del saved["model"]["patch_norm"]
  assert config_lib.merged_with_defaults(saved).model.patch_norm is False
  assert config_lib.default_config().model.patch_norm is True
