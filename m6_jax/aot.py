"""Ahead-of-time compilation of the real train step for a TPU topology, on this CPU.

  pip install -r requirements-aot.txt      # libtpu: the TPU compiler, no TPU needed
  python -m m6_jax.main --mode=aot --config=configs/m6_10b.py --topology=v5p:4x4x4 \\
    --aot_output=/tmp/m6_10b_aot.json

`jax.experimental.topologies.get_topology_desc` describes the chips of a TPU slice without
any TPU being present; the train step (built by `train/setup.py`, as the train loop builds
it: same model, optimizer, shardings and donation) is lowered with abstract inputs and
compiled by libtpu for that slice. We report per-chip memory (arguments, outputs,
temporaries, total against the chip's HBM), the compiled FLOPs, the collectives in the
compiled HLO with the bytes each chip sends in them (loop bodies counted once per
iteration), and an MFU estimate from the model FLOPs, the HBM traffic and that
communication; we print them and write them as JSON.

Environment: JAX_PLATFORMS is forced to cpu (the TPU platform is only used through the
topology), so that no TPU backend is initialised; TPU_WORKER_HOSTNAMES=localhost quiets
libtpu's search for TPU workers. Without libtpu installed, `run` stops with a ConfigError
saying how to install it; nothing else in the project needs libtpu.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from m6_jax import config as config_lib
from m6_jax.model import param_count
from m6_jax.parallel import partitioning
from m6_jax.train import setup as setup_lib

# Per chip: HBM (GiB), peak bf16 TFLOP/s, HBM bandwidth (TB/s), inter-chip interconnect
# bandwidth (GB/s; the published Gbps / 8) -- public Cloud TPU figures.
CHIPS = {
  "v4": (32, 275, 1.2, 300),
  "v5e": (16, 197, 0.82, 200),
  "v5p": (95, 459, 2.76, 600),
  "v6e": (32, 918, 1.64, 448),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _prepare_environment() -> None:
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Several compile-only processes (e.g. tests beside a CLI run) may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")


def topology_devices(topology: str) -> list[Any]:
  """The devices of a TPU topology such as 'v5p:4x4x4' (needs libtpu, not a TPU)."""
  _prepare_environment()
  from jax.experimental import topologies

  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    raise config_lib.ConfigError(
      "--mode=aot needs libtpu (the TPU compiler): pip install -r requirements-aot.txt"
    ) from e
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # libtpu's messages for a bad name are long; keep the gist
    raise config_lib.ConfigError(
      f"libtpu could not describe --topology={topology}: {str(e).splitlines()[0]} "
      "(topologies look like v5p:2x2x1, v5p:4x4x4, v4:2x2x2, v6e:4x4)."
    ) from e


_DTYPE_BYTES = {
  "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
  "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r"|f8\w*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_COLLECTIVE = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\("
)


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Instructions of each collective kind in an HLO module's text (async `-start` halves
  count once; ops inside while-loop bodies, e.g. of the scanned layers, count once)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.match(line)
    if m:
      counts[m.group(2)] += 1
  return counts


_CALLEE = re.compile(r"\b(body|condition|to_apply|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)')


def _array_bytes(type_text: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY.findall(type_text):
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    sizes.append(n * _DTYPE_BYTES.get(dtype, 1))
  return sizes


def _group_size(line: str, num_devices: int) -> int:
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
  if mesh:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: groups along the named mesh axes
    sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", mesh.group(1))}
    return int(np.prod([sizes[a] for a in re.findall(r"'(\w+)'", mesh.group(2))]))
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if iota:  # [groups, size] (or [groups, a, b]: size a*b) over an iota of the devices
    return int(np.prod([int(d) for d in iota.group(1).split(",")[1:]]))
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if explicit:
    return len(explicit.group(1).split(","))
  return num_devices  # replica_groups={}: one group of every device


def _per_chip_traffic(kind: str, start: bool, type_text: str, n: int) -> float:
  """Bytes one chip sends for one collective (the usual ring/bucket algorithm costs)."""
  arrays = _array_bytes(type_text)
  if start and kind in ("all-gather", "collective-permute") and len(arrays) > 1:
    arrays = arrays[len(arrays) // 2 :]  # async result tuple: (operands..., outputs...)
  size = float(sum(arrays))
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2.0 * size * (n - 1) / n  # reduce-scatter + all-gather
  if kind == "reduce-scatter":
    return size * (n - 1)  # the result is 1/n of the operand
  if kind == "collective-permute":
    return size
  return size * (n - 1) / n  # all-gather (result), all-to-all


def _while_trip_count(line: str, condition: list[str]) -> int:
  """Iterations of a while loop: XLA's known_trip_count when it annotated one, else the
  bound of the loop condition `counter < constant` (how scan and fori_loop lower, counting
  from 0 in steps of 1); 1 when neither is found."""
  known = _TRIP_COUNT.search(line)
  if known:
    return int(known.group(1))
  if any("direction=LT" in c and "compare(" in c for c in condition):
    bounds = [int(b) for c in condition for b in re.findall(r"s32\[\][^=]*constant\((\d+)\)", c)]
    if len(bounds) == 1:
      return bounds[0]
  return 1


def collective_traffic(hlo_text: str, num_devices: int) -> dict[str, float]:
  """Bytes each chip sends per step, by collective kind, from a compiled HLO module.

  Collectives inside while loops (the scanned layers, gradient accumulation) are multiplied
  by the loop's known trip count, so a scanned 24-layer model counts its per-layer
  all-gathers 24 times, unlike `count_collectives`.
  """
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      computations[current].append(line)
  if entry is None:
    return {k: 0.0 for k in COLLECTIVES}

  # How many times each computation runs per step: the call graph is a DAG, walk it in
  # topological order from the entry computation.
  callees: dict[str, list[tuple[str, int]]] = {}
  for name, lines in computations.items():
    calls = []
    for line in lines:
      roles = dict((role, callee) for role, callee in _CALLEE.findall(line))
      trip = _while_trip_count(line, computations.get(roles.get("condition", ""), []))
      for role, callee in roles.items():
        calls.append((callee, trip if role == "body" else 1))
      for group in _BRANCHES.findall(line):
        calls += [(b.strip().lstrip("%"), 1) for b in group.split(",") if b.strip()]
    callees[name] = [(c, k) for c, k in calls if c in computations]
  order, seen = [], set()

  def visit(name: str) -> None:
    if name in seen:
      return
    seen.add(name)
    for callee, _ in callees[name]:
      visit(callee)
    order.append(name)

  visit(entry)
  runs = {name: 0 for name in order}
  runs[entry] = 1
  for name in reversed(order):  # callers before callees
    for callee, times in callees[name]:
      runs[callee] += runs[name] * times

  traffic = {k: 0.0 for k in COLLECTIVES}
  for name in order:
    for line in computations[name]:
      m = _COLLECTIVE.match(line)
      if m:
        type_text, kind, start = m.group(1), m.group(2), bool(m.group(3))
        n = _group_size(line, num_devices)
        traffic[kind] += runs[name] * _per_chip_traffic(kind, start, type_text, n)
  return traffic


def compile_train_step(config: ml_collections.ConfigDict, devices: list[Any]) -> Any:
  """The train step of `config` (train/setup.py, as the loop builds it) compiled for `devices`."""
  config_lib.validate(config, len(devices))
  setup = setup_lib.build(config, devices)
  # The abstract inputs outside the mesh context: tracing the initialiser makes a PRNG key,
  # which must not be placed on the topology's devices (there are none here).
  state, batch = setup.abstract_state(), setup.abstract_batch()
  with setup.mesh_context():
    return setup.step.lower(state, batch).compile()


def analyse(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
  devices = topology_devices(topology)
  chip = topology.split(":")[0]
  hbm_gib, peak_tflops, hbm_tbps, ici_gbps = CHIPS.get(chip, (float("nan"),) * 4)
  start = time.perf_counter()
  compiled = compile_train_step(config, devices)
  compile_s = time.perf_counter() - start

  hlo = compiled.as_text()
  mem = compiled.memory_analysis()
  gib = 1024**3
  arguments = mem.argument_size_in_bytes / gib
  outputs = mem.output_size_in_bytes / gib
  aliased = mem.alias_size_in_bytes / gib
  temps = mem.temp_size_in_bytes / gib
  total = arguments + outputs - aliased + temps
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  compiled_flops = float(cost.get("flops", float("nan")))
  bytes_accessed = float(cost.get("bytes accessed", float("nan")))

  counts = param_count.count_params(config)
  chips = len(devices)
  model_flops = param_count.train_flops(config, counts)
  peak = peak_tflops * 1e12
  # Step time per chip from three rooflines: the model FLOPs at peak, the HBM traffic XLA
  # reports, and the bytes each chip sends in collectives over its ICI bandwidth. With
  # perfect overlap the step takes the largest of them (an upper bound on MFU); with no
  # overlap of communication and computation, the sum (the MFU estimate we report).
  t_compute = model_flops / chips / peak
  t_memory = bytes_accessed / (hbm_tbps * 1e12) if np.isfinite(bytes_accessed) else 0.0
  traffic = collective_traffic(hlo, chips)
  t_comm = sum(traffic.values()) / (ici_gbps * 1e9)
  t_step = max(t_compute, t_memory, t_comm)
  t_serial = max(t_compute, t_memory) + t_comm
  return {
    "config": {
      "d_model": config.model.d_model,
      "num_layers": config.model.num_layers,
      "moe_num_experts": config.model.moe_num_experts,
      "batch_size": config.data.batch_size,
      "mesh": partitioning.make_mesh(config, devices).shape,
    },
    "topology": topology,
    "chips": chips,
    "device_kind": devices[0].device_kind,
    "compile_seconds": round(compile_s, 1),
    "params": counts["total"],
    "active_params_per_token": counts["active per token"],
    "memory_per_chip_gib": {
      "arguments": round(arguments, 3),
      "outputs": round(outputs, 3),
      "aliased": round(aliased, 3),
      "temporaries": round(temps, 3),
      "total": round(total, 3),
      "hbm": hbm_gib,
      "fits": bool(total <= hbm_gib),
    },
    "flops_per_step": {
      "compiled_per_chip": compiled_flops,
      "model_analytic_total": model_flops,
      "model_analytic_per_chip": model_flops / chips,
    },
    "bytes_accessed_per_chip": bytes_accessed,
    "roofline": {
      "peak_tflops_per_chip": peak_tflops,
      "hbm_tb_per_s": hbm_tbps,
      "compute_bound_step_s": t_compute,
      "memory_bound_step_s": t_memory,
      "ici_gb_per_s": ici_gbps,
      "communication_step_s": t_comm,
      "step_s_lower_bound": t_step,
      "step_s_no_overlap": t_serial,
      "mfu_upper_bound": t_compute / t_step if t_step else float("nan"),
      "mfu_estimate": t_compute / t_serial if t_serial else float("nan"),
    },
    "collectives": count_collectives(hlo),
    "collective_bytes_per_chip": traffic,
    "_hlo_text": hlo,
  }


def format_report(r: dict[str, Any]) -> str:
  m, f, rl = r["memory_per_chip_gib"], r["flops_per_step"], r["roofline"]
  comm_gb = sum(r["collective_bytes_per_chip"].values()) / 1e9
  lines = [
    f"AOT train step on {r['topology']} ({r['chips']} x {r['device_kind']}), mesh "
    f"{dict(r['config']['mesh'])}, compiled in {r['compile_seconds']:.1f}s",
    f"params {r['params']:,} (active per token {r['active_params_per_token']:,})",
    f"memory per chip (GiB): arguments {m['arguments']:.2f}, outputs {m['outputs']:.2f} "
    f"(aliased {m['aliased']:.2f}), temporaries {m['temporaries']:.2f}; total {m['total']:.2f} "
    f"of {m['hbm']} GiB HBM",
  ]
  if not m["fits"]:
    lines.append(
      f"DOES NOT FIT: {m['total']:.1f} GiB per chip > {m['hbm']} GiB HBM; use more chips "
      "(a bigger topology or mesh.fsdp / mesh.expert), a smaller batch, or more remat."
    )
  lines += [
    f"FLOPs per step: compiled {f['compiled_per_chip']:.3e} per chip (XLA cost analysis, "
    "which counts a scanned layer's while-loop body once); "
    f"model (analytic) {f['model_analytic_total']:.3e} total, "
    f"{f['model_analytic_per_chip']:.3e} per chip",
    f"step time per chip: compute {rl['compute_bound_step_s'] * 1e3:.1f} ms (model FLOPs at "
    f"{rl['peak_tflops_per_chip']} TFLOP/s), HBM {rl['memory_bound_step_s'] * 1e3:.1f} ms, "
    f"communication {rl['communication_step_s'] * 1e3:.1f} ms ({comm_gb:.2f} GB sent per chip "
    f"at {rl['ici_gb_per_s']} GB/s ICI)",
    f"MFU estimate {100 * rl['mfu_estimate']:.1f}% (communication not overlapped, step "
    f"{rl['step_s_no_overlap'] * 1e3:.1f} ms); upper bound {100 * rl['mfu_upper_bound']:.1f}% "
    f"(fully overlapped, step {rl['step_s_lower_bound'] * 1e3:.1f} ms)",
    "collectives in the compiled HLO (instructions / GB sent per chip per step): "
    + ", ".join(
      f"{k} {v} / {r['collective_bytes_per_chip'][k] / 1e9:.2f}"
      for k, v in r["collectives"].items()
    ),
  ]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, topology: str, output: str | None = None) -> dict:
  report = analyse(config, topology)
  hlo = report.pop("_hlo_text")
  print(format_report(report))
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(os.path.splitext(output)[0] + ".hlo.txt", "w") as f:
      f.write(hlo)
    with open(output, "w") as f:
      json.dump(report, f, indent=2, default=lambda x: dict(x) if hasattr(x, "keys") else str(x))
    print(f"wrote {output}")
  return report
