"""OFA's image stem: the first three stages of a ResNet, then a linear map to d_model.

As OFA uses it (ModelScope's ofa/resnet.py): a 7x7 stride-2 convolution, BatchNorm, ReLU
and a 3x3 stride-2 max pool, then three stages of bottleneck blocks (64, 128, 256 wide,
expanding 4x; the second and third stride 2), so a 256 x 256 image becomes a 16 x 16 grid
of 1024-channel features, one per 16 x 16 pixels. BatchNorm runs in inference mode on its
stored statistics (parameters here, so a converted checkpoint carries them); training
updates them like any other parameter, which is not what OFA's training did (its running
statistics were frozen or averaged), hence fine-tuning with this stem is best done with
a small learning rate.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6_jax.model.layers import Dense

Dtype = Any
BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's
STAGE_WIDTHS = (64, 128, 256)
EXPANSION = 4
OUT_CHANNELS = STAGE_WIDTHS[-1] * EXPANSION  # 1024

_conv_init = nn.with_logical_partitioning(
  nn.initializers.variance_scaling(2.0, "fan_out", "normal"), (None, None, None, "channels")
)


class FrozenBatchNorm(nn.Module):
  """BatchNorm with stored statistics: (x - mean) / sqrt(var + eps) * scale + bias."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = x.shape[-1]

    def param(name, init):
      return self.param(name, nn.with_logical_partitioning(init, ("channels",)), (n,), jnp.float32)

    scale, bias = param("scale", nn.initializers.ones), param("bias", nn.initializers.zeros)
    mean, var = param("mean", nn.initializers.zeros), param("var", nn.initializers.ones)
    inv = scale * jax.lax.rsqrt(var + BN_EPSILON)
    return (x * inv.astype(x.dtype) + (bias - mean * inv).astype(x.dtype)).astype(x.dtype)


def _conv(features: int, size: int, stride: int, name: str, dtype: Dtype) -> nn.Conv:
  pad = size // 2
  return nn.Conv(
    features,
    (size, size),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    dtype=dtype,
    kernel_init=_conv_init,
    name=name,
  )


class Bottleneck(nn.Module):
  width: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = nn.relu(FrozenBatchNorm(name="bn1")(_conv(self.width, 1, 1, "conv1", self.dtype)(x)))
    out = _conv(self.width, 3, self.stride, "conv2", self.dtype)(out)
    out = nn.relu(FrozenBatchNorm(name="bn2")(out))
    out = FrozenBatchNorm(name="bn3")(_conv(self.width * EXPANSION, 1, 1, "conv3", self.dtype)(out))
    if self.downsample:
      x = _conv(self.width * EXPANSION, 1, self.stride, "downsample_conv", self.dtype)(x)
      x = FrozenBatchNorm(name="downsample_bn")(x)
    return nn.relu(x + out)


class OfaResNetStem(nn.Module):
  """images [b, H, W, 3] in [-1, 1] -> [b, (H/16) * (W/16), d_model]."""

  d_model: int
  layers: Sequence[int] = (3, 4, 23)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = _conv(64, 7, 2, "conv1", self.dtype)(images.astype(self.dtype))
    x = nn.relu(FrozenBatchNorm(name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    channels = 64
    for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, self.layers)):
      for i in range(blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        downsample = i == 0 and (stride != 1 or channels != width * EXPANSION)
        name = f"layer{stage + 1}_{i}"
        x = Bottleneck(width, stride, downsample, self.dtype, name=name)(x)
        channels = width * EXPANSION
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    return Dense(self.d_model, ("channels", "embed"), self.dtype, name="projection")(x)
