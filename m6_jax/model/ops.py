"""Numerical kernels with hand-written gradients, and the logical sharding constraint.

Each custom VJP says above it why it exists (the measurements are in docs/performance.md),
and each is tested against JAX's own derivative in tests/model/test_custom_vjp.py. `dense`
uses JAX's derivative on TPU and GPU. The Flax modules built on them are in
m6_jax/model/layers.py and m6_jax/model/moe.py.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# A large finite negative bias rather than -inf: a query row whose keys are all masked (a
# padded position) then gets a uniform softmax instead of NaNs that would poison the gradients.
MASK_BIAS = -1e9


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, names)


# Why a custom VJP: JAX's derivative of the normalisation is a long chain of element-wise ops
# that XLA:CPU fused into the transposing copies feeding the weight-gradient matmuls, where
# the row reductions run with strided reads (docs/performance.md, (5)). The closed form below,
# dx = (g - mean(g) - x_hat * mean(g * x_hat)) / std with g = dy * scale, is a few fusions.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, epsilon, x_dtype):
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


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


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
  probs = attention_probs(q, k, mask).astype(dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", dropout(probs), v)


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
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
  probs = checkpoint_name(attention_probs(q, k, mask), ATTENTION_PROBS)
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
def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., n_in] @ kernel [n_in, n_out]."""
  return jnp.dot(x, kernel)


def _dense_fwd(x, kernel):
  # The matmul itself, not a call of `dense`: a remat policy that saves matmul outputs
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


dense.defvjp(_dense_fwd, _dense_bwd)


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


def query_scaling(head_dim: int, scale_factor: float = 1.0) -> float:
  """What attention multiplies its queries by: (head_dim * scale_factor) ** -0.5 (OFA: 2)."""
  return float(head_dim * scale_factor) ** -0.5


def biased_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array,
  bias: jax.Array,
  dtype: Dtype,
  dropout: Any = None,
) -> jax.Array:
  """softmax(q k^T + bias, masked) v over head-major [b, h, L, kv]; bias [b or 1, h, q, k].

  The attention of OFA's position biases (m6_jax/model/ofa.py), differentiated by JAX."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None, :, :], logits + bias.astype(jnp.float32), MASK_BIAS)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def relative_bias(table: jax.Array, buckets: jax.Array, region: jax.Array) -> jax.Array:
  """A relative-position table [buckets, heads] at `buckets` [q, k] inside `region` [q, k],
  zero elsewhere -> [1, heads, q, k] (OFA's relative position biases)."""
  values = jnp.take(table, buckets, axis=0).transpose(2, 0, 1)
  return jnp.where(region[None], values, 0.0)[None]


# The feed-forward activations (model.activation): M6's tanh GELU, OFA's exact one, ReLU.
ACTIVATIONS = {
  "gelu_tanh": gelu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "relu": jax.nn.relu,
}
