"""Transformer building blocks: attention with a boolean mask, MLP, layer norm, block.

Every parameter is created with `nn.with_logical_partitioning` and the main activations are
constrained with `nn.with_logical_constraint`, so the mesh layout is decided by the config's
logical axis rules alone. Softmax and normalisation statistics run in float32 whatever the
compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# A large finite negative bias rather than -inf: a query row whose keys are all masked (a
# padded position) then gets a uniform softmax instead of NaNs that would poison the gradients.
MASK_BIAS = -1e9

default_kernel_init = nn.initializers.xavier_uniform()


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, names)


class LayerNorm(nn.Module):
  """Pre-LN layer norm with a logically-annotated scale and bias, statistics in float32."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      (features,),
      jnp.float32,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      (features,),
      jnp.float32,
    )
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Self-attention over one sequence with an explicit boolean mask [batch, q, k]."""

  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    d_model = x.shape[-1]

    # Projections as explicit einsums over [embed, heads, kv] kernels: nn.DenseGeneral
    # initialises a flattened 2-D kernel, which cannot carry 3-D logical axis names.
    def proj(name, use_bias=True):
      kernel = self.param(
        name,
        nn.with_logical_partitioning(default_kernel_init, ("embed", "heads", "kv")),
        (d_model, self.num_heads, self.head_dim),
        jnp.float32,
      )
      y = jnp.einsum("bld,dhk->blhk", x, kernel.astype(self.dtype))
      if use_bias:
        bias = self.param(
          name + "_bias",
          nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
          (self.num_heads, self.head_dim),
          jnp.float32,
        )
        y = y + bias.astype(self.dtype)
      return y

    # No key bias: it adds the same q.b to every key's logit, which softmax cancels, so its
    # gradient is pure rounding noise that Adam would amplify into random updates.
    q, k, v = proj("query"), proj("key", use_bias=False), proj("value")
    q = constrain(q, ("batch", "length", "heads", "kv"))
    k = constrain(k, ("batch", "length", "heads", "kv"))
    v = constrain(v, ("batch", "length", "heads", "kv"))

    q = q * jnp.asarray(self.head_dim**-0.5, self.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    logits = jnp.where(mask[:, None, :, :], logits, MASK_BIAS)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    if not deterministic and self.dropout_rate > 0:
      probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    out = constrain(out, ("batch", "length", "heads", "kv"))
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
    out = jnp.einsum("blhk,hkd->bld", out, out_kernel.astype(self.dtype))
    out = out + out_bias.astype(self.dtype)
    return constrain(out, ("batch", "length", "embed"))


class Mlp(nn.Module):
  """Position-wise feed-forward: Dense -> GELU -> Dense."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    d_model = x.shape[-1]
    h = nn.Dense(
      self.mlp_dim,
      dtype=self.dtype,
      name="wi",
      kernel_init=nn.with_logical_partitioning(default_kernel_init, ("embed", "mlp")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
    )(x)
    h = constrain(nn.gelu(h), ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    out = nn.Dense(
      d_model,
      dtype=self.dtype,
      name="wo",
      kernel_init=nn.with_logical_partitioning(default_kernel_init, ("mlp", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(h)
    return constrain(out, ("batch", "length", "embed"))


class TransformerBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)); x + MLP(LN(x))."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    h = LayerNorm(self.layer_norm_epsilon, self.dtype, name="pre_attention_norm")(x)
    h = MultiHeadAttention(
      self.num_heads, self.head_dim, self.dropout_rate, self.dtype, name="attention"
    )(h, mask, deterministic)
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = LayerNorm(self.layer_norm_epsilon, self.dtype, name="pre_mlp_norm")(x)
    h = Mlp(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(h, deterministic)
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return constrain(x, ("batch", "length", "embed"))
