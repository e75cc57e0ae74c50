"""Transformer building blocks: attention with a boolean mask, MLP, layer norm, block.

Every parameter is created with `nn.with_logical_partitioning` and the main activations are
constrained with `nn.with_logical_constraint`, so the mesh layout is decided by the config's
logical axis rules alone. Softmax and normalisation statistics run in float32 whatever the
compute dtype.

Incremental decoding: attention and the block run in one of three modes, all with the same
parameters. The default maps a whole sequence to a sequence; `return_kv=True` also returns
the layer's keys and values (to fill a prefix cache); `step=StepCache(...)` runs one new
target position against cached keys/values and returns the updated target cache.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# A large finite negative bias rather than -inf: a query row whose keys are all masked (a
# padded position) then gets a uniform softmax instead of NaNs that would poison the gradients.
MASK_BIAS = -1e9

default_kernel_init = nn.initializers.xavier_uniform()


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, names)


KV_AXES = ("batch", "length", "heads", "kv")
HEAD_MAJOR_AXES = ("batch", "heads", "length", "kv")


@struct.dataclass
class AttentionMask:
  """A boolean attention mask and the block structure the attention core may skip.

  `allowed` [b, q, k]: query q may attend key k. `prefix_len` (static) promises that the
  first `prefix_len` queries attend to none of the keys at or after `prefix_len`, as in the
  prefix-LM mask (m6.prefix_lm_mask); 0 promises nothing. The layers accept a plain boolean
  array wherever they accept this.
  """

  allowed: jax.Array
  prefix_len: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class LayerKV:
  """Keys and values of one attention layer, each [batch, length, heads, kv]."""

  key: jax.Array
  value: jax.Array

  def constrain(self) -> "LayerKV":
    return LayerKV(constrain(self.key, KV_AXES), constrain(self.value, KV_AXES))


@struct.dataclass
class StepCache:
  """What one attention layer reads and writes at one decoding step.

  The prefix may be shared by groups of consecutive rows of the query batch: with a prefix
  batch bp and a query batch B = g * bp, rows i*g .. i*g+g-1 all read prefix row i (the
  beams of one example in beam search), so the prefix is never copied per beam.
  """

  prefix: LayerKV  # [bp, S, heads, kv], read only
  prefix_valid: jax.Array  # [bp, S] bool: real prefix positions
  target: LayerKV  # [B, Lt, heads, kv]; the new key/value is written at `position`
  target_valid: jax.Array  # [B, Lt] bool: target keys the new query may see (itself included)
  position: jax.Array  # int32 scalar: the target position being decoded


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
    return _layer_norm(x, scale, bias, self.epsilon, x.dtype).astype(self.dtype)


# Why a custom VJP: JAX's derivative of the normalisation is a long chain of element-wise ops
# that XLA:CPU fused into the transposing copies feeding the weight-gradient matmuls, where
# the row reductions run with strided reads (9 ms per layer of the benchmark model for a
# 4 MB result). The closed form below, dx = (g - mean(g) - x_hat * mean(g * x_hat)) / std
# with g = dy * scale, is a few fusions; the medium benchmark step got 4-5% faster.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, epsilon, x_dtype):
  """float32 (x - mean) / std * scale + bias over the last axis."""
  return _layer_norm_fwd(x, scale, bias, epsilon, x_dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, x_dtype):
  x32 = x.astype(jnp.float32)
  centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + epsilon)
  normed = centered * inv_std
  return normed * scale + bias, (normed, inv_std, scale)


def _layer_norm_bwd(epsilon, x_dtype, residuals, d_y):
  normed, inv_std, scale = residuals
  d_y = d_y.astype(jnp.float32)
  g = d_y * scale
  d_x = inv_std * (
    g - jnp.mean(g, axis=-1, keepdims=True) - normed * jnp.mean(g * normed, axis=-1, keepdims=True)
  )
  rows = tuple(range(d_y.ndim - 1))
  return d_x.astype(x_dtype), jnp.sum(d_y * normed, axis=rows), jnp.sum(d_y, axis=rows)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class MultiHeadAttention(nn.Module):
  """Self-attention with an explicit boolean mask [batch, q, k], or one cached decoding step."""

  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | AttentionMask | None,
    deterministic: bool,
    *,
    return_kv: bool = False,
    step: StepCache | None = None,
  ) -> Any:
    """Full mode (`step` None): x [b, L, d], mask [b, L, L] or an AttentionMask -> out
    [b, L, d], plus this layer's LayerKV [b, L, heads, kv] when `return_kv`.

    Step mode: x [B, 1, d] is the new target position; `mask` is unused (the masks are in
    `step`). Returns (out [B, 1, d], the target LayerKV with the new key/value written).
    """
    d_model = x.shape[-1]
    # Full mode works head-major ([b, heads, L, kv]): every attention matmul then runs over
    # contiguous [L, kv] blocks per (batch, head), which on CPU measured 2-5x faster for the
    # score and mixing matmuls and their gradients than the [b, L, heads, kv] layout, whose
    # per-head slices are strided. Step mode and the KV cache stay [b, L, heads, kv].
    head_major = step is None
    layout = "bhlk" if head_major else "blhk"
    axes = HEAD_MAJOR_AXES if head_major else KV_AXES

    # Projections as explicit einsums over [embed, heads, kv] kernels: nn.DenseGeneral
    # initialises a flattened 2-D kernel, which cannot carry 3-D logical axis names.
    def proj(name, use_bias=True):
      kernel = self.param(
        name,
        nn.with_logical_partitioning(default_kernel_init, ("embed", "heads", "kv")),
        (d_model, self.num_heads, self.head_dim),
        jnp.float32,
      )
      y = jnp.einsum(f"bld,dhk->{layout}", x, kernel.astype(self.dtype))
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
    q, k, v = proj("query"), proj("key", use_bias=False), proj("value")

    q = q * jnp.asarray(self.head_dim**-0.5, self.dtype)
    if step is None:
      dropout = None
      if not deterministic and self.dropout_rate > 0:
        dropout = nn.Dropout(self.dropout_rate, deterministic=False)
      if not isinstance(mask, AttentionMask):
        mask = AttentionMask(mask)
      out = attention_core(q, k, v, mask.allowed, self.dtype, dropout, mask.prefix_len)
    else:
      target = _write_kv(step.target, k, v, step.position)
      out = _cached_attention(q, step, target, self.dtype)
    out = constrain(out, axes)
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


# Names of the attention residuals, for remat policies that keep them (m6.REMAT_POLICIES).
ATTENTION_PROBS = "attention_probs"
ATTENTION_OUT = "attention_out"


def attention_core(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array,
  dtype: Dtype,
  dropout: Any = None,
  prefix_len: int = 0,
) -> jax.Array:
  """softmax(q k^T masked) v over head-major [b, h, L, kv] blocks; mask [b, L, L] bool.

  `q` is already scaled. `dropout` (an nn.Dropout bound to the calling module, or None)
  drops attention probabilities; that path is differentiated by JAX. Without dropout the
  core has a hand-written backward pass (`_masked_attention`).

  `prefix_len` > 0 promises that queries before it attend to no key at or after it (see
  AttentionMask). The core then runs two attentions: the prefix queries against the prefix
  keys only, and the remaining queries against all keys. That skips the masked
  prefix-to-target block (23% of the scores at 160 prefix and 96 target positions), and
  the two halves are independent, so XLA can run them at the same time. A fully masked
  (padded) prefix query then averages the prefix values instead of all values; its output
  is never attended to or scored either way.
  """
  length = q.shape[2]
  if 0 < prefix_len < length:
    p = prefix_len
    prefix = attention_core(q[:, :, :p], k[:, :, :p], v[:, :, :p], mask[:, :p, :p], dtype, dropout)
    rest = attention_core(q[:, :, p:], k, v, mask[:, p:], dtype, dropout)
    return jnp.concatenate([prefix, rest], axis=2)
  if dropout is None:
    return _masked_attention(q, k, v, mask, dtype)
  probs = _attention_probs(q, k, mask).astype(dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", dropout(probs), v)


def _attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
  """float32 softmax of the masked logits, [b, h, q, k]."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None, :, :], logits, MASK_BIAS)
  return jax.nn.softmax(logits, axis=-1)


# Why a custom VJP: differentiating softmax(QK^T)V keeps the logits and the probabilities as
# separate [b, h, L, L] residuals and, under remat, recomputes the logits, the softmax and
# both matmuls in the backward pass. The backward below needs only the probabilities and the
# output: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q,
# the same identities flash attention uses. The residuals carry checkpoint names, so a remat
# policy can keep them (`dots_and_attention_saveable`) instead of recomputing the forward.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _masked_attention(q, k, v, mask, dtype):
  return _masked_attention_fwd(q, k, v, mask, dtype)[0]


def _masked_attention_fwd(q, k, v, mask, dtype):
  probs = checkpoint_name(_attention_probs(q, k, mask), ATTENTION_PROBS)
  out = checkpoint_name(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v), ATTENTION_OUT)
  return out, (q, k, v, mask, probs, out)


def _masked_attention_bwd(dtype, residuals, d_out):
  q, k, v, mask, probs, out = residuals
  d_v = jnp.einsum("bhqk,bhqd->bhkd", probs.astype(dtype), d_out)
  d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  # Masked logits were constants (MASK_BIAS): no gradient reaches q or k through them, also
  # in a fully masked (padded) query row, whose probabilities are uniform rather than zero.
  d_logits = jnp.where(mask[:, None, :, :], probs * (d_probs - row), 0.0).astype(dtype)
  d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k)
  d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q)
  return d_q, d_k, d_v, None


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)


def _write_kv(cache: LayerKV, k: jax.Array, v: jax.Array, position: jax.Array) -> LayerKV:
  """Writes the new key/value [B, 1, h, kv] at target `position` (a traced scalar is fine)."""
  position = jnp.asarray(position, jnp.int32)

  def write(buf, new):
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), position, axis=1)

  return LayerKV(write(cache.key, k), write(cache.value, v)).constrain()


def _cached_attention(q: jax.Array, step: StepCache, target: LayerKV, dtype: Dtype) -> jax.Array:
  """One query per row against [prefix ; target] keys; the same softmax as the full mode.

  q [B, 1, h, kv] (already scaled) -> [B, 1, h, kv]. The prefix logits are computed per
  group of rows sharing one prefix row (see StepCache), then joined to the target logits in
  the full mode's key order so that one softmax runs over all keys.
  """
  bq, _, h, d = q.shape
  bp, s = step.prefix_valid.shape
  if bq % bp:
    raise ValueError(f"query batch {bq} is not a multiple of the prefix cache batch {bp}")
  g = bq // bp
  qg = q.reshape(bp, g, h, d)
  prefix_logits = jnp.einsum("bghd,bkhd->bghk", qg, step.prefix.key).astype(jnp.float32)
  prefix_logits = jnp.where(step.prefix_valid[:, None, None, :], prefix_logits, MASK_BIAS)
  target_logits = jnp.einsum("bhd,bkhd->bhk", q[:, 0], target.key).astype(jnp.float32)
  target_logits = jnp.where(step.target_valid[:, None, :], target_logits, MASK_BIAS)
  logits = jnp.concatenate([prefix_logits.reshape(bq, h, s), target_logits], axis=-1)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  prefix_probs = probs[..., :s].reshape(bp, g, h, s)
  out = jnp.einsum("bghk,bkhd->bghd", prefix_probs, step.prefix.value).reshape(bq, h, d)
  out = out + jnp.einsum("bhk,bkhd->bhd", probs[..., s:], target.value)
  return out[:, None]


class Mlp(nn.Module):
  """Position-wise feed-forward: Dense -> GELU -> Dense."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    d_model = x.shape[-1]
    h = Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="wi")(x)
    h = constrain(gelu(h), ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    out = Dense(d_model, ("mlp", "embed"), self.dtype, name="wo")(h)
    return constrain(out, ("batch", "length", "embed"))


class Dense(nn.Module):
  """nn.Dense over the last axis (the same parameters, names and initialisers) whose kernel
  gradient runs as a row-major matmul on CPU (`_dense`)."""

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
    return _dense(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


# Why a custom VJP: JAX's derivative of x @ W computes the kernel gradient as x^T dY, a
# matmul contracting the token axis of both operands, and XLA:CPU picks the operand layouts
# for it. In the medium benchmark it chose forms that ran at 122 GFLOP/s ([512, 2048] kernel)
# and 150 GFLOP/s ([2048, 512]), against about 200 for the same matmul with its left operand
# transposed to [features, tokens] first. On CPU the backward below does that transpose
# itself, on the narrower operand (the cheaper copy), and fences it with optimization
# barriers so that XLA does not fold it back into the matmul. Other platforms get JAX's own
# derivative: an accelerator's compiler handles a contraction over any axis without a copy,
# and a fenced copy would only cost memory bandwidth there.
@jax.custom_vjp
def _dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., n_in] @ kernel [n_in, n_out]."""
  return jnp.dot(x, kernel)


def _dense_fwd(x, kernel):
  # The matmul itself, not a call of `_dense`: a remat policy that saves matmul outputs
  # (m6.REMAT_POLICIES) sees a dot here, but not inside a nested custom-VJP call.
  return jnp.dot(x, kernel), (x, kernel)


def _dense_bwd(residuals, d_y):
  x, kernel = residuals
  d_x = jax.lax.dot_general(d_y, kernel, (((d_y.ndim - 1,), (1,)), ((), ())))
  x2, d2 = x.reshape(-1, x.shape[-1]), d_y.reshape(-1, d_y.shape[-1])
  # Chosen when the step is lowered, for the platform it is lowered for (also ahead of time:
  # a TPU compile on a CPU host takes the default).
  d_kernel = jax.lax.platform_dependent(
    x2, d2, cpu=_kernel_grad_from_rows, default=_kernel_grad_over_tokens
  )
  return d_x, d_kernel


def _kernel_grad_over_tokens(x: jax.Array, d_y: jax.Array) -> jax.Array:
  """x^T d_y for x [tokens, n_in], d_y [tokens, n_out], as JAX differentiates x @ W."""
  return jax.lax.dot_general(x, d_y, (((0,), (0,)), ((), ())))


def _kernel_grad_from_rows(x: jax.Array, d_y: jax.Array) -> jax.Array:
  """x^T d_y as a row-major matmul whose left operand is the narrower of the two,
  transposed to [features, tokens]."""
  barrier = jax.lax.optimization_barrier
  rows_by_tokens = (((1,), (0,)), ((), ()))
  if x.shape[1] <= d_y.shape[1]:
    return jax.lax.dot_general(barrier(x.T), d_y, rows_by_tokens)
  # d_kernel^T = d_y^T x, then transpose the result (the size of a kernel)
  return barrier(jax.lax.dot_general(barrier(d_y.T), x, rows_by_tokens)).T


_dense.defvjp(_dense_fwd, _dense_bwd)


# Why a custom VJP: as with LayerNorm, XLA:CPU fused JAX's derivative of the tanh GELU (a
# chain through x**3 and tanh) into the transposing copy that feeds the first MLP matmul's
# weight gradient. With the closed-form derivative below the unrolled medium benchmark step
# went from 2.72 s to 2.31 s in a same-run A/B (the scanned one did not change); the forward
# pass is jax.nn.gelu itself.
@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """GELU, tanh approximation (flax's and jax.nn's default)."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, d_y):
  x32 = x.astype(jnp.float32)
  inner = jnp.sqrt(2 / jnp.pi).astype(jnp.float32)
  t = jnp.tanh(inner * (x32 + 0.044715 * x32**3))
  slope = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * inner * (1 + 3 * 0.044715 * x32 * x32)
  return ((d_y.astype(jnp.float32) * slope).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class TransformerBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)); x + MLP(LN(x)).

  With `moe` (a `moe.MoeOptions`) the feed-forward is a `moe.MoeMlp` (same name, "mlp"),
  which routes only the positions where `token_mask` is true.
  """

  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  moe: Any = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | AttentionMask | None,
    deterministic: bool,
    *,
    return_kv: bool = False,
    step: StepCache | None = None,
    token_mask: jax.Array | None = None,
  ) -> Any:
    """x -> x in full mode; (x, LayerKV) with `return_kv` or in step mode (see attention).

    `token_mask` [b, L] (real positions) is used by a MoE feed-forward only."""
    h = LayerNorm(self.layer_norm_epsilon, self.dtype, name="pre_attention_norm")(x)
    h = MultiHeadAttention(
      self.num_heads, self.head_dim, self.dropout_rate, self.dtype, name="attention"
    )(h, mask, deterministic, return_kv=return_kv, step=step)
    kv = None
    if return_kv or step is not None:
      h, kv = h
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = LayerNorm(self.layer_norm_epsilon, self.dtype, name="pre_mlp_norm")(x)
    if self.moe is None:
      h = Mlp(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(h, deterministic)
    else:
      from m6_jax.model import moe as moe_lib  # moe imports this module

      h = moe_lib.MoeMlp(
        **self.moe.kwargs(),
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name="mlp",
      )(h, deterministic, token_mask=token_mask)
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    x = constrain(x, ("batch", "length", "embed"))
    return x if kv is None else (x, kv)
