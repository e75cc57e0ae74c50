"""Image positions reach the output in both architectures however large the patch features
grow: the patch projection's output outgrew the 2-D position embeddings in training until the
model could not tell one background patch from another (docs/positions.md);
model.patch_norm layer-normalises the patch features before the positions are added.

In the encoder-decoder the encoder's own updates drowned them next, and each patch's own
features with them, before the decoder's cross-attention read the encoder output;
model.memory_positions and model.memory_inputs add them there again."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import init_model

from m6_jax import config as config_lib
from m6_jax.model.m6 import M6, M6Config


def _config(tiny_config, architecture, patch_norm=True, memory_positions=True, memory_inputs=True):
  tiny_config.model.architecture = architecture
  tiny_config.model.patch_norm = patch_norm
  tiny_config.model.memory_positions = memory_positions
  tiny_config.model.memory_inputs = memory_inputs
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


def _grown_encoder(params, factor):
  """`params` with every encoder layer's updates (attention and feed-forward outputs)
  `factor` times larger, as training grows them against the input embeddings."""
  params = dict(params)
  for name in [k for k in params if k.startswith("encoder_layer_")]:
    layer = dict(params[name])
    layer["attention"] = {**layer["attention"], "out": layer["attention"]["out"] * factor}
    layer["mlp"] = jax.tree.map(lambda x: x * factor, layer["mlp"])
    params[name] = layer
  return params


@functools.partial(jax.jit, static_argnums=0)
def _encode(model, params, batch):
  return model.apply({"params": params}, batch, method=M6.encode)[0]


def _encoder_output(model, params, cfg, images):
  """The encoder output [b, P + Ls, d] of float `images` [b, H, W, 3], the same text each."""
  b = images.shape[0]
  batch = {
    "image": jnp.asarray(images),
    "has_image": jnp.ones((b,), jnp.int32),
    "src_tokens": jnp.asarray(np.tile(np.arange(5, 5 + cfg.src_len), (b, 1)), jnp.int32),
  }
  return np.asarray(_encode(model, params, batch))


def _blank(cfg, n=1):
  return np.full((n, cfg.image_size, cfg.image_size, 3), 0.9, np.float32)


def _patch_spread(model, params, cfg):
  """How far apart the encoder outputs of the patches of a blank image are (mean distance
  to their mean over their mean norm): only their positions tell them apart."""
  patches = _encoder_output(model, params, cfg, _blank(cfg))[0, : cfg.num_patches]
  spread = np.linalg.norm(patches - patches.mean(0), axis=-1).mean()
  return float(spread / np.linalg.norm(patches, axis=-1).mean())


@pytest.mark.parametrize("memory_positions", [True, False])
def test_the_decoder_reads_the_patch_positions_however_large_the_encoder_updates_grow(
  tiny_config, memory_positions
):
  cfg = _config(  # memory_inputs off: the positions alone
    tiny_config, "encoder_decoder", memory_positions=memory_positions, memory_inputs=False
  )
  model, params = init_model(cfg)
  at_init, grown = (_patch_spread(model, p, cfg) for p in (params, _grown_encoder(params, 100.0)))
  if memory_positions:  # measured: 0.54 and 0.53
    assert "memory_position_norm" in params
    assert at_init > 0.3 and grown > 0.3, (at_init, grown)
  else:  # the model as it was, measured: 0.023 and 0.0026
    assert "memory_position_norm" not in params
    assert at_init < 0.05 and grown < 0.01, (at_init, grown)


def _locality(model, params, cfg):
  """How much more the encoder output of the one patch whose pixels change (an object drawn
  on a blank image) moves than that of the others, which see it only through attention."""
  images = _blank(cfg, 2)
  images[1] = _object_at(cfg, 0)
  memory = _encoder_output(model, params, cfg, images)
  moved = np.linalg.norm(memory[0] - memory[1], axis=-1)[: cfg.num_patches]
  return float(moved[0] / moved[1:].mean())


@pytest.mark.parametrize("memory_inputs", [True, False])
def test_the_decoder_reads_each_patch_however_large_the_encoder_updates_grow(
  tiny_config, memory_inputs
):
  tiny_config.data.image_size = 48  # 9 patches: eight that the object is not in
  cfg = _config(tiny_config, "encoder_decoder", memory_inputs=memory_inputs)
  model, params = init_model(cfg)
  grown = _locality(model, _grown_encoder(params, 100.0), cfg)
  if memory_inputs:  # measured: 17
    assert "memory_input_norm" in params
    assert grown > 5, grown
  else:  # the model as it was: the encoder's mixing leaves the patch hardly its own (1.4)
    assert "memory_input_norm" not in params
    assert grown < 2.5, grown


@pytest.mark.parametrize("key", ["memory_positions", "memory_inputs"])
def test_a_config_saved_before_the_memory_keys_reads_them_off(key):
  saved = config_lib.default_config().to_dict()
  del saved["model"][key]
  assert config_lib.merged_with_defaults(saved).model[key] is False
  assert config_lib.default_config().model[key] is True
