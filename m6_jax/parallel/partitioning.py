"""Meshes and shardings from the config's mesh sizes and logical axis rules.

Everything outside m6_jax/parallel/ names tensor dimensions logically ("batch", "embed",
"heads", ...); `config.mesh.logical_axis_rules` (defaults in m6_jax/parallel/axes.py) maps
those names onto the mesh axes built here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from m6_jax.parallel.axes import MESH_AXES, mesh_shape

Rules = Sequence[tuple[str, Any]]


def make_mesh(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """The (data, fsdp, tensor, expert) mesh over `devices` (default: all), sized by the config."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(config.mesh, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  used = int(np.prod(shape))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices[:used])
  except NotImplementedError:
    # On a TPU torus every mesh axis must be a product of whole physical axes; a mesh such as
    # fsdp 2 x expert 256 on 8x8x8 is not. Splitting a physical axis still gives a valid mesh,
    # only with less regular collectives, so fall back to it rather than refuse the config.
    logging.warning("mesh %s splits physical axes of the device topology", dict(sizes))
    grid = mesh_utils.create_device_mesh(shape, devices[:used], allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return tuple(
    (name, tuple(axes) if isinstance(axes, list) else axes)
    for name, axes in config.mesh.logical_axis_rules
  )


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Activates the mesh and the logical rules, so activation constraints resolve."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_shard_map(
  fn: Callable, in_names: Sequence[tuple[str | None, ...]], out_names: tuple[str | None, ...]
) -> Callable:
  """`fn` run per shard of the context mesh (`mesh_context`): its arguments (one tuple of
  logical axis names each, None for a dimension kept whole) and its one result are split as
  the context's logical rules map those names; `fn` itself where no mesh is set.

  A name whose mesh axes do not divide every dimension it names (the batch of 1 that
  initialisation traces) is kept whole instead, in the arguments and the result alike.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn

  def run(*args):
    split = {}
    for names, x in zip(in_names, args):
      for name, axes, size in zip(names, nn.logical_to_mesh_axes(names), x.shape):
        shards = int(np.prod([mesh.shape[a] for a in _axis_tuple(axes)]))
        split[name] = split.get(name, True) and size % shards == 0

    def spec(names):
      axes = nn.logical_to_mesh_axes(names)
      return PartitionSpec(*(a if split.get(n, False) else None for n, a in zip(names, axes)))

    in_specs = tuple(spec(names) for names in in_names)
    mapped = jax.shard_map(
      fn, mesh=mesh, in_specs=in_specs, out_specs=spec(out_names), check_vma=False
    )
    return mapped(*args)

  return run


def _axis_tuple(axes: Any) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a mesh axis name or a tuple of them) as a tuple."""
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_shardings(abstract_boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

  Unannotated leaves (step counters, PRNG keys, optimizer scalars) are replicated.
  """
  logical_specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Leading dimension over the batch axes, the rest replicated."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules) -> Any:
  return jax.tree.map(lambda x: batch_sharding(mesh, rules, np.ndim(x)), batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def host_batch_to_global(batch: Any, shardings: Any) -> Any:
  """Turns this process's slice of the global batch (numpy) into global sharded arrays.

  Each process holds `global_batch / process_count` rows; with one process this is the
  whole batch, placed shard by shard with no replicated intermediate copy.
  """

  def put(x, sharding):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch, shardings)


def count_sharded_params(tree: Any) -> tuple[int, int]:
  """(number of array leaves that are split over >1 device, number of array leaves)."""
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "sharding")]
  split = sum(1 for x in leaves if not x.sharding.is_fully_replicated)
  return split, len(leaves)


def batch_rows_multiple(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch dimension is split on `mesh` (a batch's rows must divide)."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
  names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return int(np.prod([mesh.shape[a] for a in names]))


def put_full_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> tuple[dict, int]:
  """A batch that every process holds whole (evaluation, generation) -> (global arrays split
  over the batch axes, the number of real rows). The rows are padded with zeros to a multiple
  of the batch shards; a zero row has no image, no text and zero target weights."""
  rows = len(next(iter(batch.values())))
  multiple = batch_rows_multiple(mesh, rules)
  padded = -(-rows // multiple) * multiple
  out = {}
  for key, x in batch.items():
    x = np.asarray(x)
    if padded > rows:
      x = np.concatenate([x, np.zeros((padded - rows,) + x.shape[1:], x.dtype)])
    sharding = batch_sharding(mesh, rules, x.ndim)
    out[key] = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
  return out, rows


def device_bytes(tree: Any) -> dict[Any, int]:
  """{device: bytes of the tree's shards it holds}."""
  held: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def describe_placement(mesh: Mesh, params: Any) -> str:
  """The mesh and the largest share of `params` one device holds, for a log line: what tells
  tensor-parallel decoding from a single device."""
  held = device_bytes(params)
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  if mesh.devices.size == 1:
    share = "one device holds all the parameters"
  else:
    share = f"each device holds at most {100 * max(held.values()) / total:.0f}% of the parameters"
  return f"Mesh: {dict(mesh.shape)}; {share} ({total / 2**20:.1f} MiB in all)"
