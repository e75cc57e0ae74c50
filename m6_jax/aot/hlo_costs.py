"""What one compiled step costs, per chip, read from its optimised HLO module: FLOPs, HBM
bytes and the bytes sent in collectives, each while-loop body counted once per iteration.

XLA's `cost_analysis` counts a while loop's body once, but the scanned layer stack runs its
body once per layer group (24 or 48 times in the paper configs), so its FLOPs and bytes
accessed under-count a scanned model by nearly the layer count. Here:

- The call graph of the HLO module gives how many times each computation runs per step: a
  while body runs its loop's trip count times its caller (XLA's `known_trip_count`, or the
  bound of the `counter < N` condition that scan and fori_loop lower to).
- FLOPs and bytes: XLA's own cost analysis (`HloCostAnalysis`, through the CPU client) of
  the module and of every loop body made the entry computation of a copy of the module. A
  body's own cost is its cost minus the loops nested in it; the step costs the sum of each
  computation's own cost times its runs. The CPU client sizes arrays without the TPU's tiled
  layouts, so the TPU's figures (`compiled.cost_analysis()`) are scaled by the ratio of the
  per-step to the once-counted CPU figures (1.0 for a module without loops).
- Collectives: each collective instruction is sized from its shapes and replica groups
  (ring / bucket algorithm costs) and multiplied by the runs of its computation. libtpu
  writes a reduce-scatter as an `all-reduce-scatter` fusion (an all-reduce whose result is
  sliced to this chip's part); it is counted as the reduce-scatter it runs as.

- Kernels: XLA counts neither FLOPs nor bytes for a Pallas kernel (a `tpu_custom_call`), so
  `kernel_costs` adds the splash attention kernels' analytically: per call, the [q, k] x
  head_dim matmuls of the blocks it visits (forward 2, dq 3, dkv 4) and its operands and
  results read or written once, the arrays it streams re-read once per block row; the block
  grid and the blocks visited come from the named scope `model/attention.py` puts around
  the call.

A compile with the loops unrolled (`model.scan_layers=False`) has no loop, so XLA's own
figures are exact there; `tests/test_hlo_costs.py` checks the two agree.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
  "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
  "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r"|f8\w*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_COLLECTIVE = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\("
)
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)')
_LOOP_ROLES = ("body", "condition")


@dataclasses.dataclass
class HloModule:
  """An HLO module's text split into computations, and its call graph."""

  lines: list[str]
  entry: str | None
  computations: dict[str, list[str]]  # name -> the instruction lines of its body
  header_line: dict[str, int]  # name -> index of its header in `lines`
  callees: dict[str, list[tuple[str, int, bool]]]  # name -> (callee, times per call, is loop)


def parse(hlo_text: str) -> HloModule:
  lines = hlo_text.splitlines()
  computations: dict[str, list[str]] = {}
  header_line: dict[str, int] = {}
  entry, current = None, None
  for i, line in enumerate(lines):
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      computations[current], header_line[current] = [], i
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      computations[current].append(line)
  callees: dict[str, list[tuple[str, int, bool]]] = {}
  for name, body in computations.items():
    calls = []
    for line in body:
      roles = dict((role, callee) for role, callee in _CALLEE.findall(line))
      trip = _while_trip_count(line, computations.get(roles.get("condition", ""), []))
      for role, callee in roles.items():
        calls.append((callee, trip if role == "body" else 1, role in _LOOP_ROLES))
      for group in _BRANCHES.findall(line):
        calls += [(b.strip().lstrip("%"), 1, False) for b in group.split(",") if b.strip()]
    callees[name] = [c for c in calls if c[0] in computations]
  return HloModule(lines, entry, computations, header_line, callees)


def _while_trip_count(line: str, condition: list[str]) -> int:
  """Iterations of a while loop: XLA's known_trip_count when it annotated one, else the
  bound of the loop condition `counter < constant` (how scan and fori_loop lower, counting
  from 0 in steps of 1); 1 when neither is found."""
  known = _TRIP_COUNT.search(line)
  if known:
    return int(known.group(1))
  if any("direction=LT" in c and "compare(" in c for c in condition):
    bounds = [
      int(b) for c in condition for b in re.findall(r"[su](?:32|64)\[\][^=]*constant\((\d+)\)", c)
    ]
    if len(bounds) == 1:
      return bounds[0]
  return 1


def runs_per_step(module: HloModule) -> dict[str, int]:
  """How many times each computation reachable from the entry runs in one execution (the
  call graph is a DAG: walk it callers before callees)."""
  if module.entry is None:
    return {}
  order, seen = [], set()

  def visit(name: str) -> None:
    if name not in seen:
      seen.add(name)
      for callee, _, _ in module.callees[name]:
        visit(callee)
      order.append(name)

  visit(module.entry)
  runs = dict.fromkeys(order, 0)
  runs[module.entry] = 1
  for name in reversed(order):
    for callee, times, _ in module.callees[name]:
      runs[callee] += runs[name] * times
  return runs


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Instructions of each collective kind in an HLO module's text (async `-start` halves
  count once; ops inside while-loop bodies, e.g. of the scanned layers, count once)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.match(line)
    if m:
      counts[m.group(2)] += 1
  return counts


def _shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array in an HLO type, e.g. a tuple's elements."""
  return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(type_text)]


def _nbytes(shape: tuple[str, tuple[int, ...]]) -> int:
  return math.prod(shape[1]) * _DTYPE_BYTES.get(shape[0], 1)


def _array_bytes(type_text: str) -> list[int]:
  return [_nbytes(shape) for shape in _shapes(type_text)]


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


def collective_traffic(hlo_text: str, num_devices: int) -> dict[str, float]:
  """Bytes each chip sends per step, by collective kind, from a compiled HLO module.

  Collectives inside while loops (the scanned layers, gradient accumulation) are multiplied
  by the loop's trip count, so a scanned 24-layer model counts its per-layer all-gathers 24
  times, unlike `count_collectives`.
  """
  module = parse(hlo_text)
  traffic = dict.fromkeys(COLLECTIVES, 0.0)
  for name, runs in runs_per_step(module).items():
    for line in module.computations[name]:
      m = _COLLECTIVE.match(line)
      if m:
        type_text, kind, start = m.group(1), m.group(2), bool(m.group(3))
        n = _group_size(line, num_devices)
        if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
          # libtpu writes a reduce-scatter as a fusion of an all-reduce and the dynamic
          # slice of this chip's part, and runs it as a reduce-scatter: half the bytes.
          traffic["reduce-scatter"] += runs * _per_chip_traffic(kind, start, type_text, n) / 2
          continue
        traffic[kind] += runs * _per_chip_traffic(kind, start, type_text, n)
  return traffic


def _xla_cost(module: HloModule, entry: str) -> dict[str, float]:
  """XLA's cost analysis of the module with `entry` as its entry computation."""
  import jax
  from jax._src.lib import xla_client  # the cost analysis of an HloModule: no public API
  from jaxlib import _hlo

  lines = ["HloModule cost_of_" + entry.replace(".", "_")]  # no entry layout / aliasing
  for i, line in enumerate(module.lines[1:], start=1):
    if line.startswith("ENTRY "):
      line = line[len("ENTRY ") :]
    if i == module.header_line[entry]:
      line = "ENTRY " + line
    lines.append(line)
  hlo = _hlo.hlo_module_from_text("\n".join(lines))
  client = jax.devices("cpu")[0].client
  cost = xla_client._xla.hlo_module_cost_analysis(client, hlo)
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def per_step_costs(hlo_text: str) -> dict[str, Any]:
  """FLOPs and bytes accessed of one execution, loop bodies counted per iteration.

  Returns {"once": XLA's figures with each body counted once, "per_step": with each body
  counted per iteration, "loops": [{"body", "runs", "flops", "bytes"}] (each body's own cost
  per iteration)}; all from XLA's cost analysis on the CPU client (see the module docstring).
  """
  module = parse(hlo_text)
  runs = runs_per_step(module)
  loops = {c for name in runs for c, _, is_loop in module.callees[name] if is_loop}
  inclusive = {name: _xla_cost(module, name) for name in [module.entry, *sorted(loops)]}

  def nested_loops(name: str) -> set[str]:
    """The loop computations `name` runs directly (not inside another loop of its own)."""
    found, stack, seen = set(), [name], {name}
    while stack:
      for callee, _, is_loop in module.callees[stack.pop()]:
        if is_loop:
          found.add(callee)
        elif callee not in seen:
          seen.add(callee)
          stack.append(callee)
    return found

  per_step = {"flops": 0.0, "bytes": 0.0}
  bodies = []
  for name, cost in inclusive.items():
    own = {
      k: cost[k] - sum(inclusive[n][k] for n in nested_loops(name)) for k in ("flops", "bytes")
    }
    for k in per_step:
      per_step[k] += runs[name] * own[k]
    if name != module.entry and runs[name] > 1:
      bodies.append({"computation": name, "runs": runs[name], **own})
  return {"once": inclusive[module.entry], "per_step": per_step, "loops": bodies}


# Splash kernels: name prefix -> [q, k] x head_dim matmuls per visited (query, key) pair.
SPLASH_MATMULS = {"splash_mha_fwd": 2, "splash_mha_dq": 3, "splash_mha_dkv": 4}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_KERNEL_SCOPE = re.compile(r"splash_blocks_(\d+)x(\d+)_visited_(\d+)")
_OPERANDS = re.compile(
  r"operand_layout_constraints=\{(.*?)\}, (?:frontend_attributes|metadata|backend_config)="
)


def _instructions(lines: list[str]) -> list[tuple[str, str]]:
  """(name, text) of each instruction of a computation, continuation lines joined."""
  out: list[tuple[str, str]] = []
  for line in lines:
    m = _INSTRUCTION.match(line)
    if m:
      out.append((m.group(1), m.group(2)))
    elif out:
      out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
  return out


def splash_call_costs(name: str, text: str) -> dict[str, Any] | None:
  """The kernel (a SPLASH_MATMULS key), FLOPs and HBM bytes of one splash kernel call (None:
  not a splash kernel)."""
  kind = next((k for k in SPLASH_MATMULS if name.startswith(k)), None)
  scope = _KERNEL_SCOPE.search(text)
  operands = _OPERANDS.search(text)
  if kind is None or 'custom_call_target="tpu_custom_call"' not in text or not operands:
    return None
  if scope is None:
    raise ValueError(f"splash kernel {name} has no block-grid scope (model/attention.py)")
  n_q, n_k, visited = (int(g) for g in scope.groups())
  args = _shapes(operands.group(1))
  rank = max(len(dims) for _, dims in args)
  q, k, v = [a for a in args if len(a[1]) == rank][:3]
  results = [r for r in _shapes(text.split(" custom-call(")[0]) if len(r[1]) == rank]
  pairs_per_head = q[1][-2] * k[1][-2] * visited / (n_q * n_k)
  flops = 2.0 * SPLASH_MATMULS[kind] * np.prod(q[1][:-2]) * pairs_per_head * q[1][-1]
  hbm = sum(map(_nbytes, args)) + sum(map(_nbytes, results))
  # The inner loop's arrays are read once per visited block, a 1/n of them each: keys and
  # values (n_k blocks) in the forward and dq kernels, whose outer loop runs over query
  # blocks; queries and the other per-query arrays (n_q blocks) in dkv, the other way round.
  if kind == "splash_mha_dkv":
    streamed = [a for a in args if len(a[1]) == rank and a not in (k, v)]
    hbm += sum(map(_nbytes, streamed)) * (visited / n_q - 1)
  else:
    hbm += (_nbytes(k) + _nbytes(v)) * (visited / n_k - 1)
  return {"kind": kind, "flops": float(flops), "bytes": float(hbm)}


def kernel_costs(hlo_text: str) -> dict[str, Any]:
  """FLOPs and HBM bytes per step of the Pallas kernels XLA's cost analysis leaves out
  (splash attention), each call counted as often as its computation runs; and the calls
  per step by kernel."""
  module = parse(hlo_text)
  total = {"flops": 0.0, "bytes": 0.0, "calls": {}}
  for computation, runs in runs_per_step(module).items():
    for name, text in _instructions(module.computations[computation]):
      costs = splash_call_costs(name, text)
      if costs is None:
        continue
      total["calls"][costs["kind"]] = total["calls"].get(costs["kind"], 0) + runs
      total["flops"] += runs * costs["flops"]
      total["bytes"] += runs * costs["bytes"]
  return total
