"""The config keys of OFA's options (m6_jax/model/ofa.py describes each), their defaults,
the hashable options of M6Config and their checks.

Apart from ofa.py so that loading a config (m6_jax/config/) imports neither JAX nor Flax:
`--help`, flag errors and the host-memory restart of `python -m m6_jax.main` stay instant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

POSITION_BIASES = ("none", "ofa")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu")
MAX_POSITIONS = 1024  # OFA's relative text buckets are log-spaced up to this distance

# The config keys (config.model.*) and their defaults: M6's numerics.
MODEL_DEFAULTS = {
  "position_bias": "none",
  "token_bucket_size": 256,
  "image_bucket_size": 42,
  "attn_scale_factor": 1.0,
  "head_scale": False,
  "normformer": False,
  "normalize_before": True,
  "scale_embedding": False,
  "layernorm_embedding": False,
  "activation": "gelu_tanh",
  "resnet_layers": (3, 4, 23),
}


@dataclasses.dataclass(frozen=True)
class OfaOptions:
  """The options above, hashable (a field of M6Config)."""

  position_bias: str = "none"
  token_bucket_size: int = 256
  image_bucket_size: int = 42
  attn_scale_factor: float = 1.0
  head_scale: bool = False
  normformer: bool = False
  normalize_before: bool = True
  scale_embedding: bool = False
  layernorm_embedding: bool = False
  activation: str = "gelu_tanh"
  resnet_layers: tuple[int, ...] = (3, 4, 23)

  @classmethod
  def from_model_config(cls, m: Any) -> "OfaOptions":
    values = {k: m.get(k, v) for k, v in MODEL_DEFAULTS.items()}
    values["resnet_layers"] = tuple(int(x) for x in values["resnet_layers"])
    return cls(**values)

  @property
  def biased(self) -> bool:
    return self.position_bias == "ofa"


def validate(config: Any, require) -> None:
  """Config checks of the options (`require(condition, message)` raises ConfigError)."""
  m = config.model
  require(
    m.position_bias in POSITION_BIASES, f"model.position_bias must be one of {POSITION_BIASES}."
  )
  require(m.activation in ACTIVATIONS, f"model.activation must be one of {ACTIVATIONS}.")
  if m.position_bias == "ofa":
    require(
      m.architecture == "encoder_decoder",
      "model.position_bias='ofa' needs model.architecture='encoder_decoder'.",
    )
    require(
      m.token_bucket_size >= 2 and m.image_bucket_size >= 1,
      "model.token_bucket_size must be >= 2 and model.image_bucket_size >= 1.",
    )
    longest = max(config.data.src_len, config.data.tgt_len)
    require(
      longest <= MAX_POSITIONS,
      f"model.position_bias='ofa' takes texts of at most {MAX_POSITIONS} positions.",
    )
    grid = config.data.image_size // m.patch_size
    require(
      grid <= m.image_bucket_size,
      f"the {grid} x {grid} patch grid is larger than model.image_bucket_size="
      f"{m.image_bucket_size}; raise it or use smaller images.",
    )
  if m.image_stem == "ofa_resnet":
    require(
      m.patch_size == 16 and config.data.image_size % 16 == 0,
      "model.image_stem='ofa_resnet' makes one patch per 16 x 16 pixels: set model.patch_size=16 "
      "and a data.image_size that is a multiple of 16.",
    )
  require(
    m.moe_num_experts == 0 or (not m.normformer and m.activation == "gelu_tanh"),
    "model.normformer and model.activation apply to dense feed-forwards only (moe_num_experts=0).",
  )
