"""The M6 model: one Transformer stack over [image patches ; source text ; target text].

The prefix (image + source text) attends bidirectionally, the target attends to the whole
prefix and causally to itself, so one stack is encoder and decoder at once (prefix-LM). The
LM head runs on the target positions only: the prefix has no loss, so computing its logits
would be wasted vocabulary-sized matmuls.

Architectures (model.architecture): "unified" is the above, M6's own. "encoder_decoder"
(the form of M6's successors OFA / OFA-CN) runs the prefix through an encoder stack
(bidirectional, then a final layer norm) and the target through a decoder stack (causal
self-attention, cross-attention to the encoder output, feed-forward), each with its own
depth (model.num_encoder_layers / num_decoder_layers). The decoder reads the image only
through the encoder output; with `memory_inputs` that output gets the encoder's input (the
embedded image and source) and with `memory_positions` the prefix's position embeddings (the
patches' 2-D ones, the source text's), each layer-normed, added once more, so what the
decoder reads of each patch does not depend on how much of it survived the encoder's
updates, as the unified stack's target reads every layer, the first included
(docs/positions.md). Both share the embeddings
(`embed_prefix`, `embed_target`), the blocks (m6_jax/model/layers.py), the stack machinery
(m6_jax/model/stack.py: scan, remat, MoE), the final norm and the LM head; the batch
features, the logits and the cache interface below are the same. OFA's own inputs,
position biases and block variants are options of it (m6_jax/model/ofa.py).

Batch features (see m6_jax/model/features.py): image [b, h, w, 3] float in [0, 1],
has_image [b], src_tokens [b, Ls], tgt_input [b, Lt]; token id 0 is padding.

Text lengths come from the batch, not the config: src_tokens may have any Ls' <= src_len
columns and tgt_input any Lt' <= tgt_len (a length-bucketed batch, m6_jax/data/pipeline.py,
drops trailing padding columns). Positions do not move: source position i is i and target
position j is src_len + j (the config's src_len), so a trimmed batch gives exactly the
logits of the padded one on the kept positions (padding keys are masked out either way).
The config lengths are the maxima and size the position table. One exception: a MoE layer's
expert capacity is computed from the sequence length (m6_jax/model/moe.py), so a trimmed
batch can drop different tokens than the padded one unless the capacity never binds.

Image codes (text-to-image, `code_vocab_size` K > 0) are token ids vocab_size + c, rows of
the one token embedding after the text: one softmax, one (tied) LM head, one loss, and the
KV cache and searches of decoding.py unchanged. Target positions holding a code also get
row / column embeddings of its `code_grid` cell (`CodeGridPosition`), in `__call__` and
`decode_step` alike. With K = 0 the model is exactly the text-only one.

Incremental decoding (used by m6_jax/infer/decoding.py): `encode_prefix` runs the prefix
through the stack once and returns a DecodeCache; `decode_step` then embeds one target token
at a time, attends to the cached prefix and to the target positions decoded so far, and
returns that position's logits and the updated cache. Both give the logits of `__call__`
(teacher forcing) up to float rounding. For encoder_decoder, `encode_prefix` runs the
encoder once and caches each decoder layer's cross-attention keys/values of its output in
the prefix part of the cache (computed once, shared by the beams of an example like the
unified prefix), and `decode_step` runs the decoder on one token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from m6_jax.model import embeddings, features, ofa
from m6_jax.model.attention import AttentionMask
from m6_jax.model.embeddings import ImageEmbedding, PositionEmbedding, embed_init
from m6_jax.model.layers import LayerKV, LayerNorm, default_kernel_init
from m6_jax.model.moe import MoeOptions
from m6_jax.model.ofa_options import OfaOptions
from m6_jax.model.ops import constrain
from m6_jax.model.stack import REMAT_POLICIES, StackMode, layer_stack, run_stack  # noqa: F401

PAD_ID = features.PAD_ID
SEGMENT_IMAGE, SEGMENT_SOURCE, SEGMENT_TARGET = 0, 1, 2
ARCHITECTURES = ("unified", "encoder_decoder")


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
  src_len: int  # maxima: a batch may have fewer text columns (see the module docstring)
  tgt_len: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float | None = None  # None: dropout_rate
  image_stem: str = "linear"
  stem_channels: int = 32
  patch_norm: bool = True  # layer-normalise patch features before the 2-D positions
  memory_positions: bool = True  # encoder_decoder: positions added to the encoder output
  memory_inputs: bool = True  # encoder_decoder: the encoder's input added to its output
  tie_embeddings: bool = True
  dtype: str = "float32"
  layer_norm_epsilon: float = 1e-6
  moe_num_experts: int = 0
  moe_num_groups: int = 1
  moe_top_k: int = 1
  moe_capacity_factor: float = 1.25
  moe_eval_capacity_factor: float | None = None
  moe_dispatch: str = "einsum"
  moe_group_rows: int = 1
  moe_every: int = 1
  moe_aux_loss_weight: float = 0.01  # read by the train step, not by the model
  moe_z_loss_weight: float = 0.001
  scan_layers: bool = False
  remat_policy: str = "none"
  code_vocab_size: int = 0  # image codes after the text vocabulary (module docstring)
  code_grid: tuple[int, int] = (0, 0)  # (h, w) of a code target's grid

  @property
  def total_vocab_size(self) -> int:
    """Embedding rows and logits: the text vocabulary, then the image codes."""
    return self.vocab_size + self.code_vocab_size

  architecture: str = "unified"  # or "encoder_decoder" (see the module docstring)
  num_encoder_layers: int = 0  # encoder_decoder: the encoder's depth; 0: num_layers
  num_decoder_layers: int = 0  # encoder_decoder: the decoder's depth; 0: num_layers
  ofa: OfaOptions = OfaOptions()  # OFA's architecture options (m6_jax/model/ofa.py)
  attention_impl: str = "xla"  # xla, splash, cudnn or auto (m6_jax/model/attention.py)
  attention_interpret: bool = False  # splash in Pallas interpret mode (tests on CPU)

  @property
  def is_encoder_decoder(self) -> bool:
    return self.architecture == "encoder_decoder"

  def stack_layers(self, stack: str) -> int:
    """Blocks in the stack "unified", "encoder" or "decoder" (m6_jax/model/stack.py)."""
    depth = {"encoder": self.num_encoder_layers, "decoder": self.num_decoder_layers}
    return depth.get(stack, 0) or self.num_layers

  @property
  def target_stack(self) -> str:
    """The stack the target runs through: its layers hold the target keys/values."""
    return "decoder" if self.is_encoder_decoder else "unified"

  def is_moe_layer(self, index: int) -> bool:
    return self.moe_num_experts > 0 and (index + 1) % self.moe_every == 0

  @property
  def layers_per_group(self) -> int:
    """Layers in one scanned group: a MoE config repeats `moe_every` layers, the last MoE."""
    return self.moe_every if self.moe_num_experts > 0 else 1

  def moe_options(self, index: int) -> MoeOptions | None:
    """MoE options of layer `index` of a stack (each stack counts its layers from 0)."""
    if not self.is_moe_layer(index):
      return None
    # Each MoeOptions field is this config's field of the same name after "moe_".
    return MoeOptions(
      **{f.name: getattr(self, f"moe_{f.name}") for f in dataclasses.fields(MoeOptions)}
    )

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def seq_len(self) -> int:
    return self.num_patches + self.src_len + self.tgt_len

  @property
  def attention_pairs(self) -> int:
    """(query, key) pairs one full-mode attention layer scores per sequence: prefix x prefix
    and target x all keys. The prefix-LM mask never lets a prefix query see the target, and
    ops.attention_core skips that block (the model-FLOP counts use this)."""
    prefix = self.seq_len - self.tgt_len
    return prefix * prefix + self.tgt_len * self.seq_len

  @property
  def total_attention_pairs(self) -> int:
    """(query, key) pairs all attention layers score per sequence: `attention_pairs` per
    unified layer; prefix x prefix per encoder layer, target x target (self-attention) plus
    target x prefix (cross-attention) per decoder layer."""
    if not self.is_encoder_decoder:
      return self.num_layers * self.attention_pairs
    prefix, tgt = self.seq_len - self.tgt_len, self.tgt_len
    encoder = self.stack_layers("encoder") * prefix * prefix
    return encoder + self.stack_layers("decoder") * tgt * (tgt + prefix)

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
      attention_dropout_rate=m.get("attention_dropout_rate"),
      image_stem=m.image_stem,
      stem_channels=m.stem_channels,
      patch_norm=m.patch_norm,
      memory_positions=m.memory_positions,
      memory_inputs=m.memory_inputs,
      tie_embeddings=m.tie_embeddings,
      dtype=m.dtype,
      layer_norm_epsilon=m.layer_norm_epsilon,
      moe_num_experts=m.moe_num_experts,
      moe_num_groups=m.moe_num_groups,
      moe_top_k=m.moe_top_k,
      moe_capacity_factor=m.moe_capacity_factor,
      moe_eval_capacity_factor=m.moe_eval_capacity_factor,
      moe_dispatch=m.moe_dispatch,
      moe_group_rows=m.moe_group_rows,
      moe_every=m.moe_every,
      moe_aux_loss_weight=m.moe_aux_loss_weight,
      moe_z_loss_weight=m.moe_z_loss_weight,
      scan_layers=m.scan_layers,
      remat_policy=m.remat_policy,
      code_vocab_size=m.code_vocab_size,
      code_grid=tuple(int(x) for x in m.code_grid),
      architecture=m.architecture,
      num_encoder_layers=m.num_encoder_layers,
      num_decoder_layers=m.num_decoder_layers,
      ofa=OfaOptions.from_model_config(m),
      attention_impl=m.attention_impl,
      attention_interpret=m.attention_interpret,
    )


def _check_text_lengths(c: M6Config, batch: Mapping[str, jax.Array]) -> None:
  """Static check: text no longer than the config's maxima (the position table's size)."""
  limits = {"src_tokens": (0, c.src_len, "src_len"), "tgt_input": (1, c.tgt_len, "tgt_len")}
  for key, (low, high, name) in limits.items():
    if key in batch and not low <= batch[key].shape[1] <= high:
      raise ValueError(
        f"batch['{key}'] has {batch[key].shape[1]} positions; the model takes {low} to "
        f"data.{name}={high} (a shorter batch means the same as the padded one)."
      )


@struct.dataclass
class KVCache:
  """Keys/values of every layer ([batch, length, heads, kv] each) and which positions are real."""

  layers: tuple[LayerKV, ...]
  valid: jax.Array  # [batch, length] bool

  def constrain(self) -> "KVCache":
    return KVCache(
      tuple(kv.constrain() for kv in self.layers), constrain(self.valid, ("batch", "length"))
    )


@struct.dataclass
class DecodeCache:
  """The cache for incremental decoding, in two parts.

  prefix: image + source keys/values [bp, P+Ls, heads, kv], written once by `encode_prefix`
    and only read afterwards (encoder_decoder: each decoder layer's cross-attention
    keys/values of the encoder output, and `valid` the real encoder positions).
  target: target keys/values [B, Lt, heads, kv] (zeros until written), written one position
    per `decode_step`; `valid` marks the real (non-padding) tokens decoded so far.

  B is bp or a multiple g * bp: rows i*g .. i*g+g-1 then share prefix row i (the beams of
  one example), so beam search copies and reorders only the target part.
  """

  prefix: KVCache
  target: KVCache


def empty_target_cache(config: M6Config, batch_size: int, dtype: Any = None) -> KVCache:
  """A zero target cache for `batch_size` rows and config.tgt_len positions."""
  dtype = jnp.dtype(config.dtype if dtype is None else dtype)
  shape = (batch_size, config.tgt_len, config.num_heads, config.head_dim)
  depth = config.stack_layers(config.target_stack)
  layers = tuple(LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(depth))
  return KVCache(layers, jnp.zeros((batch_size, config.tgt_len), bool)).constrain()


class M6(nn.Module):
  config: M6Config

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    self.token_embedding = nn.Embed(
      c.total_vocab_size,
      c.d_model,
      dtype=dtype,
      param_dtype=jnp.float32,
      embedding_init=nn.with_logical_partitioning(embed_init, ("vocab", "embed")),
    )
    o = c.ofa
    self.image_embedding = ImageEmbedding(
      c.d_model,
      c.patch_size,
      c.image_stem,
      c.stem_channels,
      dtype,
      not o.biased,
      o.resnet_layers,
      c.patch_norm,
    )
    if o.biased or o.layernorm_embedding:
      self.ofa_inputs = ofa.OfaInputs(c)
    if not o.biased:  # OFA's positions are attention biases instead
      self.text_position = PositionEmbedding(c.src_len + c.tgt_len, c.d_model, "length", dtype)
    self.segment_embedding = PositionEmbedding(3, c.d_model, "segment", dtype)
    if c.code_vocab_size > 0:
      self.code_position = embeddings.CodeGridPosition(c.code_grid, c.d_model, dtype)
    if c.architecture not in ARCHITECTURES:
      raise ValueError(f"Unknown architecture '{c.architecture}'; use one of {ARCHITECTURES}.")
    # Each stack is the attribute of its name (m6_jax/model/stack.py run_stack reads it).
    if c.is_encoder_decoder:
      self.encoder = layer_stack(c, "encoder")
      if o.normalize_before:  # a post-norm stack ends normed
        self.encoder_norm = LayerNorm(c.layer_norm_epsilon, dtype)
      if self.has_memory_positions:
        self.memory_position_norm = LayerNorm(c.layer_norm_epsilon, dtype)
      if self.has_memory_inputs:
        self.memory_input_norm = LayerNorm(c.layer_norm_epsilon, dtype)
      self.decoder = layer_stack(c, "decoder")
    else:
      self.unified = layer_stack(c, "unified")
    if o.normalize_before:
      self.final_norm = LayerNorm(c.layer_norm_epsilon, dtype)
    self.embedding_dropout = nn.Dropout(c.dropout_rate)
    if not c.tie_embeddings:
      self.lm_head = nn.Dense(
        c.total_vocab_size,
        dtype=dtype,
        use_bias=False,
        kernel_init=nn.with_logical_partitioning(default_kernel_init, ("embed", "vocab")),
      )

  @property
  def has_memory_positions(self) -> bool:
    c = self.config  # OFA's positions are attention biases, the cross-attention's included
    return c.is_encoder_decoder and c.memory_positions and not c.ofa.biased

  @property
  def has_memory_inputs(self) -> bool:
    c = self.config  # OFA's scheme (converted weights) stays as OFA computes it
    return c.is_encoder_decoder and c.memory_inputs and not c.ofa.biased

  def memory_position_embeddings(self, src_len: int) -> jax.Array:
    """[P + src_len, d]: the prefix's position embeddings, layer-normed (the image
    embedding's row + column tables, then the source text's), shared with the inputs."""
    table = nn.meta.unbox(self.image_embedding.variables["params"])
    image = embeddings.grid_positions(table["row_embedding"], table["col_embedding"])
    text = self.text_position(jnp.arange(src_len))
    return self.memory_position_norm(jnp.concatenate([image.astype(text.dtype), text], axis=0))

  def embed_prefix(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The embedded prefix [b, P+Ls, d] and which of its positions are real [b, P+Ls]."""
    c = self.config
    images, src = batch["image"], batch["src_tokens"]
    b = images.shape[0]
    image_x = self._scaled(self.image_embedding(images)) + self.segment_embedding(SEGMENT_IMAGE)
    src_x = self._scaled(self.token_embedding(src))
    if not c.ofa.biased:
      src_x = src_x + self.text_position(jnp.arange(src.shape[1]))
    src_x = self._norm("source", src_x + self.segment_embedding(SEGMENT_SOURCE))
    x = jnp.concatenate([self._norm("image", image_x), src_x], axis=1)
    image_valid = jnp.broadcast_to(batch["has_image"].astype(bool)[:, None], (b, c.num_patches))
    prefix_valid = jnp.concatenate([image_valid, src != PAD_ID], axis=1)
    return constrain(x, ("batch", "length", "embed")), prefix_valid

  def embed_target(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Target tokens [b, l] at target positions [l] (0 = the BOS slot) -> [b, l, d]."""
    c = self.config
    x = self._scaled(self.token_embedding(tokens))
    if not c.ofa.biased:
      x = x + self.text_position(c.src_len + positions)
    x = x + self.segment_embedding(SEGMENT_TARGET)
    if c.code_vocab_size > 0:
      x = x + self.code_position(tokens >= c.vocab_size, positions)
    return constrain(self._norm("target", x), ("batch", "length", "embed"))

  def _scaled(self, x: jax.Array) -> jax.Array:  # OFA's scale_embedding
    return x * math.sqrt(self.config.d_model) if self.config.ofa.scale_embedding else x

  def _norm(self, name: str, x: jax.Array) -> jax.Array:  # OFA's layernorm_embedding
    return self.ofa_inputs.embedding_norm(name, x) if self.config.ofa.layernorm_embedding else x

  def _ofa_biases(self, prefix_len: int, positions: Any = None, step: bool = False) -> dict:
    """OFA's position biases (ofa.py) for the encoder (`positions` None) or the decoder."""
    if not self.config.ofa.biased:
      return {}
    p = self.config.num_patches
    if positions is None:
      return {"position_bias": self.ofa_inputs.encoder_bias(p, prefix_len - p)}
    own, cross = self.ofa_inputs.decoder_biases(positions, p, prefix_len - p, step)
    return {"position_bias": own, "cross_bias": cross.absolute}

  def embed_inputs(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Returns the embedded sequence [b, L, d] and which prefix positions are real [b, P+Ls]."""
    prefix_x, prefix_valid = self.embed_prefix(batch)
    target_x = self.embed_target(batch["tgt_input"], jnp.arange(batch["tgt_input"].shape[1]))
    x = jnp.concatenate([prefix_x, target_x], axis=1)
    return constrain(x, ("batch", "length", "embed")), prefix_valid

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm (pre-norm stacks) and LM head: [b, l, d] -> [b, l, vocab] float32."""
    x = self.final_norm(x) if self.config.ofa.normalize_before else x
    if self.config.tie_embeddings:
      logits = self.token_embedding.attend(x)
    else:
      logits = self.lm_head(x)
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)

  def encode(
    self, batch: Mapping[str, jax.Array], deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    """encoder_decoder: [image ; source] through the encoder and its final norm -> (the
    encoder output [b, P+Ls, d], which of its positions are real [b, P+Ls])."""
    x, prefix_valid = self.embed_prefix(batch)
    x = self.embedding_dropout(x, deterministic=deterministic)
    shared = {
      "mode": StackMode("full", deterministic),
      "mask": AttentionMask.prefix_lm(prefix_valid, prefix_valid[:, :0]),  # bidirectional
      "token_mask": prefix_valid,
      **self._ofa_biases(x.shape[1]),
    }
    inputs = x
    x, _ = run_stack(self, "encoder", x, shared)
    x = self.encoder_norm(x) if self.config.ofa.normalize_before else x
    if self.has_memory_inputs:
      x = x + self.memory_input_norm(inputs)
    if self.has_memory_positions:
      x = x + self.memory_position_embeddings(batch["src_tokens"].shape[1])[None]
    return constrain(x, ("batch", "length", "embed")), prefix_valid

  def __call__(self, batch: Mapping[str, jax.Array], deterministic: bool = True) -> jax.Array:
    """Logits [b, Lt, vocab] (float32) for the target positions (Lt: tgt_input's length)."""
    c = self.config
    _check_text_lengths(c, batch)
    tokens = batch["tgt_input"]
    target_valid = tokens != PAD_ID
    mode = StackMode("full", deterministic)
    if c.is_encoder_decoder:
      encoded, prefix_valid = self.encode(batch, deterministic)
      x = self.embed_target(tokens, jnp.arange(tokens.shape[1]))
      x = self.embedding_dropout(x, deterministic=deterministic)
      shared = {
        "mode": mode,
        "mask": AttentionMask.prefix_lm(prefix_valid[:, :0], target_valid),  # causal
        "token_mask": target_valid,
        "encoded": encoded,
        "cross_mask": AttentionMask.cross(prefix_valid, tokens.shape[1]),
        **self._ofa_biases(encoded.shape[1], jnp.arange(tokens.shape[1])),
      }
      x, _ = run_stack(self, "decoder", x, shared)
      return self.logits(x)
    x, prefix_valid = self.embed_inputs(batch)
    mask = AttentionMask.prefix_lm(prefix_valid, target_valid)
    token_mask = jnp.concatenate([prefix_valid, target_valid], axis=1)
    x = self.embedding_dropout(x, deterministic=deterministic)
    x, _ = run_stack(self, "unified", x, {"mode": mode, "mask": mask, "token_mask": token_mask})
    return self.logits(x[:, -tokens.shape[1] :, :])

  def encode_prefix(self, batch: Mapping[str, jax.Array]) -> DecodeCache:
    """Runs image + source through the stack once (no dropout) and returns the DecodeCache:
    the prefix keys/values of every layer (encoder_decoder: the encoder, then each decoder
    layer's cross-attention keys/values of its output) and an empty target cache of the
    batch's size.

    Reads image, has_image and src_tokens only (tgt_input is not needed); src_tokens may be
    shorter than src_len. The target cache always has tgt_len positions.
    """
    _check_text_lengths(self.config, {"src_tokens": batch["src_tokens"]})
    if self.config.is_encoder_decoder:
      encoded, prefix_valid = self.encode(batch)
      shared = {"mode": StackMode("cross_kv"), "encoded": encoded}
      x, layers = run_stack(self, "decoder", encoded, shared)
    else:
      x, prefix_valid = self.embed_prefix(batch)
      # The prefix rows of the full prefix-LM mask: prefix queries see exactly the real
      # prefix keys, never the target, so the prefix can be computed before any target.
      mask = AttentionMask.prefix_lm(prefix_valid, prefix_valid[:, :0])
      shared = {"mode": StackMode("prefix"), "mask": mask, "token_mask": prefix_valid}
      x, layers = run_stack(self, "unified", x, shared)
    prefix = KVCache(tuple(layers), prefix_valid).constrain()
    target = empty_target_cache(self.config, x.shape[0], x.dtype)
    return DecodeCache(prefix, target)

  def decode_step(
    self, cache: DecodeCache, token: jax.Array, position: jax.Array
  ) -> tuple[jax.Array, DecodeCache]:
    """One target position: token [B] int at target position `position` (int scalar, the
    same for all rows; 0 is the BOS slot) -> (logits [B, vocab] float32, the new cache).

    The logits are those `__call__` gives at that position when tgt_input holds the tokens
    fed so far. As there, a padding token (id 0) is fed but is no key for later positions.
    `position` must be < tgt_len (not checked: it may be traced).
    """
    c = self.config
    position = jnp.asarray(position, jnp.int32)
    x = self.embed_target(token[:, None], position[None])
    target_valid = jax.lax.dynamic_update_slice_in_dim(
      cache.target.valid, (token != PAD_ID)[:, None], position, axis=1
    )
    visible = target_valid & (jnp.arange(c.tgt_len) <= position)[None]
    shared = {
      "mode": StackMode("step"),
      "prefix_valid": cache.prefix.valid,
      "visible": visible,
      "position": position,
      "token_mask": (token != PAD_ID)[:, None],  # a MoE layer does not route a padding token
      **self._ofa_biases(cache.prefix.valid.shape[1], position[None], step=True),
    }
    caches = (cache.prefix.layers, cache.target.layers)
    x, layers = run_stack(self, c.target_stack, x, shared, caches)
    target = KVCache(tuple(layers), target_valid).constrain()
    return self.logits(x)[:, 0], DecodeCache(cache.prefix, target)


def dummy_batch(config: M6Config, batch_size: int = 1) -> dict[str, Any]:
  """A zero batch with the feature shapes the model reads (for init and eval_shape)."""
  shapes = features.feature_shapes(config.image_size, config.src_len, config.tgt_len)
  keys = features.PREFIX_FEATURES + ("tgt_input",)
  return {k: jnp.asarray(v) for k, v in features.zeros(shapes, batch_size, keys).items()}
