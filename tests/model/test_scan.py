"""nn.scan over layers + remat give the unrolled model's loss and gradients; decoding works."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import moe_objective

from m6_jax.config import ConfigError, validate
from m6_jax.model.m6 import M6, M6Config, dummy_batch


def _moe(c, every=2):
  c.model.num_layers = 4
  c.model.moe_num_experts, c.model.moe_num_groups, c.model.moe_every = 4, 2, every
  return c


def stack_layers(params, config):
  """Unrolled params (layer_i) -> scanned params (layers/layer_j stacked over groups)."""
  k = config.layers_per_group
  groups = config.num_layers // k
  out = {name: p for name, p in params.items() if not name.startswith("layer_")}
  out["layers"] = {
    f"layer_{j}": jax.tree.map(
      lambda *xs: jnp.stack(xs), *[params[f"layer_{g * k + j}"] for g in range(groups)]
    )
    for j in range(k)
  }
  return out


# Jitted once for the module, the model a static argument: the cases that share a model (the
# unrolled dense reference, the scanned ones of the same config) share its compilation.
_GRAD = jax.jit(jax.value_and_grad(moe_objective, argnums=1, has_aux=True), static_argnums=0)
_INIT = jax.jit(lambda model, rng, batch: model.init(rng, batch), static_argnums=0)


@pytest.mark.parametrize(
  "moe, scan, remat",
  [
    (False, True, "full"),
    (True, True, "dots_saveable"),
    (False, False, "dots_saveable"),
    (False, True, "dots_and_attention_saveable"),
  ],
)
def test_scan_and_remat_match_unrolled(tiny_config, random_batch, moe, scan, remat):
  c = _moe(tiny_config) if moe else tiny_config
  batch = random_batch(4, c)
  plain = M6(M6Config.from_config(c))
  params = nn.unbox(_INIT(plain, jax.random.PRNGKey(0), dummy_batch(plain.config))["params"])
  c.model.scan_layers, c.model.remat_policy = scan, remat
  other = M6(M6Config.from_config(c))
  other_params = stack_layers(params, other.config) if scan else params
  # The parameter tree of the transformed model is exactly the mapped one.
  shapes = jax.eval_shape(other.init, jax.random.PRNGKey(0), dummy_batch(other.config))
  assert jax.tree.structure(nn.unbox(shapes["params"])) == jax.tree.structure(other_params)

  (want, want_terms), want_grads = _GRAD(plain, params, batch)
  (got, got_terms), got_grads = _GRAD(other, other_params, batch)
  assert float(got) == pytest.approx(float(want), abs=1e-5)
  assert (
    set(got_terms)
    == set(want_terms)
    == ({"load_balance_loss", "router_z_loss", "dropped_fraction"} if moe else set())
  )
  for name in want_terms:
    assert float(got_terms[name]) == pytest.approx(float(want_terms[name]), abs=1e-5)
  mapped = stack_layers(want_grads, other.config) if scan else want_grads
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(mapped), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_scanned_params_carry_layers_axis(tiny_config):
  c = _moe(tiny_config)
  c.model.scan_layers = True
  model = M6(M6Config.from_config(c))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy_batch(model.config))["params"]
  kernel = boxed["layers"]["layer_1"]["mlp"]["experts"]["wi_kernel"]
  assert kernel.names == ("layers", "experts", "embed", "mlp")
  assert kernel.value.shape == (2, 4, 64, 128)
  assert boxed["layers"]["layer_0"]["mlp"]["wi"]["kernel"].names == ("layers", "embed", "mlp")


@pytest.mark.parametrize("moe", [False, True])
def test_scanned_decoding_matches_forward(tiny_config, random_batch, moe):
  c = _moe(tiny_config) if moe else tiny_config
  c.model.scan_layers = True
  c.model.moe_eval_capacity_factor = 8.0  # no dropping, so teacher forcing == decoding
  batch = random_batch(3, c, seed=1)
  model = M6(M6Config.from_config(c))
  params = _INIT(model, jax.random.PRNGKey(0), dummy_batch(model.config))["params"]
  variables = {"params": params}
  full = jax.jit(model.apply)(variables, batch)
  cache = jax.jit(lambda v, b: model.apply(v, b, method=M6.encode_prefix))(variables, batch)
  step = jax.jit(lambda v, cache, t, p: model.apply(v, cache, t, p, method=M6.decode_step))
  for position in range(3):
    logits, cache = step(variables, cache, jnp.asarray(batch["tgt_input"][:, position]), position)
    np.testing.assert_allclose(logits, full[:, position], atol=2e-5, rtol=0)


def test_stack_config_errors(tiny_config):
  c = _moe(tiny_config, every=3)
  c.model.scan_layers = True
  with pytest.raises(ConfigError, match="num_layers=4 must be a multiple of it"):
    validate(c, num_devices=8)
  c = _moe(tiny_config)
  c.model.remat_policy = "dots"
  with pytest.raises(ConfigError, match="model.remat_policy='dots' is not one of"):
    validate(c, num_devices=8)


def test_moe_config_errors(tiny_config):
  def moe(**changes):
    c = _moe(copy.deepcopy(tiny_config))
    for key, value in changes.items():
      section, name = key.split("__")
      c[section][name] = value
    return c

  with pytest.raises(ConfigError, match="moe_num_experts=4 is not divisible by mesh.expert=8"):
    validate(moe(mesh__expert=8, mesh__data=1), num_devices=8)
  with pytest.raises(ConfigError, match="not divisible by model.moe_num_groups=3"):
    validate(moe(model__moe_num_groups=3), num_devices=8)
  with pytest.raises(ConfigError, match=r"mesh.data\*mesh.fsdp\*mesh.expert=8"):
    validate(moe(mesh__expert=4, data__batch_size=4), num_devices=8)
  validate(moe(mesh__expert=4), num_devices=8)


def test_config_lists_exactly_the_models_remat_policies():
  """config.py keeps its own list (it imports no JAX); it must name the policies m6.py has."""
  from m6_jax import config as config_lib
  from m6_jax.model.m6 import REMAT_POLICIES

  assert config_lib.REMAT_POLICIES == ("none", *REMAT_POLICIES)
