"""The training set-up in one place: mesh, model, optimizer, shardings and the jitted step,
for the config's model family (m6_jax/train/families/).

The train loop, the AOT report (on a TPU topology's devices) and the benchmarks all build
their program here, so they compile the same step:

    setup = build(config)                         # devices: jax.devices() by default
    state = setup.init_state()                    # initialised directly into its shardings
    with setup.mesh_context():
      state, metrics = setup.step(state, setup.put_batch(host_batch))

Shardings come from `jax.eval_shape` of the initialiser plus the logical axis names of every
parameter (nothing is materialised unsharded); the batch is split over the mesh's batch axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from m6_jax.parallel import partitioning
from m6_jax.train import families, optim
from m6_jax.train import state as state_lib
from m6_jax.train import step as step_lib
from m6_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  family: families.Family  # config.model.family: the module, its step and its data
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any  # a TrainState of NamedShardings
  batch_shardings: dict[str, NamedSharding]
  step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # jitted, state donated

  def mesh_context(self):
    """The mesh and logical rules, so that activation constraints resolve."""
    return partitioning.mesh_context(self.mesh, self.rules)

  def init_state(self, seed: int | None = None) -> TrainState:
    """A fresh state, initialised under jit straight into its shardings."""
    seed = int(self.config.seed) if seed is None else seed
    state, _ = state_lib.create_sharded_state(
      self.family.init_params, self.tx, self.mesh, self.rules, seed
    )
    return state

  @property
  def model(self) -> Any:
    return self.family.model

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target, and the AOT compile input."""
    return state_lib.abstract_state(self.family.init_params, self.tx, self.state_shardings)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global train batch at the config's lengths, with its shardings."""
    b = int(self.config.data.batch_size)
    return {
      k: jax.ShapeDtypeStruct((b,) + shape, dtype, sharding=self.batch_shardings[k])
      for k, (shape, dtype) in self.family.batch_shapes().items()
    }

  def put_batch(self, host_batch: dict) -> dict[str, jax.Array]:
    """This process's rows of the global batch (numpy) -> global arrays split over the mesh."""
    return partitioning.host_batch_to_global(host_batch, self.batch_shardings)


def build(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> TrainSetup:
  """The set-up for `config` on `devices` (default: all). The config must be validated."""
  mesh = partitioning.make_mesh(config, devices)
  rules = partitioning.logical_rules(config)
  family = families.get(config)
  tx = family.make_optimizer()
  schedule = optim.learning_rate_schedule(config.train)
  state_shardings = state_lib.state_shardings(family.init_params, tx, mesh, rules)
  batch_shardings = {
    k: partitioning.batch_sharding(mesh, rules, 1 + len(shape))
    for k, (shape, _) in family.batch_shapes().items()
  }
  step = step_lib.jit_train_step(
    family.make_train_step(tx, schedule),
    state_shardings,
    batch_shardings,
    partitioning.replicated(mesh),
  )
  return TrainSetup(
    config, mesh, rules, family, tx, schedule, state_shardings, batch_shardings, step
  )
