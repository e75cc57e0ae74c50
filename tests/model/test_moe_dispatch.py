"""Sorted MoE dispatch against the GShard einsum dispatch: same slots, dropped tokens,
outputs, aux losses and gradients, on one device and on a mesh with an expert axis."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from m6_jax import config as config_lib
from m6_jax.model import moe, moe_dispatch

D, H = 16, 32
COLLECTIONS = [moe.AUX_LOSS_COLLECTION, moe.METRICS_COLLECTION]


def _layers(num_experts, num_groups, top_k, capacity_factor):
  kwargs = dict(
    num_experts=num_experts,
    mlp_dim=H,
    num_groups=num_groups,
    top_k=top_k,
    capacity_factor=capacity_factor,
  )
  return moe.MoeMlp(**kwargs), moe.MoeMlp(**kwargs, dispatch="sorted")


def _params(layer, x, num_experts):
  params = nn.unbox(jax.jit(lambda k: layer.init(k, x, True)["params"])(jax.random.PRNGKey(0)))
  # Random biases (an empty slot's expert output is then not 0 and must not leak) and a
  # router strong enough to make the experts' loads uneven.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  params = jax.tree.unflatten(tree, leaves)
  params["router"]["kernel"] = jax.random.normal(jax.random.PRNGKey(7), (D, num_experts))
  return params


def _loss_fn(layer, token_mask):
  """(objective, (output, MoE terms)) with the aux losses in the objective, so that their
  gradients are compared too. Not deterministic: the training capacity is used."""

  def loss(params, x):
    y, state = layer.apply({"params": params}, x, False, token_mask, mutable=COLLECTIONS)
    terms = moe.moe_terms(state)
    objective = jnp.sum(jnp.sin(y)) + terms["load_balance_loss"] + terms["router_z_loss"]
    return objective, (y, terms)

  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _assert_same(want, got):
  (_, (y_want, t_want)), g_want = want
  (_, (y_got, t_got)), g_got = got
  np.testing.assert_allclose(np.asarray(y_got), np.asarray(y_want), atol=2e-5, rtol=0)
  for name, value in t_want.items():
    assert float(t_got[name]) == pytest.approx(float(value), abs=1e-5), name
  for path, a, b in zip(
    jax.tree_util.tree_leaves_with_path(g_want), jax.tree.leaves(g_want), jax.tree.leaves(g_got)
  ):
    np.testing.assert_allclose(
      np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4, err_msg=jax.tree_util.keystr(path[0])
    )


@pytest.mark.parametrize(
  "num_experts,num_groups,top_k,capacity_factor",
  [(4, 1, 2, 0.5), (8, 4, 1, 0.5), (8, 2, 2, 1.0)],  # GShard top-2, M6-T k top-1, both
)
def test_sorted_equals_einsum_with_dropped_and_padded_tokens(
  num_experts, num_groups, top_k, capacity_factor
):
  b, l = 3, 12
  x = jax.random.normal(jax.random.PRNGKey(100), (b, l, D))
  token_mask = jnp.ones((b, l), bool).at[1, :5].set(False)
  einsum, sorted_ = _layers(num_experts, num_groups, top_k, capacity_factor)
  params = _params(einsum, x, num_experts)

  @jax.jit
  def both(params, x):
    return _loss_fn(einsum, token_mask)(params, x), _loss_fn(sorted_, token_mask)(params, x)

  want, got = both(params, x)
  assert 0.0 < float(want[0][1][1]["dropped_fraction"]) < 1.0  # capacity binds
  _assert_same(want, got)


def test_sorted_slots_fill_the_einsum_dispatch():
  """Slot by slot: the token sorted_slots puts in (row, expert, slot) is the one the one-hot
  dispatch tensor marks, and empty slots are empty in both."""
  b, l, e, capacity = 2, 10, 4, 3
  index = jax.random.randint(jax.random.PRNGKey(3), (b, l, 1), 0, e)
  second = (index + jax.random.randint(jax.random.PRNGKey(4), (b, l, 1), 1, e)) % e
  index = jnp.concatenate([index, second], axis=-1)  # two distinct experts per token
  token_mask = jnp.ones((b, l), bool).at[0, 2:4].set(False)
  weights = jnp.ones((b, l, 2))
  dispatch, _, kept_einsum = moe.dispatch_combine(index, weights, e, capacity, token_mask)
  position, kept, slot_token = moe_dispatch.sorted_slots(index, e, capacity, token_mask)
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(kept_einsum))
  assert 0 < np.asarray(kept).sum() < 2 * np.asarray(token_mask).sum()  # some dropped
  marked = np.asarray(dispatch).transpose(0, 3, 2, 1)  # [b, c, e, l]
  want = np.where(marked.any(-1), marked.argmax(-1), l)
  np.testing.assert_array_equal(np.asarray(slot_token), want)
  np.testing.assert_array_equal(np.asarray(position)[np.asarray(kept)].max(), capacity - 1)


# Tokens over (data, expert), experts over expert: dispatch needs an all-to-all.
RULES = (("experts", "expert"), ("batch", ("data", "expert")), ("batch", "data"))


def test_sorted_on_expert_mesh_equals_einsum_on_one_device():
  b, l, e = 8, 8, 8
  x = jax.random.normal(jax.random.PRNGKey(101), (b, l, D))
  token_mask = jnp.ones((b, l), bool).at[2, 5:].set(False)
  einsum, sorted_ = _layers(e, 2, 1, 1.0)
  params = _params(einsum, x, e)
  want = jax.jit(_loss_fn(einsum, token_mask))(params, x)
  assert float(want[0][1][1]["dropped_fraction"]) > 0

  mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    boxed = jax.eval_shape(lambda k: sorted_.init(k, x, True), jax.random.PRNGKey(0))["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
    sharded = jax.jit(lambda p: p, out_shardings=shardings)(params)
    rows = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), RULES))
    x_sharded = jax.device_put(x, NamedSharding(mesh, rows.spec + (None,)))
    step = jax.jit(_loss_fn(sorted_, jax.device_put(token_mask, rows)))
    compiled = step.lower(sharded, x_sharded).compile()
    got = compiled(sharded, x_sharded)
  hlo = compiled.as_text()
  # Tokens travel to and from the experts by all-to-all; nothing is gathered whole (no
  # replicated tokens, expert weights or slot tables).
  assert "all-to-all" in hlo
  assert "all-gather" not in hlo
  assert sharded["experts"]["wi_kernel"].sharding.spec[0] == "expert"
  _assert_same(want, got)


def test_config_and_model_agree_on_dispatch_modes():
  assert config_lib.MOE_DISPATCH_MODES == moe_dispatch.DISPATCH_MODES
  x = jnp.zeros((1, 4, D))
  with pytest.raises(ValueError, match="dispatch='sort' is not one of"):
    moe.MoeMlp(num_experts=4, mlp_dim=H, dispatch="sort").init(jax.random.PRNGKey(0), x, True)


@pytest.mark.parametrize("dispatch", moe_dispatch.DISPATCH_MODES)
def test_group_rows_route_consecutive_rows_as_one_group_in_training(dispatch):
  b, l, e, rows = 4, 6, 8, 2
  x = jax.random.normal(jax.random.PRNGKey(102), (b, l, D))
  token_mask = jnp.ones((b, l), bool).at[1, 4:].set(False)
  kwargs = dict(num_experts=e, mlp_dim=H, num_groups=2, capacity_factor=1.0, dispatch=dispatch)
  grouped, single = moe.MoeMlp(**kwargs, group_rows=rows), moe.MoeMlp(**kwargs)
  params = _params(single, x, e)
  assert grouped.capacity(rows * l, False) < rows * single.capacity(l, False)  # fewer slots

  @jax.jit
  def run(params, x):
    apply = lambda m, x, mask, det: m.apply({"params": params}, x, det, mask, mutable=COLLECTIONS)[
      0
    ]
    together = x.reshape(b // rows, rows * l, D), token_mask.reshape(b // rows, rows * l)
    return (
      apply(grouped, x, token_mask, False),
      apply(single, *together, False).reshape(b, l, D),
      apply(single, x, token_mask, False),
      apply(grouped, x, token_mask, True),
      apply(single, x, token_mask, True),
    )

  train, want_train, per_row, evaluate, want_eval = run(params, x)
  np.testing.assert_allclose(np.asarray(train), np.asarray(want_train), atol=1e-6, rtol=0)
  assert np.abs(np.asarray(train) - np.asarray(per_row)).max() > 1e-3  # grouping matters
  np.testing.assert_allclose(np.asarray(evaluate), np.asarray(want_eval), atol=1e-6, rtol=0)
