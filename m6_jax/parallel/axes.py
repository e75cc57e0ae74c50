"""Mesh axis names, the logical axis rules and the mesh checks: the mesh knowledge of the
project in one place (no JAX import, so that config validation stays instant).

The mesh has four axes: `data` (batch), `fsdp` (batch, and parameters ZeRO-3 style), `tensor`
(Megatron-style splits of heads / mlp / vocab) and `expert` (MoE experts, and one more batch
axis outside the MoE layers). Everything outside `m6_jax/parallel/` names tensor dimensions
logically (`batch`, `embed`, `heads`, `experts`, ...); the rules below map those names onto
the mesh axes, and no logical name is also a mesh axis name.
"""

from __future__ import annotations

import math
from typing import Any

from m6_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def default_logical_axis_rules() -> tuple[tuple[str, Any], ...]:
  """Logical axis name -> mesh axes. Changing the parallelism is editing this table.

  Batch is split over data and fsdp (and expert: outside the MoE layers the expert axis is
  one more data-parallel axis); parameters are sharded ZeRO-3 style over fsdp along their
  embed dimension and Megatron style over tensor along heads / mlp / vocab; MoE experts over
  expert. Flax gives a mesh axis to the first rule that claims it, so ('experts', 'expert')
  comes before 'batch', and the second 'batch' rule is the fallback the expert buffers
  [experts, batch, capacity, embed] use (see m6_jax/model/moe.py). Stacked (scanned) layers
  keep their `layers` axis whole.
  """
  return (
    ("experts", "expert"),
    ("batch", ("data", "fsdp", "expert")),
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("patch", None),
    ("segment", None),
    ("channels", None),
  )


def mesh_shape(mesh_config: Any, num_devices: int) -> dict[str, int]:
  """Resolves the `config.mesh` sizes (one -1 allowed: "the rest") against the device count."""
  sizes = {a: int(mesh_config[a]) for a in MESH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ConfigError(
      f"Only one mesh axis may be -1, got {', '.join('mesh.' + a for a in unknown)}; "
      "set all but one to explicit sizes."
    )
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{a}={s} must be a positive size or -1.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fixed > num_devices:
    devices = f"{num_devices} device{'s are' if num_devices != 1 else ' is'}"
    raise ConfigError(
      f"Mesh {' x '.join(f'{a}={s}' for a, s in sizes.items())} needs {fixed} devices but "
      f"only {devices} available; shrink mesh.data / mesh.fsdp / mesh.tensor / "
      f"mesh.expert so their product is at most {num_devices}."
    )
  if unknown:
    if num_devices % fixed:
      raise ConfigError(
        f"mesh.{unknown[0]}=-1 cannot fill {num_devices} devices when the other axes use "
        f"{fixed}; make the fixed axes divide {num_devices}."
      )
    sizes[unknown[0]] = num_devices // fixed
  return sizes


def batch_mesh_axes(rules: Any) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (its first logical rule)."""
  for name, axes in rules:
    if name == "batch":
      if axes is None:
        return ()
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      return tuple(a for a in axes if a in MESH_AXES)
  return ()


def batch_shards(config: Any, num_devices: int) -> int:
  """How many ways the batch dimension is split on this mesh."""
  sizes = mesh_shape(config.mesh, num_devices)
  return math.prod(sizes[a] for a in batch_mesh_axes(config.mesh.logical_axis_rules))


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def check_model_fits_mesh(config: Any, num_devices: int) -> dict[str, int]:
  """The model's split dimensions divide their mesh axes; returns the resolved mesh sizes."""
  m = config.model
  sizes = mesh_shape(config.mesh, num_devices)
  tensor = sizes["tensor"]
  for key in ("num_heads", "mlp_dim", "vocab_size"):
    _require(
      m[key] % tensor == 0,
      f"model.{key}={m[key]} is not divisible by mesh.tensor={tensor}; choose a tensor "
      f"parallel size that divides it (e.g. --config.mesh.tensor=1).",
    )
  codes = m.get("code_vocab_size", 0)  # image codes are embedding rows after the text vocabulary
  _require(
    codes % tensor == 0,
    f"model.code_vocab_size={codes} is not divisible by mesh.tensor={tensor}; the embedding "
    "rows (vocab_size + code_vocab_size) are split over it.",
  )
  _require(
    m.d_model % sizes["fsdp"] == 0,
    f"model.d_model={m.d_model} is not divisible by mesh.fsdp={sizes['fsdp']}.",
  )
  e = m.moe_num_experts
  _require(
    e == 0 or e % sizes["expert"] == 0,
    f"model.moe_num_experts={e} is not divisible by mesh.expert={sizes['expert']}; use an "
    "expert-parallel size that divides the number of experts.",
  )
  return sizes


def check_batch_fits_mesh(config: Any, num_devices: int, process_count: int = 1) -> None:
  """The global batch (and each gradient-accumulation micro-batch) splits evenly over the
  batch axes and the processes."""
  d, t = config.data, config.train
  axes = batch_mesh_axes(config.mesh.logical_axis_rules)
  shards = batch_shards(config, num_devices)
  names = "*".join(f"mesh.{a}" for a in axes) or "1"
  _require(
    d.batch_size % (shards * process_count) == 0,
    f"data.batch_size={d.batch_size} is not divisible by {names}={shards}"
    f" (x {process_count} processes); use a multiple of {shards * process_count}.",
  )
  _require(t.grad_accum_steps >= 1, f"train.grad_accum_steps={t.grad_accum_steps} must be >= 1.")
  _require(
    d.batch_size % (t.grad_accum_steps * shards) == 0,
    f"data.batch_size={d.batch_size} must split into train.grad_accum_steps="
    f"{t.grad_accum_steps} micro-batches each divisible by {shards}.",
  )
  rows = config.model.get("moe_group_rows", 1)
  per_device = d.batch_size // (t.grad_accum_steps * shards)
  _require(
    config.model.moe_num_experts == 0 or per_device % rows == 0,
    f"model.moe_group_rows={rows} does not divide the {per_device} rows each device holds of "
    "a (micro-)batch; a routing group must not span devices: pick a divisor.",
  )
