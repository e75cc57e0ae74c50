"""OFA's architecture as options of the encoder-decoder model (all off by default).

OFA / OFA-CN (Wang et al. 2022, the successor of M6) is an encoder-decoder whose inputs
and attention differ from M6's in the ways below; each is a `model.*` key, and a config
with all of them (and model.architecture="encoder_decoder") computes what OFA's PyTorch
implementation (ModelScope's modeling_ofa.py) computes, which tests/test_ofa_equality.py
checks to 1e-4 on a random OFA.

- position_bias="ofa": no position embedding is added to the inputs. Positions enter every
  attention as a bias: an absolute one, the dot product of separate query / key projections
  of layer-normed position embeddings (one table for the source text, one for the image
  patch grid, one for the target), shared by the layers of a stack; plus, in self-attention,
  a learned per-layer, per-head relative bias of bucketed distances: between text positions
  (`token_bucket_size`, log-spaced beyond half of it) and between image patches
  (`image_bucket_size`, the 2-D offset). The cross-attention gets the absolute bias of the
  target positions against the encoder's positions.
- scale_embedding: token and patch embeddings times sqrt(d_model).
- layernorm_embedding: a layer norm on the embedded source text, the embedded image
  patches and the embedded target (three norms).
- attn_scale_factor f: queries scaled by (head_dim * f) ** -0.5 (OFA: 2).
- head_scale: a learned scale per head on the attention output (OFA's `c_attn`).
- normformer: a layer norm after each attention (before the residual) and after the
  feed-forward's activation (NormFormer).
- normalize_before: pre-norm blocks (the default); False: post-norm, no final norms.
- activation: "gelu_tanh" (the default, tanh approximation), "gelu" (exact, OFA's) or "relu".
- image_stem="ofa_resnet": the first three stages of a ResNet (bottleneck blocks,
  `resnet_layers` of them per stage, inference-mode BatchNorm; m6_jax/model/resnet.py) then a
  linear projection of its 1024 channels; one patch per 16 x 16 pixels (model.patch_size 16).

The segment embedding of the image and source rows is OFA's type embedding (its target row
is zero in a converted model). OFA's key-projection bias is left out: it adds the same
amount to every logit of a query, which the softmax cancels.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from m6_jax.model.embeddings import embed_init
from m6_jax.model.layers import LayerNorm, default_kernel_init
from m6_jax.model.ofa_options import MAX_POSITIONS  # the keys and their checks live there
from m6_jax.model.ops import query_scaling


def token_buckets(bucket_size: int, length: int) -> np.ndarray:
  """OFA's relative-position bucket [length, length] of text query i and key j (int32).

  Distances below bucket_size / 2 are their own buckets, longer ones log-spaced up to
  MAX_POSITIONS; computed in float32 as OFA computes them."""
  rel = np.arange(length)[:, None] - np.arange(length)[None, :]
  mid = bucket_size // 2
  abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
  with np.errstate(divide="ignore"):
    ratio = np.log(abs_pos.astype(np.float32) / np.float32(mid))
  scale = np.float32(math.log((MAX_POSITIONS - 1) / mid))
  log_pos = (np.ceil(ratio / scale * np.float32(mid - 1)) + mid).astype(np.int64)
  bucket = np.where(abs_pos <= mid, rel, log_pos * np.sign(rel))
  return (bucket + bucket_size - 1).astype(np.int32)


def image_position_ids(bucket_size: int, grid: tuple[int, int]) -> np.ndarray:
  """The id of each patch of a row-major (h, w) grid in OFA's image position table."""
  h, w = grid
  return (np.arange(w)[None, :] + np.arange(h)[:, None] * bucket_size + 1).reshape(-1)


def image_buckets(bucket_size: int, grid: tuple[int, int]) -> np.ndarray:
  """OFA's relative-position bucket [P, P] of patch p and patch q: their 2-D offset."""
  h, w = grid
  rows, cols = np.repeat(np.arange(h), w), np.tile(np.arange(w), h)
  dr = rows[:, None] - rows[None, :] + bucket_size - 1
  dc = cols[:, None] - cols[None, :] + bucket_size - 1
  return (dr * (2 * bucket_size - 1) + dc).astype(np.int32)


def num_image_buckets(bucket_size: int) -> int:
  return (2 * bucket_size - 1) ** 2 + 3


@struct.dataclass
class PositionBias:
  """What one attention adds to its logits: `absolute` [1, heads, q, k] (the same for every
  row of the batch, which the decoding step relies on), plus in self-attention each layer's
  relative tables looked up at `token_buckets` where `token_region` ([q, k] each) and at
  `image_buckets` where `image_region`."""

  absolute: jax.Array
  token_buckets: jax.Array | None = None
  token_region: jax.Array | None = None
  image_buckets: jax.Array | None = None
  image_region: jax.Array | None = None


class _PositionProjection(nn.Module):
  """Linear map of position embeddings to per-head vectors [L, heads, head_dim]."""

  num_heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(default_kernel_init, ("embed", "heads", "kv")),
      (x.shape[-1], self.num_heads, self.head_dim),
      jnp.float32,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
      (self.num_heads, self.head_dim),
      jnp.float32,
    )
    return jnp.einsum("ld,dhk->lhk", x.astype(jnp.float32), kernel) + bias


class OfaInputs(nn.Module):
  """OFA's input-side parameters: the embedding norms and the position tables, norms and
  projections of the absolute position bias (encoder: text and image; decoder: target)."""

  config: Any  # M6Config

  def setup(self):
    c, o = self.config, self.config.ofa
    eps, dtype = c.layer_norm_epsilon, jnp.dtype(c.dtype)
    if o.layernorm_embedding:
      self.source_norm = LayerNorm(eps, dtype)
      self.image_norm = LayerNorm(eps, dtype)
      self.target_norm = LayerNorm(eps, dtype)
    if not o.biased:
      return

    def table(rows):
      init = nn.with_logical_partitioning(embed_init, (None, "embed"))
      return self.param_table(init, rows)

    self.source_positions = table(c.src_len)
    self.image_positions = table(o.image_bucket_size**2 + 1)
    self.target_positions = table(c.tgt_len)
    self.source_position_norm = LayerNorm(eps)
    self.image_position_norm = LayerNorm(eps)
    self.target_position_norm = LayerNorm(eps)
    proj = lambda: _PositionProjection(c.num_heads, c.head_dim)  # noqa: E731
    self.encoder_q, self.encoder_k = proj(), proj()
    self.self_q, self.self_k = proj(), proj()
    self.cross_q, self.cross_k = proj(), proj()

  def param_table(self, init, rows):
    return nn.Embed(rows, self.config.d_model, param_dtype=jnp.float32, embedding_init=init)

  def embedding_norm(self, name: str, x: jax.Array) -> jax.Array:
    """The layernorm_embedding norm of the "source", "image" or "target" embeddings."""
    return getattr(self, f"{name}_norm")(x)

  def _logits(self, q_proj, k_proj, q_pos, k_pos) -> jax.Array:
    q = q_proj(q_pos) * query_scaling(self.config.head_dim, self.config.ofa.attn_scale_factor)
    return jnp.einsum("qhd,khd->hqk", q, k_proj(k_pos))[None]

  def source_positions_of(self, num_patches: int, src_len: int) -> jax.Array:
    """The encoder's normed position embeddings [P + Ls, d]: the patches', the text's."""
    c = self.config
    grid = (c.image_size // c.patch_size, c.image_size // c.patch_size)
    assert grid[0] * grid[1] == num_patches
    ids = jnp.asarray(image_position_ids(c.ofa.image_bucket_size, grid))
    image = self.image_position_norm(self.image_positions(ids))
    text = self.source_position_norm(self.source_positions(jnp.arange(src_len)))
    return jnp.concatenate([image, text], axis=0)

  def encoder_bias(self, num_patches: int, src_len: int) -> PositionBias:
    """The encoder's self-attention bias over [image ; source]."""
    pos = self.source_positions_of(num_patches, src_len)
    c, s = self.config, num_patches + src_len
    is_text = np.arange(s) >= num_patches
    token = np.zeros((s, s), np.int32)
    token[num_patches:, num_patches:] = token_buckets(c.ofa.token_bucket_size, src_len)
    grid = (c.image_size // c.patch_size,) * 2
    image = np.zeros((s, s), np.int32)
    image[:num_patches, :num_patches] = image_buckets(c.ofa.image_bucket_size, grid)
    return PositionBias(
      self._logits(self.encoder_q, self.encoder_k, pos, pos),
      jnp.asarray(token),
      jnp.asarray(is_text[:, None] & is_text[None, :]),
      jnp.asarray(image),
      jnp.asarray(~is_text[:, None] & ~is_text[None, :]),
    )

  def decoder_biases(
    self, positions: jax.Array, num_patches: int, src_len: int, step: bool = False
  ) -> tuple[PositionBias, PositionBias]:
    """The decoder's (self-attention, cross-attention) biases for target queries at
    `positions` [l] against the target keys (all config.tgt_len of them in a decoding `step`,
    else the first l) and every encoder position."""
    c = self.config
    target = self.target_position_norm(self.target_positions(jnp.arange(c.tgt_len)))
    queries = jnp.take(target, positions, axis=0)
    keys = target if step else target[: positions.shape[0]]
    all_buckets = jnp.asarray(token_buckets(c.ofa.token_bucket_size, c.tgt_len))
    buckets = jnp.take(all_buckets, positions, axis=0)[:, : keys.shape[0]]
    own = PositionBias(
      self._logits(self.self_q, self.self_k, queries, keys),
      buckets,
      jnp.ones(buckets.shape, bool),
    )
    source = self.source_positions_of(num_patches, src_len)
    return own, PositionBias(self._logits(self.cross_q, self.cross_k, queries, source))
