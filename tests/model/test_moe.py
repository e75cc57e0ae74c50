"""MoE feed-forward: routing, capacity and dropping, aux losses, and expert sharding.

The whole layer is checked against a plain numpy re-implementation (loops over tokens, a
counter per expert), so that routing, slot priority, dropping and combining are tested
against something written independently of the einsum formulation.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from m6_jax.model import moe
from m6_jax.model.layers import Mlp
from m6_jax.parallel.axes import default_logical_axis_rules

D, H = 16, 32  # embed, expert mlp
COLLECTIONS = [moe.AUX_LOSS_COLLECTION, moe.METRICS_COLLECTION]


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _init_jit(model, key, x, scale):
  params = nn.unbox(model.init(key, x, True)["params"])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  leaves = [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def _init(model, x, seed=0, scale=0.3):
  """Parameters with random (not zero) biases, so that dropped tokens really have to be 0."""
  return _init_jit(model, jax.random.PRNGKey(seed), x, scale)


@functools.partial(jax.jit, static_argnums=0)
def _apply_jit(model, params, x, token_mask):
  y, state = model.apply({"params": params}, x, True, token_mask, mutable=COLLECTIONS)
  return y, moe.moe_terms(state)


def _apply(model, params, x, token_mask=None):
  """Output and the MoE terms averaged over layers (jitted: one compile, not many eager ops)."""
  y, terms = _apply_jit(model, params, x, token_mask)
  return np.asarray(y), {k: float(v) for k, v in terms.items()}


def _x(batch, length, seed=0):
  return jax.random.normal(jax.random.PRNGKey(100 + seed), (batch, length, D))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _route_and_dispatch(logits, num_groups, top_k, capacity):
  routing = moe.route(logits, num_groups, top_k)
  e = logits.shape[-1]
  return routing, moe.dispatch_combine(routing.expert_index, routing.weights, e, capacity)


def reference_moe(params, x, num_groups, top_k, capacity, token_mask=None):
  """Loop-based MoE in float64: returns (output, dropped fraction)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  b, l, _ = x.shape
  e = p["router"]["kernel"].shape[1]
  n = e // num_groups
  mask = np.ones((b, l), bool) if token_mask is None else np.asarray(token_mask, bool)
  ex = p["experts"]
  out = np.zeros_like(x)
  routed = kept = 0
  for i in range(b):
    choices = []  # (priority, token, expert, weight)
    for s in range(l):
      if not mask[i, s]:
        continue
      logits = x[i, s] @ p["router"]["kernel"]
      for g in range(num_groups):
        z = logits[g * n : (g + 1) * n]
        prob = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        best = np.argsort(-prob, kind="stable")[:top_k]
        w = prob[best] / (prob[best].sum() if top_k > 1 else 1.0)
        for j in range(top_k):
          choices.append((j, s, g * n + best[j], w[j]))
    used = np.zeros(e, int)
    for _, s, ei, w in sorted(choices, key=lambda c: (c[0], c[1])):  # choice, then position
      routed += 1
      if used[ei] >= capacity:
        continue
      used[ei] += 1
      kept += 1
      h = _gelu(x[i, s] @ ex["wi_kernel"][ei] + ex["wi_bias"][ei])
      out[i, s] += w * (h @ ex["wo_kernel"][ei] + ex["wo_bias"][ei])
  return out, 1.0 - kept / max(routed, 1)


def test_capacity_formula():
  assert moe.expert_capacity(8, 4, 1, 1.0) == 2
  assert moe.expert_capacity(8, 4, 2, 1.25) == 5  # ceil(1.25 * 8 * 2 / 4)
  assert moe.expert_capacity(6, 64, 1, 1.25) == 1  # never below one slot
  assert moe.expert_capacity(8, 1, 1, 2.0) == 8  # never above the tokens of a row
  layer = moe.MoeMlp(
    num_experts=8, mlp_dim=H, num_groups=4, capacity_factor=1.0, eval_capacity_factor=2.0
  )
  assert layer.capacity(16, deterministic=False) == 8  # ceil(1.0 * 16 * 4 / 8)
  assert layer.capacity(16, deterministic=True) == 16
  with pytest.raises(ValueError, match="not divisible by num_groups"):
    moe.check_moe_shape(num_experts=6, num_groups=4, top_k=1)
  with pytest.raises(ValueError, match="exceeds"):
    moe.check_moe_shape(num_experts=4, num_groups=2, top_k=3)


def test_single_expert_equals_dense_mlp():
  x = _x(3, 7)
  mlp = Mlp(mlp_dim=H)
  dense = _init(mlp, x)
  layer = moe.MoeMlp(num_experts=1, mlp_dim=H, capacity_factor=1.0)
  params = _init(layer, x)
  params["experts"] = {
    "wi_kernel": dense["wi"]["kernel"][None],
    "wi_bias": dense["wi"]["bias"][None],
    "wo_kernel": dense["wo"]["kernel"][None],
    "wo_bias": dense["wo"]["bias"][None],
  }
  want = np.asarray(mlp.apply({"params": dense}, x, True))
  got, terms = _apply(layer, params, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert terms["dropped_fraction"] == 0.0
  assert terms["load_balance_loss"] == pytest.approx(1.0)


@pytest.mark.parametrize(
  "num_experts,num_groups,top_k,capacity_factor",
  [(4, 1, 2, 0.5), (8, 4, 1, 0.5), (8, 2, 2, 1.0)],  # top-1: the dropping test
)
def test_matches_loop_reference(num_experts, num_groups, top_k, capacity_factor):
  x = _x(3, 12)
  layer = moe.MoeMlp(num_experts, H, num_groups, top_k, capacity_factor)
  params = _init(layer, x)
  params["router"]["kernel"] = 0.5 * jax.random.normal(jax.random.PRNGKey(7), (D, num_experts))
  token_mask = jnp.ones((3, 12), bool).at[1, :5].set(False)
  capacity = layer.capacity(12, deterministic=True)
  want, want_dropped = reference_moe(params, x, num_groups, top_k, capacity, token_mask)
  got, terms = _apply(layer, params, x, token_mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert terms["dropped_fraction"] == pytest.approx(want_dropped, abs=1e-6)
  assert 0.0 < want_dropped < 1.0  # the small capacities really drop some assignments


def _one_expert_router(params, expert, strength=20.0):
  """A router that sends every token (whose feature 0 is 1) to `expert`."""
  kernel = np.zeros(params["router"]["kernel"].shape, np.float32)
  kernel[0, expert] = strength
  return dict(params, router={"kernel": jnp.asarray(kernel)})


def test_tokens_over_capacity_are_dropped_and_counted():
  b, l, e = 3, 8, 4
  x = _x(b, l).at[..., 0].set(1.0)
  layer = moe.MoeMlp(num_experts=e, mlp_dim=H, capacity_factor=1.0)
  capacity = layer.capacity(l, deterministic=True)
  assert capacity == 2  # ceil(1.0 * 8 * 1 / 4)
  params = _one_expert_router(_init(layer, x), expert=2)

  logits = jnp.einsum("bld,de->ble", x, params["router"]["kernel"])
  _, (dispatch, _, kept) = _route_and_dispatch(logits, 1, 1, capacity)
  tokens_per_expert = np.asarray(dispatch).sum(axis=(1, 3))  # [batch, expert]
  np.testing.assert_array_equal(tokens_per_expert, np.tile([0, 0, capacity, 0], (b, 1)))
  np.testing.assert_array_equal(np.asarray(kept)[..., 0], np.tile(np.arange(l) < capacity, (b, 1)))

  got, terms = _apply(layer, params, x)
  want, _ = reference_moe(params, x, 1, 1, capacity)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(got[:, :capacity]).min(axis=-1).max() > 0  # processed tokens are not 0
  np.testing.assert_array_equal(got[:, capacity:], 0.0)  # the dropped ones are exactly 0
  assert terms["dropped_fraction"] == pytest.approx((l - capacity) / l)

  # Padding takes no slot: with the first 3 tokens of row 0 masked, tokens 3 and 4 get them.
  token_mask = jnp.ones((b, l), bool).at[0, :3].set(False)
  got, terms = _apply(layer, params, x, token_mask)
  processed = np.abs(got).max(axis=-1) > 0
  np.testing.assert_array_equal(processed[0], np.isin(np.arange(l), [3, 4]))
  np.testing.assert_array_equal(processed[1:], np.tile(np.arange(l) < capacity, (b - 1, 1)))
  assert terms["dropped_fraction"] == pytest.approx(1 - b * capacity / (b * l - 3))


def test_load_balance_and_z_loss():
  b, l, e = 2, 16, 4
  x = _x(b, l).at[..., 0].set(1.0)
  layer = moe.MoeMlp(num_experts=e, mlp_dim=H)
  params = _init(layer, x)
  uniform = dict(params, router={"kernel": jnp.zeros((D, e))})
  _, terms = _apply(layer, uniform, x)
  assert terms["load_balance_loss"] == pytest.approx(1.0, abs=1e-6)
  assert terms["router_z_loss"] == pytest.approx(math.log(e) ** 2, abs=1e-5)
  _, skewed = _apply(layer, _one_expert_router(params, expert=1), x)
  assert skewed["load_balance_loss"] > 3.9  # -> num_experts when all go to one expert
  assert skewed["router_z_loss"] > 300  # logsumexp ~ 20

  # Per prototype: 1.0 for a uniform router, 4.0 (experts per group) for a collapsed one.
  probs = jnp.full((b, l, 2, 4), 0.25)
  index = jnp.zeros((b, l, 2), jnp.int32).at[..., 1].set(4)
  collapsed = jnp.zeros((b, l, 2, 4)).at[..., 0].set(1.0)
  losses = jax.jit(jax.vmap(moe.load_balance_loss, (0, None)))(jnp.stack([probs, collapsed]), index)
  np.testing.assert_allclose(np.asarray(losses), [1.0, 4.0], rtol=1e-6)
  # Top-2: assignments are counted once per choice and normalised by k, so uniform -> 1.0.
  top2 = jnp.zeros((b, l, 2), jnp.int32).at[..., 1].set(1)
  loss = jax.jit(moe.load_balance_loss)(jnp.full((b, l, 1, 4), 0.25), top2)
  assert float(loss) == pytest.approx(1.0)


def test_prototyping_routes_one_expert_per_group():
  b, l, e, g = 2, 10, 8, 4
  logits = 2.0 * jax.random.normal(jax.random.PRNGKey(3), (b, l, e))
  capacity = moe.expert_capacity(l, e, g, 4.0)
  routing, (dispatch, combine, kept) = _route_and_dispatch(logits, g, 1, capacity)
  assert bool(kept.all())
  per_group = np.asarray(dispatch).reshape(b, l, g, e // g, capacity).sum(axis=(3, 4))
  np.testing.assert_array_equal(per_group, 1.0)  # exactly one expert in every group
  grouped = np.asarray(logits).reshape(b, l, g, e // g)
  np.testing.assert_array_equal(
    np.asarray(routing.expert_index), grouped.argmax(-1) + np.arange(g) * (e // g)
  )
  # Combine weight: the chosen expert's softmax probability within its group.
  np.testing.assert_allclose(
    np.asarray(combine).reshape(b, l, g, -1).sum(-1),
    np.asarray(jax.nn.softmax(grouped, -1)).max(-1),
    atol=1e-6,
  )
  assert len(np.unique(np.asarray(routing.expert_index)[..., 0])) > 1  # routing does vary


def test_top2_picks_two_distinct_experts_with_weights_summing_to_one():
  b, l, e = 2, 10, 4
  logits = 2.0 * jax.random.normal(jax.random.PRNGKey(4), (b, l, e))
  capacity = moe.expert_capacity(l, e, 2, 2.0)
  routing, (dispatch, combine, _) = _route_and_dispatch(logits, 1, 2, capacity)
  index = np.asarray(routing.expert_index)
  assert (index[..., 0] != index[..., 1]).all()
  np.testing.assert_array_equal(index, np.argsort(-np.asarray(logits), axis=-1)[..., :2])
  np.testing.assert_array_equal(np.asarray(dispatch).sum(axis=(2, 3)), 2.0)
  assert np.asarray(dispatch).sum(axis=3).max() == 1.0  # never twice the same expert
  np.testing.assert_allclose(np.asarray(combine).sum(axis=(2, 3)), 1.0, atol=1e-6)


def test_gradients_reach_router_and_experts():
  x = _x(2, 8)
  layer = moe.MoeMlp(num_experts=4, mlp_dim=H, num_groups=2, capacity_factor=1.0)
  params = _init(layer, x)

  def loss(p):
    y, state = layer.apply({"params": p}, x, False, mutable=COLLECTIONS)
    terms = moe.moe_terms(state)
    return jnp.mean(y**2) + 0.01 * terms["load_balance_loss"] + 1e-3 * terms["router_z_loss"]

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


def test_bfloat16_compute_keeps_router_in_float32():
  x = _x(2, 8)
  f32 = moe.MoeMlp(num_experts=4, mlp_dim=H, top_k=2, capacity_factor=2.0)
  bf16 = moe.MoeMlp(num_experts=4, mlp_dim=H, top_k=2, capacity_factor=2.0, dtype=jnp.bfloat16)
  params = _init(f32, x)
  want, want_terms = _apply(f32, params, x)
  y, _ = _apply_jit(bf16, params, x, None)
  _, terms = _apply(bf16, params, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05, rtol=0.05)
  assert terms == want_terms  # routing and aux losses do not see the compute dtype


def test_moe_terms_average_over_layers():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = x + moe.MoeMlp(num_experts=4, mlp_dim=H, capacity_factor=0.5, name="a")(x, True)
      return moe.MoeMlp(num_experts=4, mlp_dim=H, name="b")(x, True)

  x = _x(2, 8)

  @jax.jit
  def run(key):
    variables = Two().init(key, x)
    _, state = Two().apply({"params": variables["params"]}, x, mutable=COLLECTIONS)
    return state, moe.moe_terms(state)

  state, terms = run(jax.random.PRNGKey(0))
  per_layer = [float(state[moe.AUX_LOSS_COLLECTION][n]["load_balance_loss"][0]) for n in "ab"]
  assert set(terms) == {"load_balance_loss", "router_z_loss", "dropped_fraction"}
  assert float(terms["load_balance_loss"]) == pytest.approx(np.mean(per_layer))
  assert moe.moe_terms({}) == {}


# (rules, batch size): the logical `experts` over the mesh axis `expert`; the tokens over
# `data` only, or over (`data`, `expert`) -- the expert-parallel layout where dispatch needs an
# all-to-all. There the 'experts' rule must come before 'batch' so that the expert buffers
# claim the mesh axis.
MESH_CASES = {
  "batch_over_data": (
    (("batch", "data"), ("experts", "expert"), ("embed", None), ("mlp", None)),
    4,
  ),
  "batch_over_data_and_expert": (
    (("experts", "expert"), ("batch", ("data", "expert")), ("batch", "data")),
    8,
  ),
}


@pytest.mark.parametrize("case", sorted(MESH_CASES))
def test_sharded_on_expert_mesh_matches_single_device(case):
  rules, b = MESH_CASES[case]
  l, e = 8, 8
  x = _x(b, l)
  layer = moe.MoeMlp(num_experts=e, mlp_dim=H, num_groups=2, capacity_factor=1.0)
  params = _init(layer, x)
  params["router"]["kernel"] = jax.random.normal(jax.random.PRNGKey(5), (D, e))
  want, want_terms = _apply(layer, params, x)
  assert want_terms["dropped_fraction"] > 0  # capacity binds, so dropping is compared too

  mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda k: layer.init(k, x, True), jax.random.PRNGKey(0))["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded = jax.jit(lambda p: p, out_shardings=shardings)(params)
    x_spec = nn.logical_to_mesh_axes(("batch", "length", "embed"), rules)
    x_sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, x_spec))
    apply = jax.jit(lambda p, x: layer.apply({"params": p}, x, True, mutable=COLLECTIONS))
    compiled = apply.lower(sharded, x_sharded).compile()
    got, state = compiled(sharded, x_sharded)
    terms = {k: float(v) for k, v in moe.moe_terms(state).items()}
  # Nothing is gathered (no replicated expert weights, tokens or router probabilities); when
  # the tokens are split over the expert axis too, they travel by all-to-all.
  hlo = compiled.as_text()
  assert "all-gather" not in hlo
  assert ("all-to-all" in hlo) == (case == "batch_over_data_and_expert")

  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  for name, value in want_terms.items():
    assert terms[name] == pytest.approx(value, abs=1e-5), name
  for name in ("wi_kernel", "wo_kernel", "wi_bias", "wo_bias"):
    p = sharded["experts"][name]
    assert p.sharding.spec[0] == "expert", name
    assert p.addressable_shards[0].data.shape[0] == e // 4, name


def test_sharded_init_places_experts_on_expert_axis():
  """With the default rules, a jitted init shards the experts over the `expert` mesh axis."""
  rules = default_logical_axis_rules()
  mesh = jax.make_mesh(
    (2, 1, 1, 4), ("data", "fsdp", "tensor", "expert"), axis_types=(AxisType.Auto,) * 4
  )
  layer = moe.MoeMlp(num_experts=8, mlp_dim=H)
  x = _x(4, 8)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda k: layer.init(k, x, True), jax.random.PRNGKey(0))["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = jax.jit(lambda k: nn.unbox(layer.init(k, x, True)["params"]), out_shardings=shardings)(
      jax.random.PRNGKey(0)
    )
  assert params["experts"]["wi_kernel"].sharding.spec == PartitionSpec("expert", "fsdp", "tensor")
  assert params["experts"]["wo_kernel"].sharding.spec == PartitionSpec("expert", "tensor", "fsdp")
  assert params["experts"]["wi_kernel"].addressable_shards[0].data.shape == (2, D, H)
  assert params["router"]["kernel"].sharding.spec == PartitionSpec("fsdp", None)
