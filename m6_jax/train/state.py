"""The train state and its sharded initialisation.

Shardings come from `jax.eval_shape` of the initialiser plus the logical annotations on every
parameter, and the real initialisation runs under `jax.jit` with those output shardings: each
device only ever materialises its own shard, which is what lets a 10B model start on a pod.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from m6_jax.parallel import partitioning

# (params rng, dropout rng) -> the model's parameters, still in their logical-axis boxes
# (m6_jax/train/families/: each model family's initialiser).
InitParams = Callable[[jax.Array, jax.Array], Any]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # the run's key; each step folds in its step number


def make_init_fn(
  init_params: InitParams, tx: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState whose parameters are still wrapped in their logical-axis boxes."""

  def init(rng: jax.Array) -> TrainState:
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    params = init_params(params_rng, dropout_rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )

  return init


def state_shardings(
  init_params: InitParams, tx: optax.GradientTransformation, mesh: Mesh, rules
) -> Any:
  """NamedShardings of the (unboxed) train state, without allocating it."""
  abstract = jax.eval_shape(make_init_fn(init_params, tx), jax.random.PRNGKey(0))
  return partitioning.logical_to_shardings(abstract, mesh, rules)


def abstract_state(
  init_params: InitParams, tx: optax.GradientTransformation, shardings: Any
) -> TrainState:
  """ShapeDtypeStructs carrying shardings: the restore target for checkpoints."""
  abstract = nn.unbox(jax.eval_shape(make_init_fn(init_params, tx), jax.random.PRNGKey(0)))
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def create_sharded_state(
  init_params: InitParams, tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int
) -> tuple[TrainState, Any]:
  """Initialises the state directly into its shardings; returns (state, shardings)."""
  shardings = state_shardings(init_params, tx, mesh, rules)
  init = make_init_fn(init_params, tx)
  with partitioning.mesh_context(mesh, rules):
    state = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(
      jax.random.PRNGKey(seed)
    )
  return state, shardings
