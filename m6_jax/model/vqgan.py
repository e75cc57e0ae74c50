"""The VQGAN image tokenizer of text-to-image (M6's first stage): a convolutional encoder, a
vector quantizer and a decoder, plus the patch-GAN discriminator that training may add.

    images [b, H, W, 3] in [0, 1] --encode--> z [b, H/f, W/f, code_dim]
        --quantize--> codes int32 [b, H/f, W/f] --lookup--> vectors --decode--> images

f is `vqgan.downsample_factor` (a power of two: one stride-2 convolution per level of
`vqgan.channel_multipliers` after the first). The blocks follow taming-transformers, small:
residual blocks of GroupNorm + swish + 3x3 convolution, nearest-neighbour upsampling.

**The codebook is kept healthy by EMA updates with dead-code restarts**, not by gradients.
Each code is the running mean of the encoder outputs assigned to it (exponential moving
averages of their count and sum, decay `vqgan.ema_decay`), and a code whose average count
falls below `vqgan.dead_code_threshold` assignments per step is moved onto a random encoder
output of the current batch. Why: the EMA count is itself the usage statistic a restart needs,
so one mechanism gives both (no extra state, no separate codebook loss to balance); codes
start with a count of 0, so the first step places every code on an encoder output, which is
the data-dependent initialisation for free; and a restart acts within one step, where a
gradient-trained codebook leaves codes it never selects dead for good. The codebook and its
statistics are parameters the optimizer never changes (their gradient is zero: the
straight-through estimator sends the decoder's gradient to the encoder, and the commitment
loss stops it at the codebook); the train step sets them (`ema_update`).

With `vqgan.l2_normalize` the lookup is ViT-VQGAN's: encoder outputs and codes are unit
vectors of a low dimension (`code_dim`), so nearness is the cosine and no code sits unused
far from the data for want of scale.

Parameters carry logical axis names like the M6 modules: convolution kernels
(kh, kw, in, "channels"), norms and biases ("channels",), the codebook (None, "channels");
the default rules replicate them (the model is small) while the batch is split over the mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Dtype = Any

NORM_GROUPS = 8  # GroupNorm groups: every width must be a multiple


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
  image_size: int = 48
  channels: int = 32
  channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
  num_res_blocks: int = 1
  downsample_factor: int = 8
  codebook_size: int = 256
  code_dim: int = 16
  l2_normalize: bool = True
  disc_channels: int = 32
  disc_layers: int = 2
  use_discriminator: bool = False
  dtype: Dtype = jnp.float32

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.downsample_factor
    return (side, side)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> VQGANConfig:
    v = config.vqgan
    return cls(
      image_size=int(config.data.image_size),
      channels=int(v.channels),
      channel_multipliers=tuple(int(m) for m in v.channel_multipliers),
      num_res_blocks=int(v.num_res_blocks),
      downsample_factor=int(v.downsample_factor),
      codebook_size=int(v.codebook_size),
      code_dim=int(v.code_dim),
      l2_normalize=bool(v.l2_normalize),
      disc_channels=int(v.disc_channels),
      disc_layers=int(v.disc_layers),
      use_discriminator=float(v.disc_weight) > 0,
      dtype=jnp.dtype(config.model.dtype),
    )


def levels_for_factor(factor: int) -> int:
  """Resolution levels (entries of channel_multipliers) for a downsampling factor."""
  return int(round(math.log2(factor))) + 1


_KERNEL_AXES = (None, None, None, "channels")


def _conv(features: int, name: str, dtype: Dtype, kernel=(3, 3), strides=(1, 1)) -> nn.Conv:
  return nn.Conv(
    features,
    kernel,
    strides=strides,
    dtype=dtype,
    name=name,
    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _KERNEL_AXES),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)),
  )


def _norm(name: str, dtype: Dtype) -> nn.GroupNorm:
  return nn.GroupNorm(
    num_groups=NORM_GROUPS,
    dtype=dtype,
    name=name,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("channels",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)),
  )


class ResBlock(nn.Module):
  """x + conv(swish(norm(conv(swish(norm(x)))))), with a 1x1 skip when the width changes."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv(self.features, "conv1", self.dtype)(nn.swish(_norm("norm1", self.dtype)(x)))
    h = _conv(self.features, "conv2", self.dtype)(nn.swish(_norm("norm2", self.dtype)(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, "skip", self.dtype, kernel=(1, 1))(x)
    return x + h


class Encoder(nn.Module):
  config: VQGANConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    h = _conv(c.channels, "conv_in", c.dtype)(images.astype(c.dtype) * 2.0 - 1.0)
    for level, mult in enumerate(c.channel_multipliers):
      for i in range(c.num_res_blocks):
        h = ResBlock(c.channels * mult, c.dtype, name=f"down{level}_block{i}")(h)
      if level < len(c.channel_multipliers) - 1:  # to the next level's size and width
        width = c.channels * c.channel_multipliers[level + 1]
        h = _conv(width, f"down{level}_stride2", c.dtype, strides=(2, 2))(h)
    h = ResBlock(h.shape[-1], c.dtype, name="mid_block")(h)
    h = nn.swish(_norm("norm_out", c.dtype)(h))
    return _conv(c.code_dim, "conv_out", c.dtype, kernel=(1, 1))(h).astype(jnp.float32)


def last_layer(features: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The decoder's last layer (3x3 conv to RGB): a function of its parameters, so that the
  adaptive GAN weight can differentiate the losses with respect to them alone."""
  out = jax.lax.conv_general_dilated(
    features,
    kernel.astype(features.dtype),
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  return (out + bias.astype(features.dtype)).astype(jnp.float32)


class Decoder(nn.Module):
  config: VQGANConfig

  @nn.compact
  def __call__(self, vectors: jax.Array, features_only: bool = False) -> jax.Array:
    """Code vectors [b, h, w, code_dim] -> images in [-1, 1] scale (unclipped), or the
    features before the last layer."""
    c = self.config
    mults = c.channel_multipliers
    h = _conv(c.channels * mults[-1], "conv_in", c.dtype)(vectors.astype(c.dtype))
    h = ResBlock(h.shape[-1], c.dtype, name="mid_block")(h)
    for level in reversed(range(len(mults))):
      for i in range(c.num_res_blocks):
        h = ResBlock(c.channels * mults[level], c.dtype, name=f"up{level}_block{i}")(h)
      if level > 0:  # to the next level's size and width (at the width of the larger side)
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        h = _conv(c.channels * mults[level - 1], f"up{level}_conv", c.dtype)(h)
    h = nn.swish(_norm("norm_out", c.dtype)(h))
    kernel = self.param(
      "last_kernel",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "channels", None)),
      (3, 3, h.shape[-1], 3),
      jnp.float32,
    )
    bias = self.param(
      "last_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (3,)
    )
    if features_only:
      return h
    return last_layer(h, kernel, bias)


def normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest codebook row (squared Euclidean distance) of every vector of z."""
  distances = (
    jnp.sum(z * z, axis=-1, keepdims=True)
    - 2.0 * jnp.einsum("...d,kd->...k", z, codebook)
    + jnp.sum(codebook * codebook, axis=-1)
  )
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


class VectorQuantizer(nn.Module):
  """The codebook [codebook_size, code_dim] and its EMA statistics (see the module
  docstring); `ema_count` starts at 0, so the first train step restarts every code."""

  codebook_size: int
  code_dim: int
  l2_normalize: bool

  def setup(self):
    def init_codebook(rng, shape):
      table = jax.random.normal(rng, shape, jnp.float32)
      return normalize(table) if self.l2_normalize else table

    shape = (self.codebook_size, self.code_dim)
    axes = (None, "channels")
    self.codebook = self.param("codebook", nn.with_logical_partitioning(init_codebook, axes), shape)
    self.ema_count = self.param(
      "ema_count", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), shape[:1]
    )
    self.ema_sum = self.param(
      "ema_sum", nn.with_logical_partitioning(nn.initializers.zeros, axes), shape
    )

  def __call__(self, z: jax.Array) -> jax.Array:
    return nearest_codes(z, self.codebook)

  def lookup(self, codes: jax.Array) -> jax.Array:
    return jnp.take(self.codebook, codes, axis=0)


class VQGAN(nn.Module):
  """Encoder, quantizer and decoder. `__call__` is the training forward pass."""

  config: VQGANConfig

  def setup(self):
    c = self.config
    self.encoder = Encoder(c)
    self.quantizer = VectorQuantizer(c.codebook_size, c.code_dim, c.l2_normalize)
    self.decoder = Decoder(c)

  def encode(self, images: jax.Array) -> jax.Array:
    """Images [b, H, W, 3] in [0, 1] -> encoder outputs [b, h, w, code_dim] (unit vectors
    with l2_normalize)."""
    z = self.encoder(images)
    return normalize(z) if self.config.l2_normalize else z

  def tokenize(self, images: jax.Array) -> jax.Array:
    """Images -> codes int32 [b, h, w]."""
    return self.quantizer(self.encode(images))

  def decode_codes(self, codes: jax.Array) -> jax.Array:
    """Codes [b, h, w] -> images [b, H, W, 3] in [0, 1] (clipped)."""
    out = self.decoder(self.quantizer.lookup(codes))
    return jnp.clip((out + 1.0) / 2.0, 0.0, 1.0)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """The training forward pass: encoder outputs `z`, their `codes`, the code vectors
    `quantized`, and the decoder's `features` before its last layer, fed the
    straight-through vectors z + stop_gradient(quantized - z)."""
    z = self.encode(images)
    codes = self.quantizer(z)
    quantized = self.quantizer.lookup(codes)
    straight_through = z + jax.lax.stop_gradient(quantized - z)
    features = self.decoder(straight_through, features_only=True)
    return {"z": z, "codes": codes, "quantized": quantized, "features": features}


class Discriminator(nn.Module):
  """A patch-GAN (pix2pix / taming-transformers): stride-2 4x4 convolutions with leaky ReLU,
  one real/fake logit per patch. GroupNorm stands in for BatchNorm (no batch statistics)."""

  config: VQGANConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Images in [-1, 1] scale (the decoder's output scale) -> patch logits."""
    c = self.config
    h = images.astype(c.dtype)
    width = c.disc_channels
    h = nn.leaky_relu(_conv(width, "conv_in", c.dtype, kernel=(4, 4), strides=(2, 2))(h), 0.2)
    for i in range(1, c.disc_layers):
      width = c.disc_channels * min(2**i, 8)
      h = _conv(width, f"conv{i}", c.dtype, kernel=(4, 4), strides=(2, 2))(h)
      h = nn.leaky_relu(_norm(f"norm{i}", c.dtype)(h), 0.2)
    return _conv(1, "logits", c.dtype, kernel=(3, 3))(h).astype(jnp.float32)


def init_params(config: VQGANConfig, rng: jax.Array) -> dict[str, Any]:
  """The (logically boxed) parameters of training: {"generator": VQGAN's,
  "discriminator": Discriminator's (only when the GAN loss is on)}."""
  gen_rng, disc_rng = jax.random.split(rng)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  params = {"generator": VQGAN(config).init(gen_rng, images)["params"]}
  if config.use_discriminator:
    params["discriminator"] = Discriminator(config).init(disc_rng, images)["params"]
  return params


def ema_update(
  quantizer: dict[str, jax.Array],
  z: jax.Array,
  codes: jax.Array,
  rng: jax.Array,
  decay: float,
  dead_code_threshold: float,
  l2_normalize: bool,
) -> tuple[dict[str, jax.Array], jax.Array]:
  """One EMA step of the codebook from this batch's encoder outputs `z` [..., D] and their
  `codes`, then dead-code restarts: (new quantizer parameters, number of codes restarted).

  count_k <- decay * count_k + (1 - decay) * n_k, sum_k <- decay * sum_k + (1 - decay) *
  (sum of the z assigned to k); code_k = sum_k / count_k (normalised with l2_normalize). A
  code whose count is below `dead_code_threshold` takes a random z of the batch as its code,
  with the threshold as its count: a restarted code that the next batch does not choose is
  restarted again, one that it chooses stays.
  """
  codebook_size = quantizer["codebook"].shape[0]
  z = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]).astype(jnp.float32))
  onehot = jax.nn.one_hot(codes.reshape(-1), codebook_size, dtype=jnp.float32)  # [N, K]
  count = decay * quantizer["ema_count"] + (1.0 - decay) * onehot.sum(axis=0)
  total = decay * quantizer["ema_sum"] + (1.0 - decay) * (onehot.T @ z)
  dead = count < dead_code_threshold
  picks = jax.random.randint(rng, (codebook_size,), 0, z.shape[0])
  count = jnp.where(dead, dead_code_threshold, count)
  total = jnp.where(dead[:, None], z[picks] * dead_code_threshold, total)
  codebook = total / jnp.maximum(count, 1e-6)[:, None]
  if l2_normalize:
    codebook = normalize(codebook)
  new = dict(quantizer, codebook=codebook, ema_count=count, ema_sum=total)
  return new, dead.sum()
