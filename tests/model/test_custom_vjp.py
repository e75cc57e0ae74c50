"""Hand-written backward passes (attention core, dense, LayerNorm, GELU) give JAX's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6_jax.model import layers, ops


def _reference(q, k, v, mask, dtype):
  """softmax(q k^T masked) v, differentiated by JAX."""
  probs = ops.attention_probs(q, k, mask).astype(dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 6e-2)])
def test_custom_vjp_matches_autodiff(dtype, tol):
  # bfloat16: the hand-written backward accumulates dP in float32 where JAX rounds it to
  # bfloat16 first, so the two differ by a few bfloat16 ulps.
  rng = np.random.default_rng(0)
  b, h, length, d = 2, 3, 12, 8
  q, k, v, d_out = (jnp.asarray(rng.standard_normal((b, h, length, d)), dtype) for _ in range(4))
  mask = jnp.asarray(rng.random((b, length, length)) > 0.3)
  mask = mask.at[0, 5].set(False)  # a fully masked (padded) query row
  mask = mask.at[1, :, 7].set(False)  # a key no query may see

  out, vjp = jax.vjp(lambda *a: ops.attention_core(*a, mask, dtype), q, k, v)
  ref_out, ref_vjp = jax.vjp(lambda *a: _reference(*a, mask, dtype), q, k, v)

  assert out.dtype == dtype
  np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=tol, rtol=tol)
  for name, got, want in zip("qkv", vjp(d_out), ref_vjp(d_out)):
    assert got.dtype == dtype, name
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol, rtol=tol, err_msg=name)
  d_q, d_k, _ = vjp(d_out)
  assert not np.any(np.float32(d_q[0, :, 5])), "a fully masked query row must get no gradient"
  assert not np.any(np.float32(d_k[1, :, 7])), "a key no query sees must get no gradient"


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_prefix_split_matches_the_dense_core(dtype, tol):
  """With `prefix_len` the core skips the prefix-to-target block of a prefix-LM mask: the
  outputs and gradients of every real query are those of the dense core, and the score
  matmuls are [prefix x prefix] and [target x all] instead of [all x all]."""
  from m6_jax.model.attention import prefix_lm_mask

  rng = np.random.default_rng(4)
  b, h, p, t, d = 2, 3, 7, 5, 8
  q, k, v, d_out = (jnp.asarray(rng.standard_normal((b, h, p + t, d)), dtype) for _ in range(4))
  prefix_valid = jnp.asarray([[1] * 5 + [0] * 2, [1] * 7], bool)
  target_valid = jnp.asarray([[1] * 5, [1] * 3 + [0] * 2], bool)
  mask = prefix_lm_mask(prefix_valid, target_valid)
  real = jnp.concatenate([prefix_valid, target_valid], axis=1)[:, None, :, None]
  d_out = jnp.where(real, d_out, 0)  # padded positions get no gradient in the model

  def core(prefix_len):
    return jax.vjp(lambda *a: ops.attention_core(*a, mask, dtype, None, prefix_len), q, k, v)

  (out, vjp), (dense_out, dense_vjp) = core(p), core(0)
  assert out.shape == dense_out.shape and out.dtype == dtype
  np.testing.assert_allclose(
    np.float32(jnp.where(real, out, 0)), np.float32(jnp.where(real, dense_out, 0)), atol=tol
  )
  for name, got, want in zip("qkv", vjp(d_out), dense_vjp(d_out)):
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol, err_msg=name)

  jaxpr = str(jax.make_jaxpr(lambda *a: ops.attention_core(*a, mask, dtype, None, p))(q, k, v))
  jaxpr = jaxpr.replace(" ", "")
  assert f"[{b},{h},{p},{p}]" in jaxpr and f"[{b},{h},{t},{p + t}]" in jaxpr
  assert f"[{b},{h},{p + t},{p + t}]" not in jaxpr


def test_saveable_policy_keeps_the_attention_residuals():
  """Under the `dots_and_attention_saveable` remat policy the backward pass does not redo the
  forward attention matmuls: 2 forward + 4 backward batched matmuls, against 2 more (the
  recomputed forward) under `dots_with_no_batch_dims_saveable`."""
  from m6_jax.model.m6 import REMAT_POLICIES

  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 6, 4)), jnp.float32) for _ in range(3))
  mask = jnp.ones((1, 6, 6), bool)

  def batched_matmuls(policy):
    f = jax.checkpoint(
      lambda q, k, v: jnp.sum(ops.attention_core(q, k, v, mask, jnp.float32) ** 2),
      policy=REMAT_POLICIES[policy],
    )
    return str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)).count("dot_general")

  assert batched_matmuls("dots_and_attention_saveable") == 6
  assert batched_matmuls("dots_with_no_batch_dims_saveable") == 8


@pytest.mark.parametrize("n_in, n_out", [(8, 24), (24, 8)])  # both kernel-gradient branches
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_dense_vjp_matches_autodiff(n_in, n_out, dtype, tol):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((3, 7, n_in)), dtype)
  kernel = jnp.asarray(rng.standard_normal((n_in, n_out)), dtype)
  d_y = jnp.asarray(rng.standard_normal((3, 7, n_out)), dtype)
  y, vjp = jax.vjp(ops.dense, x, kernel)
  ref_y, ref_vjp = jax.vjp(jnp.dot, x, kernel)
  np.testing.assert_array_equal(np.float32(y), np.float32(ref_y))
  for name, got, want in zip(("x", "kernel"), vjp(d_y), ref_vjp(d_y)):
    assert got.shape == want.shape and got.dtype == dtype, name
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol, rtol=tol, err_msg=name)


def test_dense_kernel_gradient_form_is_chosen_per_platform():
  """The fenced transpose is for XLA:CPU only; a TPU lowering (also ahead of time, on this
  CPU) gets JAX's own derivative."""
  x, kernel = jnp.ones((6, 4), jnp.float32), jnp.ones((4, 12), jnp.float32)
  grad = jax.jit(jax.grad(lambda w, x: jnp.sum(ops.dense(x, w) ** 2)))
  traced = grad.trace(kernel, x)
  assert "optimization_barrier" in traced.lower(lowering_platforms=("cpu",)).as_text()
  assert "optimization_barrier" not in traced.lower(lowering_platforms=("tpu",)).as_text()


def test_dense_module_has_flax_dense_parameters():
  """layers.Dense creates nn.Dense's parameters (names, shapes, initial values), so older
  checkpoints restore into it, and computes the same function."""
  import flax.linen as nn

  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 5, 8)), jnp.float32)
  ours = layers.Dense(16, ("embed", "mlp"))
  flax_dense = nn.Dense(16, kernel_init=layers.default_kernel_init)
  params = ours.init(jax.random.PRNGKey(0), x)
  flax_params = flax_dense.init(jax.random.PRNGKey(0), x)
  unboxed = nn.unbox(params)
  assert jax.tree.structure(unboxed) == jax.tree.structure(flax_params)
  for got, want in zip(jax.tree.leaves(unboxed), jax.tree.leaves(flax_params)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(
    ours.apply(params, x), flax_dense.apply(flax_params, x), atol=1e-6, rtol=1e-6
  )


def test_dense_forward_matmul_is_saved_by_the_dots_policies():
  """Under a remat policy that saves matmul outputs the backward pass must not redo the two
  dense matmuls: as many matmuls as without remat, against 2 more when nothing is saved."""
  from m6_jax.model.m6 import REMAT_POLICIES

  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
  w1, w2 = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((8, 16), (16, 8)))

  def f(w1, w2):
    return jnp.sum(ops.dense(ops.gelu(ops.dense(x, w1) + 1.0), w2) ** 2)

  def matmuls(policy):
    fn = f if policy is None else jax.checkpoint(f, policy=REMAT_POLICIES[policy])
    return str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(w1, w2)).count("dot_general")

  without_remat = matmuls(None)
  for policy in (
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "dots_and_attention_saveable",
  ):
    assert matmuls(policy) == without_remat, policy
  assert matmuls("full") == without_remat + 2


@pytest.mark.parametrize(
  "x_dtype, out_dtype, tol", [(jnp.float32, jnp.float32, 1e-5), (jnp.bfloat16, jnp.bfloat16, 2e-2)]
)
def test_layer_norm_vjp_matches_autodiff(x_dtype, out_dtype, tol):
  """LayerNorm's hand-written backward pass gives JAX's gradients of the textbook formula."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 5, 16)) * 3 + 1, x_dtype)
  d_y = jnp.asarray(rng.standard_normal((3, 5, 16)), out_dtype)
  norm = layers.LayerNorm(dtype=out_dtype)
  params = norm.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)

  def textbook(params, x):
    p = params["params"]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"].value + p["bias"].value
    return y.astype(out_dtype)

  y, vjp = jax.vjp(norm.apply, params, x)
  ref_y, ref_vjp = jax.vjp(textbook, params, x)
  np.testing.assert_allclose(np.float32(y), np.float32(ref_y), atol=tol, rtol=tol)
  got, want = vjp(d_y), ref_vjp(d_y)
  assert got[1].dtype == x_dtype
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.float32(g), np.float32(w), atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_gelu_vjp_matches_autodiff(dtype, tol):
  x = jnp.asarray(np.linspace(-6, 6, 97), dtype)
  d_y = jnp.asarray(np.random.default_rng(3).standard_normal(97), dtype)
  y, vjp = jax.vjp(ops.gelu, x)
  ref_y, ref_vjp = jax.vjp(lambda x: jax.nn.gelu(x, approximate=True), x)
  np.testing.assert_array_equal(np.float32(y), np.float32(ref_y))  # the forward is jax.nn.gelu
  (got,), (want,) = vjp(d_y), ref_vjp(d_y)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol, rtol=tol)
