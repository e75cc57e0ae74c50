"""Transformer building blocks: attention with a boolean mask, MLP, layer norm, block.

Every parameter is created with `nn.with_logical_partitioning` and the main activations are
constrained with `nn.with_logical_constraint`, so the mesh layout is decided by the config's
logical axis rules alone. Softmax and normalisation statistics run in float32 whatever the
compute dtype. The kernels with hand-written gradients (layer norm, the attention core, the
dense matmul, GELU) are in m6_jax/model/ops.py; the attention kernels a config may choose
(`model.attention_impl`: XLA, Pallas splash, cuDNN) in m6_jax/model/attention.py.

Incremental decoding: attention and the block run in one of three modes, all with the same
parameters. The default maps a whole sequence to a sequence; `return_kv=True` also returns
the layer's keys and values (to fill a prefix cache); `step=StepCache(...)` runs one new
target position against cached keys/values and returns the updated target cache.

Cross-attention (the decoder of the encoder-decoder architecture, m6_jax/model/m6.py) is
the same attention with its keys and values projected from another sequence, the encoder
output; a block built with `cross_attention=True` runs it between its self-attention and
its feed-forward (`CrossInput` says what it reads in each mode).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from m6_jax.model import moe as moe_lib
from m6_jax.model.attention import AttentionMask, attention
from m6_jax.model.ops import (
  ACTIVATIONS,
  MASK_BIAS,
  biased_attention,
  constrain,
  dense,
  layer_norm,
  query_scaling,
  relative_bias,
)

Dtype = Any

default_kernel_init = nn.initializers.xavier_uniform()


KV_AXES = ("batch", "length", "heads", "kv")
HEAD_MAJOR_AXES = ("batch", "heads", "length", "kv")


@struct.dataclass
class LayerKV:
  """Keys and values of one attention layer, each [batch, length, heads, kv]."""

  key: jax.Array
  value: jax.Array

  def constrain(self) -> "LayerKV":
    return LayerKV(constrain(self.key, KV_AXES), constrain(self.value, KV_AXES))


@struct.dataclass
class StepCache:
  """What one attention layer reads and writes at one decoding step: read-only `prefix`
  keys/values and the `target` keys/values, where the new position's key/value is written.

  The prefix may be shared by groups of consecutive rows of the query batch: with a prefix
  batch bp and a query batch B = g * bp, rows i*g .. i*g+g-1 all read prefix row i (the
  beams of one example in beam search), so the prefix is never copied per beam.

  Either part may be None: the unified model's self-attention reads both (one softmax over
  [prefix ; target]); an encoder-decoder's self-attention reads the target only and its
  cross-attention only the prefix, which then holds the encoder's keys/values.
  """

  prefix: LayerKV | None  # [bp, S, heads, kv], read only
  prefix_valid: jax.Array | None  # [bp, S] bool: real prefix positions
  target: LayerKV | None = None  # [B, Lt, heads, kv]; the new key/value is written at `position`
  target_valid: jax.Array | None = None  # [B, Lt] bool: keys the query may see (itself included)
  position: jax.Array | None = None  # int32 scalar: the target position being decoded


@struct.dataclass
class CrossInput:
  """What a cross-attention block reads from the encoder, by mode: the encoder output
  `encoded` [b, S, d] and `mask` [b, Lq, S] (full mode, and `encoded` alone to compute the
  decoding cache), or at a decoding step `step`, a StepCache whose prefix is this layer's
  cached encoder keys/values."""

  encoded: jax.Array | None = None
  mask: Any = None  # an AttentionMask (attention.AttentionMask.cross) or a boolean array
  step: StepCache | None = None
  bias: jax.Array | None = None  # [1, heads, Lq, S]: OFA's position bias (model/ofa.py)


class LayerNorm(nn.Module):
  """Pre-LN layer norm with a logically-annotated scale and bias, statistics in float32."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  axis: str = "embed"  # the logical name of the normalised axis

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
      (features,),
      jnp.float32,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, (self.axis,)),
      (features,),
      jnp.float32,
    )
    return layer_norm(x, scale, bias, self.epsilon, x.dtype).astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Self- or cross-attention with an explicit boolean mask [batch, q, k], or one cached
  decoding step."""

  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  scale_factor: float = 1.0  # queries times (head_dim * scale_factor) ** -0.5
  head_scale: bool = False  # a learned scale per head on the output (OFA's c_attn)
  attention_impl: str = "xla"  # model.attention_impl (m6_jax/model/attention.py)
  attention_interpret: bool = False  # model.attention_interpret: Pallas interpret mode

  @nn.compact
  def __call__(
    self,
    x: jax.Array | None,
    mask: jax.Array | AttentionMask | None,
    deterministic: bool,
    *,
    return_kv: bool = False,
    step: StepCache | None = None,
    context: jax.Array | None = None,
    bias: jax.Array | None = None,
  ) -> Any:
    """Full mode (`step` None): x [b, L, d], mask [b, L, L] or an AttentionMask -> out
    [b, L, d], plus this layer's LayerKV [b, L, heads, kv] when `return_kv`.

    Step mode: x [B, 1, d] is the new target position; `mask` is unused (the masks are in
    `step`). Returns (out [B, 1, d], the target LayerKV with the new key/value written, or
    None when `step` has no target part).

    Cross-attention: `context` [b, S, d] gives the keys and values and `mask` is [b, L, S];
    with `x` None only the LayerKV of `context` [b, S, heads, kv] is returned (the cache a
    decoding step reads as `step.prefix`). A query that may see no key at all (an example
    with neither image nor source text) mixes no values in a cross-attention (its output is
    the output bias) rather than an average of padding, which would depend on how much
    padding the batch has.

    `bias` [1, heads, q, k] (k: all cached keys in step mode) is added to the logits; that
    attention (OFA's) and step mode run in XLA whatever `attention_impl` says.
    """
    source = x if context is None else context
    d_model = source.shape[-1]
    # Full mode works head-major ([b, heads, L, kv]): every attention matmul then runs over
    # contiguous [L, kv] blocks per (batch, head), faster on CPU than the strided per-head
    # slices of [b, L, heads, kv] (docs/performance.md, (2)). Step mode and the KV cache stay
    # [b, L, heads, kv].
    head_major = step is None and x is not None
    layout = "bhlk" if head_major else "blhk"
    axes = HEAD_MAJOR_AXES if head_major else KV_AXES

    # Projections as explicit einsums over [embed, heads, kv] kernels: nn.DenseGeneral
    # initialises a flattened 2-D kernel, which cannot carry 3-D logical axis names.
    def proj(name, inputs, use_bias=True):
      kernel = self.param(
        name,
        nn.with_logical_partitioning(default_kernel_init, ("embed", "heads", "kv")),
        (d_model, self.num_heads, self.head_dim),
        jnp.float32,
      )
      y = jnp.einsum(f"bld,dhk->{layout}", inputs, kernel.astype(self.dtype))
      if use_bias:
        bias = self.param(
          name + "_bias",
          nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
          (self.num_heads, self.head_dim),
          jnp.float32,
        )
        y = y + (bias[:, None, :] if head_major else bias).astype(self.dtype)
      return constrain(y, axes)

    # No key bias: it adds the same q.b to every key's logit, which softmax cancels, so its
    # gradient is pure rounding noise that Adam would amplify into random updates.
    if x is not None:
      scaling = query_scaling(self.head_dim, self.scale_factor)
      q = proj("query", x) * jnp.asarray(scaling, self.dtype)
    if step is None or step.target is not None:  # a cross-attention step reads cached keys
      k, v = proj("key", source, use_bias=False), proj("value", source)
      if x is None:
        return LayerKV(k, v).constrain()
    target = None
    if step is None:
      dropout = None
      if not deterministic and self.dropout_rate > 0:
        dropout = nn.Dropout(self.dropout_rate, deterministic=False)
      if not isinstance(mask, AttentionMask):
        mask = AttentionMask(mask)
      if bias is None:
        impl, interpret = self.attention_impl, self.attention_interpret
        out = attention(q, k, v, mask, self.dtype, dropout, impl, interpret)
      else:
        out = biased_attention(q, k, v, mask.allowed, bias, self.dtype, dropout)
      if context is not None:
        out = out * jnp.any(mask.allowed, axis=-1)[:, None, :, None].astype(out.dtype)
    else:
      if step.target is not None:
        target = _write_kv(step.target, k, v, step.position)
      out = _cached_attention(q, step, target, self.dtype, bias)
    out = constrain(out, axes)
    if self.head_scale:
      scale = self.param(
        "head_scale",
        nn.with_logical_partitioning(nn.initializers.ones, ("heads",)),
        (self.num_heads,),
        jnp.float32,
      )
      out = out * (scale[:, None, None] if head_major else scale[:, None]).astype(out.dtype)
    out_kernel = self.param(
      "out",
      nn.with_logical_partitioning(default_kernel_init, ("heads", "kv", "embed")),
      (self.num_heads, self.head_dim, d_model),
      jnp.float32,
    )
    out_bias = self.param(
      "out_bias",
      nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      (d_model,),
      jnp.float32,
    )
    out = jnp.einsum(f"{layout},hkd->bld", out, out_kernel.astype(self.dtype))
    out = out + out_bias.astype(self.dtype)
    out = constrain(out, ("batch", "length", "embed"))
    if step is not None:
      return out, target
    if return_kv:  # the cache layout: [b, L, heads, kv]
      return out, LayerKV(k.swapaxes(1, 2), v.swapaxes(1, 2))
    return out


def _write_kv(cache: LayerKV, k: jax.Array, v: jax.Array, position: jax.Array) -> LayerKV:
  """Writes the new key/value [B, 1, h, kv] at target `position` (a traced scalar is fine)."""
  position = jnp.asarray(position, jnp.int32)

  def write(buf, new):
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), position, axis=1)

  return LayerKV(write(cache.key, k), write(cache.value, v)).constrain()


def _cached_attention(
  q: jax.Array, step: StepCache, target: LayerKV | None, dtype: Dtype, bias: Any = None
) -> jax.Array:
  """One query per row against [prefix ; target] keys; the same softmax as the full mode.

  q [B, 1, h, kv] (already scaled) -> [B, 1, h, kv]. The prefix logits are computed per
  group of rows sharing one prefix row (see StepCache), then joined to the target logits in
  the full mode's key order so that one softmax runs over all keys. Without a target part
  (cross-attention) a row whose prefix has no real position mixes no values, as in full mode.
  `bias` [1, h, 1, keys] is added to the logits of the one part present (the decoder's).
  """
  bias = None if bias is None else bias[:, :, 0, :].astype(jnp.float32)  # [1, h, keys]
  bq, _, h, d = q.shape
  logits = []
  if step.prefix is not None:
    bp, s = step.prefix_valid.shape
    if bq % bp:
      raise ValueError(f"query batch {bq} is not a multiple of the prefix cache batch {bp}")
    g = bq // bp
    qg = q.reshape(bp, g, h, d)
    prefix_logits = jnp.einsum("bghd,bkhd->bghk", qg, step.prefix.key).astype(jnp.float32)
    if bias is not None:
      prefix_logits = prefix_logits + bias[:, None]
    prefix_logits = jnp.where(step.prefix_valid[:, None, None, :], prefix_logits, MASK_BIAS)
    logits.append(prefix_logits.reshape(bq, h, s))
  if target is not None:
    target_logits = jnp.einsum("bhd,bkhd->bhk", q[:, 0], target.key).astype(jnp.float32)
    if bias is not None:
      target_logits = target_logits + bias
    logits.append(jnp.where(step.target_valid[:, None, :], target_logits, MASK_BIAS))
  probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1).astype(dtype)
  out = jnp.zeros((bq, h, d), dtype)
  if step.prefix is not None:
    prefix_probs = probs[..., :s].reshape(bp, g, h, s)
    out = jnp.einsum("bghk,bkhd->bghd", prefix_probs, step.prefix.value).reshape(bq, h, d)
    if target is None:
      seen = jnp.repeat(jnp.any(step.prefix_valid, axis=-1), g)
      out = out * seen[:, None, None].astype(out.dtype)
  if target is not None:
    offset = 0 if step.prefix is None else s
    out = out + jnp.einsum("bhk,bkhd->bhd", probs[..., offset:], target.value)
  return out[:, None]


class Mlp(nn.Module):
  """Position-wise feed-forward: Dense -> GELU -> Dense (`activation`; with `normformer` a
  layer norm after the activation)."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu_tanh"
  normformer: bool = False
  layer_norm_epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    d_model = x.shape[-1]
    h = Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="wi")(x)
    h = constrain(ACTIVATIONS[self.activation](h), ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    if self.normformer:
      h = LayerNorm(self.layer_norm_epsilon, self.dtype, "mlp", name="mid_norm")(h)
    out = Dense(d_model, ("mlp", "embed"), self.dtype, name="wo")(h)
    return constrain(out, ("batch", "length", "embed"))


class Dense(nn.Module):
  """nn.Dense over the last axis (the same parameters, names and initialisers) whose kernel
  gradient runs as a row-major matmul on CPU (`ops.dense`)."""

  features: int
  kernel_axes: tuple[str, str]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(default_kernel_init, self.kernel_axes),
      (x.shape[-1], self.features),
      jnp.float32,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[1:]),
      (self.features,),
      jnp.float32,
    )
    return dense(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class TransformerBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)); [x + CrossAttn(LN(x), encoded);] x + MLP(LN(x)).

  With `cross_attention` (a decoder block of the encoder-decoder architecture) the
  cross-attention sub-layer reads the encoder through `cross` (a CrossInput). With `moe` (a
  `moe.MoeOptions`) the feed-forward is a `moe.MoeMlp` (same name, "mlp"), which routes only
  the positions where `token_mask` is true.

  `ofa` (an OfaOptions, m6_jax/model/ofa_options.py) switches on OFA's variants: post-norm
  (x = LN(x + Attn(x)), the same norms), NormFormer's norms after each attention, per-head
  output scales, the query scale factor, the activation; `relative` (token buckets, image
  buckets) sizes this layer's relative position tables (0: none), looked up at the buckets
  of `position_bias` (an ofa.PositionBias) and added to its absolute bias.
  """

  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  moe: Any = None
  cross_attention: bool = False
  ofa: Any = None
  relative: tuple[int, int] = (0, 0)
  attention_impl: str = "xla"  # model.attention_impl (m6_jax/model/attention.py)
  attention_interpret: bool = False
  attention_dropout_rate: float | None = None  # None: dropout_rate

  @nn.compact
  def __call__(
    self,
    x: jax.Array | None,
    mask: jax.Array | AttentionMask | None,
    deterministic: bool,
    *,
    return_kv: bool = False,
    step: StepCache | None = None,
    token_mask: jax.Array | None = None,
    cross: CrossInput | None = None,
    position_bias: Any = None,
  ) -> Any:
    """x -> x in full mode; (x, LayerKV) with `return_kv` or in step mode (see attention).

    `token_mask` [b, L] (real positions) is used by a MoE feed-forward only. With `x` None
    (cross-attention blocks only) nothing runs but the cross-attention's key and value
    projections of `cross.encoded`: returns that LayerKV, the decoding cache of this block."""
    if x is None:
      return self._cross_attention()(None, None, True, context=cross.encoded)
    pre = self.ofa is None or self.ofa.normalize_before
    normformer = self.ofa is not None and self.ofa.normformer

    def sublayer(x, name, run):
      """x + run(LN(x)) (pre-norm) or LN(x + run(x)) (post-norm), NormFormer's mid norm."""
      norm = LayerNorm(self.layer_norm_epsilon, self.dtype, name=f"pre_{name}_norm")
      h, extra = run(norm(x) if pre else x)
      if normformer and name != "mlp":
        h = LayerNorm(self.layer_norm_epsilon, self.dtype, name=f"{name}_mid_norm")(h)
      x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
      return (x if pre else norm(x)), extra

    def attention(h):
      out = self._attention("attention")(
        h, mask, deterministic, return_kv=return_kv, step=step, bias=self._self_bias(position_bias)
      )
      return out if (return_kv or step is not None) else (out, None)

    x, kv = sublayer(x, "attention", attention)
    if self.cross_attention:

      def cross_attention(h):
        if cross.step is None:
          out = self._cross_attention()(
            h, cross.mask, deterministic, context=cross.encoded, bias=cross.bias
          )
        else:
          out, _ = self._cross_attention()(h, None, True, step=cross.step, bias=cross.bias)
        return out, None

      x, _ = sublayer(x, "cross_attention", cross_attention)
    x, _ = sublayer(x, "mlp", lambda h: (self._mlp(h, deterministic, token_mask), None))
    x = constrain(x, ("batch", "length", "embed"))
    return x if kv is None else (x, kv)

  def _mlp(self, h: jax.Array, deterministic: bool, token_mask: Any) -> jax.Array:
    if self.moe is not None:
      return moe_lib.MoeMlp(
        **self.moe.kwargs(),
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name="mlp",
      )(h, deterministic, token_mask=token_mask)
    options = {}
    if self.ofa is not None:
      options = {"activation": self.ofa.activation, "normformer": self.ofa.normformer}
    return Mlp(
      self.mlp_dim,
      self.dropout_rate,
      self.dtype,
      layer_norm_epsilon=self.layer_norm_epsilon,
      name="mlp",
      **options,
    )(h, deterministic)

  def _self_bias(self, position_bias: Any) -> jax.Array | None:
    """This layer's self-attention bias: the absolute one plus its relative tables."""
    if position_bias is None:
      return None
    bias = position_bias.absolute
    for name, size, buckets, region in (
      ("token", self.relative[0], position_bias.token_buckets, position_bias.token_region),
      ("image", self.relative[1], position_bias.image_buckets, position_bias.image_region),
    ):
      if size and buckets is not None:
        table = self.param(
          f"{name}_position_bias",
          nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads")),
          (size, self.num_heads),
          jnp.float32,
        )
        bias = bias + relative_bias(table, buckets, region)
    return bias

  def _attention(self, name: str) -> MultiHeadAttention:
    options = {}
    if self.ofa is not None:
      options = {"scale_factor": self.ofa.attn_scale_factor, "head_scale": self.ofa.head_scale}
    rate = self.attention_dropout_rate
    return MultiHeadAttention(
      self.num_heads,
      self.head_dim,
      self.dropout_rate if rate is None else rate,
      self.dtype,
      attention_impl=self.attention_impl,
      attention_interpret=self.attention_interpret,
      name=name,
      **options,
    )

  def _cross_attention(self) -> MultiHeadAttention:
    if not self.cross_attention:
      raise ValueError("this block has no cross-attention (built with cross_attention=False)")
    return self._attention("cross_attention")
