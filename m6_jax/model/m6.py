"""The M6 model: one Transformer stack over [image patches ; source text ; target text].

The prefix (image + source text) attends bidirectionally, the target attends to the whole
prefix and causally to itself, so one stack is encoder and decoder at once (prefix-LM). The
LM head runs on the target positions only: the prefix has no loss, so computing its logits
would be wasted vocabulary-sized matmuls.

Batch features (see m6_jax/data/tasks.py): image [b, h, w, 3] float in [0, 1], has_image [b],
src_tokens [b, Ls], tgt_input [b, Lt]; token id 0 is padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from m6_jax.model.embeddings import ImageEmbedding, PositionEmbedding, embed_init
from m6_jax.model.layers import LayerNorm, TransformerBlock, constrain, default_kernel_init

PAD_ID = 0
SEGMENT_IMAGE, SEGMENT_SOURCE, SEGMENT_TARGET = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class M6Config:
  """Hashable model hyper-parameters (Flax module fields must be hashable)."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  image_size: int
  patch_size: int
  src_len: int
  tgt_len: int
  dropout_rate: float = 0.0
  image_stem: str = "linear"
  stem_channels: int = 32
  tie_embeddings: bool = True
  dtype: str = "float32"
  layer_norm_epsilon: float = 1e-6

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def seq_len(self) -> int:
    return self.num_patches + self.src_len + self.tgt_len

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "M6Config":
    m, d = config.model, config.data
    return cls(
      vocab_size=m.vocab_size,
      d_model=m.d_model,
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      head_dim=m.head_dim,
      mlp_dim=m.mlp_dim,
      image_size=d.image_size,
      patch_size=m.patch_size,
      src_len=d.src_len,
      tgt_len=d.tgt_len,
      dropout_rate=m.dropout_rate,
      image_stem=m.image_stem,
      stem_channels=m.stem_channels,
      tie_embeddings=m.tie_embeddings,
      dtype=m.dtype,
      layer_norm_epsilon=m.layer_norm_epsilon,
    )


def prefix_lm_mask(prefix_valid: jax.Array, target_valid: jax.Array) -> jax.Array:
  """Boolean attention mask [b, L, L] for the sequence [prefix ; target].

  Query q may attend key k when k is a real (non-padding) position and either k is in the
  prefix and q is in the prefix (bidirectional encoder), or q is in the target and k is in
  the prefix or at or before q in the target (causal decoder). Prefix queries never see
  target keys.
  """
  valid = jnp.concatenate([prefix_valid, target_valid], axis=1).astype(bool)
  p, t = prefix_valid.shape[1], target_valid.shape[1]
  is_prefix = jnp.arange(p + t) < p
  pos = jnp.arange(p + t)
  causal = pos[None, :] <= pos[:, None]
  structure = is_prefix[None, :] | (~is_prefix[:, None] & causal)  # [q, k]
  return structure[None] & valid[:, None, :]


class M6(nn.Module):
  config: M6Config

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    self.token_embedding = nn.Embed(
      c.vocab_size,
      c.d_model,
      dtype=dtype,
      param_dtype=jnp.float32,
      embedding_init=nn.with_logical_partitioning(embed_init, ("vocab", "embed")),
    )
    self.image_embedding = ImageEmbedding(
      c.d_model, c.patch_size, c.image_stem, c.stem_channels, dtype
    )
    self.text_position = PositionEmbedding(c.src_len + c.tgt_len, c.d_model, "length", dtype)
    self.segment_embedding = PositionEmbedding(3, c.d_model, "segment", dtype)
    self.blocks = [
      TransformerBlock(
        c.num_heads,
        c.head_dim,
        c.mlp_dim,
        c.dropout_rate,
        c.layer_norm_epsilon,
        dtype,
        name=f"layer_{i}",
      )
      for i in range(c.num_layers)
    ]
    self.final_norm = LayerNorm(c.layer_norm_epsilon, dtype)
    self.embedding_dropout = nn.Dropout(c.dropout_rate)
    if not c.tie_embeddings:
      self.lm_head = nn.Dense(
        c.vocab_size,
        dtype=dtype,
        use_bias=False,
        kernel_init=nn.with_logical_partitioning(default_kernel_init, ("embed", "vocab")),
      )

  def embed_inputs(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Returns the embedded sequence [b, L, d] and which prefix positions are real [b, P+Ls]."""
    c = self.config
    images = batch["image"]
    b = images.shape[0]
    image_x = self.image_embedding(images)
    text_ids = jnp.concatenate([batch["src_tokens"], batch["tgt_input"]], axis=1)
    text_x = (
      self.token_embedding(text_ids) + self.text_position(jnp.arange(c.src_len + c.tgt_len))[None]
    )
    x = jnp.concatenate([image_x, text_x], axis=1)
    segments = jnp.concatenate(
      [
        jnp.full((c.num_patches,), SEGMENT_IMAGE),
        jnp.full((c.src_len,), SEGMENT_SOURCE),
        jnp.full((c.tgt_len,), SEGMENT_TARGET),
      ]
    )
    x = x + self.segment_embedding(segments)[None]
    image_valid = jnp.broadcast_to(batch["has_image"].astype(bool)[:, None], (b, c.num_patches))
    prefix_valid = jnp.concatenate([image_valid, batch["src_tokens"] != PAD_ID], axis=1)
    return constrain(x, ("batch", "length", "embed")), prefix_valid

  def __call__(self, batch: Mapping[str, jax.Array], deterministic: bool = True) -> jax.Array:
    """Logits [b, Lt, vocab] (float32) for the target positions."""
    c = self.config
    x, prefix_valid = self.embed_inputs(batch)
    mask = prefix_lm_mask(prefix_valid, batch["tgt_input"] != PAD_ID)
    x = self.embedding_dropout(x, deterministic=deterministic)
    for block in self.blocks:
      x = block(x, mask, deterministic)
    x = self.final_norm(x[:, -c.tgt_len :, :])
    if c.tie_embeddings:
      logits = self.token_embedding.attend(x)
    else:
      logits = self.lm_head(x)
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)


def dummy_batch(config: M6Config, batch_size: int = 1) -> dict[str, Any]:
  """A zero batch with the feature shapes the model expects (for init and eval_shape)."""
  return {
    "image": jnp.zeros((batch_size, config.image_size, config.image_size, 3), jnp.float32),
    "has_image": jnp.ones((batch_size,), jnp.int32),
    "src_tokens": jnp.zeros((batch_size, config.src_len), jnp.int32),
    "tgt_input": jnp.ones((batch_size, config.tgt_len), jnp.int32),
  }
