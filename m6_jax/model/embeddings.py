"""Input embeddings: image patches (+2-D positions), text tokens (+1-D positions), segments,
and the 2-D grid positions of generated image codes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6_jax.model.layers import LayerNorm, default_kernel_init
from m6_jax.model.ops import constrain
from m6_jax.model.resnet import OfaResNetStem

Dtype = Any

embed_init = nn.initializers.normal(stddev=0.02)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[b, h, w, c] -> [b, (h/p)*(w/p), p*p*c], patches in row-major grid order."""
  b, h, w, c = images.shape
  gh, gw = h // patch_size, w // patch_size
  x = images.reshape(b, gh, patch_size, gw, patch_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, patch_size * patch_size * c)


class LinearPatchStem(nn.Module):
  """ViT-style: flatten each patch and project it linearly to d_model."""

  d_model: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    patches = patchify(images.astype(self.dtype), self.patch_size)
    return nn.Dense(
      self.d_model,
      dtype=self.dtype,
      name="projection",
      kernel_init=nn.with_logical_partitioning(default_kernel_init, ("channels", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(patches)


def _group_norm(name: str, dtype: Dtype) -> nn.GroupNorm:
  return nn.GroupNorm(
    num_groups=8,
    dtype=dtype,
    name=name,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("channels",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)),
  )


_conv_bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("channels",))


class ResidualConvBlock(nn.Module):
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv_init = nn.with_logical_partitioning(
      nn.initializers.he_normal(), (None, None, None, "channels")
    )
    h = _group_norm("norm1", self.dtype)(x)
    h = nn.Conv(
      self.channels,
      (3, 3),
      dtype=self.dtype,
      kernel_init=conv_init,
      bias_init=_conv_bias_init,
      name="conv1",
    )(nn.relu(h))
    h = _group_norm("norm2", self.dtype)(h)
    h = nn.Conv(
      self.channels,
      (3, 3),
      dtype=self.dtype,
      kernel_init=conv_init,
      bias_init=_conv_bias_init,
      name="conv2",
    )(nn.relu(h))
    return x + h


class ResNetPatchStem(nn.Module):
  """A small ResNet-style stem (the paper uses ResNet patch features) then a strided conv

  that turns each patch into one d_model vector. Features see beyond their own pixels
  through the 3x3 convolutions, as CNN patch features do.
  """

  d_model: int
  patch_size: int
  channels: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = nn.Conv(
      self.channels,
      (3, 3),
      dtype=self.dtype,
      name="conv_in",
      bias_init=_conv_bias_init,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.he_normal(), (None, None, None, "channels")
      ),
    )(images.astype(self.dtype))
    x = ResidualConvBlock(self.channels, self.dtype, name="block1")(x)
    x = ResidualConvBlock(self.channels, self.dtype, name="block2")(x)
    x = nn.relu(_group_norm("norm_out", self.dtype)(x))
    x = nn.Conv(
      self.d_model,
      (self.patch_size, self.patch_size),
      strides=(self.patch_size, self.patch_size),
      padding="VALID",
      dtype=self.dtype,
      name="to_patches",
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      kernel_init=nn.with_logical_partitioning(
        default_kernel_init, (None, None, "channels", "embed")
      ),
    )(x)
    b, gh, gw, d = x.shape
    return x.reshape(b, gh * gw, d)


class ImageEmbedding(nn.Module):
  """Patch features plus learned row and column embeddings (2-D positions; none with
  `positions` False, when positions enter as attention biases, m6_jax/model/ofa.py).

  `patch_norm` layer-normalises each patch's features before the positions are added, so
  that their scale cannot outgrow the positions': under Adam a projection of hundreds of
  near-constant pixels grows its output far faster than an embedding table grows, and the
  positions drowned (docs/positions.md).
  """

  d_model: int
  patch_size: int
  stem: str = "linear"
  stem_channels: int = 32
  dtype: Dtype = jnp.float32
  positions: bool = True
  resnet_layers: tuple[int, ...] = (3, 4, 23)
  patch_norm: bool = False

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [b, H, W, 3] with values in [0, 1] -> [b, patches, d_model]."""
    _, h, w, _ = images.shape
    gh, gw = h // self.patch_size, w // self.patch_size
    # Pixels to [-1, 1] (big_vision's value_range(-1, 1)): on [0, 1] inputs the near-white
    # background dominated every patch's projection (docs/generate_and_eval.md has the runs).
    images = images.astype(self.dtype) * 2.0 - 1.0
    if self.stem == "linear":
      x = LinearPatchStem(self.d_model, self.patch_size, self.dtype, name="stem")(images)
    elif self.stem == "resnet":
      x = ResNetPatchStem(
        self.d_model, self.patch_size, self.stem_channels, self.dtype, name="stem"
      )(images)
    elif self.stem == "ofa_resnet":
      x = OfaResNetStem(self.d_model, self.resnet_layers, self.dtype, name="stem")(images)
    else:
      raise ValueError(f"Unknown image stem '{self.stem}'; use 'linear', 'resnet' or 'ofa_resnet'.")
    if not self.positions:
      return constrain(x, ("batch", "length", "embed"))
    if self.patch_norm:
      x = LayerNorm(dtype=self.dtype, name="patch_norm")(x)
    row = self.param(
      "row_embedding",
      nn.with_logical_partitioning(embed_init, ("patch", "embed")),
      (gh, self.d_model),
      jnp.float32,
    )
    col = self.param(
      "col_embedding",
      nn.with_logical_partitioning(embed_init, ("patch", "embed")),
      (gw, self.d_model),
      jnp.float32,
    )
    x = x + grid_positions(row, col).astype(self.dtype)[None]
    return constrain(x, ("batch", "length", "embed"))


def grid_positions(row: jax.Array, col: jax.Array) -> jax.Array:
  """Row [h, d] and column [w, d] embeddings -> each patch's [h * w, d], row-major."""
  return (row[:, None, :] + col[None, :, :]).reshape(-1, row.shape[-1])


class PositionEmbedding(nn.Module):
  """Learned embeddings indexed by an integer array (1-D text positions, segment types)."""

  num_embeddings: int
  d_model: int
  axis_name: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(embed_init, (self.axis_name, "embed")),
      (self.num_embeddings, self.d_model),
      jnp.float32,
    )
    return jnp.take(table, ids, axis=0).astype(self.dtype)


class CodeGridPosition(nn.Module):
  """Learned row and column embeddings of the image codes in a target (text-to-image).

  A text-to-image target is BOS followed by the h x w codes of the grid in row-major order,
  so target position j >= 1 holds code j - 1, at row (j - 1) // w and column (j - 1) % w.
  Only positions whose token is a code get the embedding (text targets are unchanged); it
  depends on the token and its position alone, so teacher forcing and one-token decoding
  steps add the same vectors.
  """

  grid: tuple[int, int]
  d_model: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, is_code: jax.Array, positions: jax.Array) -> jax.Array:
    """is_code bool [b, l] at target positions [l] (0 = BOS) -> [b, l, d_model]."""
    h, w = self.grid
    # The grid cells are image positions like the patches: the same ("patch", "embed") axes.
    row = self.param(
      "row_embedding",
      nn.with_logical_partitioning(embed_init, ("patch", "embed")),
      (h, self.d_model),
      jnp.float32,
    )
    col = self.param(
      "col_embedding",
      nn.with_logical_partitioning(embed_init, ("patch", "embed")),
      (w, self.d_model),
      jnp.float32,
    )
    cell = jnp.clip(positions - 1, 0, h * w - 1)  # BOS / positions past the grid hold no code
    pos = (jnp.take(row, cell // w, axis=0) + jnp.take(col, cell % w, axis=0)).astype(self.dtype)
    return jnp.where(is_code[..., None], pos[None], jnp.zeros((), self.dtype))
