"""Ahead-of-time compilation of the real train step for a TPU topology, on this CPU.

  pip install -r requirements-aot.txt      # libtpu: the TPU compiler, no TPU needed
  python -m m6_jax.main --mode=aot --config=configs/m6_10b.py --topology=v5p:4x4x4 \\
    --aot_output=/tmp/m6_10b_aot.json

`jax.experimental.topologies.get_topology_desc` describes the chips of a TPU slice without
any TPU being present; the train step (same model, optimizer, shardings and donation as
`train/loop.py`) is lowered with abstract inputs and compiled by libtpu for that slice. We
report per-chip memory (arguments, outputs, temporaries, total against the chip's HBM), the
compiled FLOPs, an analytic MFU bound and the collectives in the compiled HLO, print them and
write them as JSON.

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
import jax.numpy as jnp
import ml_collections
import numpy as np

from m6_jax import config as config_lib
from m6_jax.model import param_count
from m6_jax.model.m6 import M6, M6Config
from m6_jax.parallel import partitioning
from m6_jax.train import optim
from m6_jax.train import state as state_lib
from m6_jax.train import step as step_lib

# Per chip: HBM (GiB), peak bf16 TFLOP/s, HBM bandwidth (TB/s) (public Cloud TPU figures).
CHIPS = {
  "v4": (32, 275, 1.2),
  "v5e": (16, 197, 0.82),
  "v5p": (95, 459, 2.76),
  "v6e": (32, 918, 1.64),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
NUM_TASKS = 4


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


def abstract_batch(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The train batch's shapes (global batch) as produced by m6_jax/data/tasks.py."""
  d = config.data
  b = d.batch_size
  f32, i32 = jnp.float32, jnp.int32
  return {
    "image": jax.ShapeDtypeStruct((b, d.image_size, d.image_size, 3), f32),
    "has_image": jax.ShapeDtypeStruct((b,), i32),
    "src_tokens": jax.ShapeDtypeStruct((b, d.src_len), i32),
    "tgt_input": jax.ShapeDtypeStruct((b, d.tgt_len), i32),
    "tgt_target": jax.ShapeDtypeStruct((b, d.tgt_len), i32),
    "tgt_weights": jax.ShapeDtypeStruct((b, d.tgt_len), f32),
    "task_id": jax.ShapeDtypeStruct((b,), i32),
  }


def model_flops_per_step(config: ml_collections.ConfigDict, counts: dict[str, int]) -> float:
  """Analytic training FLOPs of one step (forward + backward = 3x forward, no remat).

  6 * (active non-embedding params) per token over the whole sequence, + the LM head on the
  target positions, + attention scores and mixing (12 * layers * seq^2 * heads*head_dim per
  sequence, fwd+bwd).
  """
  m, d = config.model, config.data
  c = M6Config.from_config(config)
  seq, b = c.seq_len, d.batch_size
  dense_params = counts["active per token"] - counts["embeddings"]
  flops = 6.0 * dense_params * b * seq
  flops += 6.0 * m.vocab_size * m.d_model * b * d.tgt_len
  flops += 12.0 * m.num_layers * seq * seq * m.num_heads * m.head_dim * b
  return flops


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Instructions of each collective kind in an HLO module's text (async `-start` halves
  count once; ops inside while-loop bodies, e.g. of the scanned layers, count once)."""
  counts = {}
  for name in COLLECTIVES:
    counts[name] = len(re.findall(rf"(?<![\w-]){name}(?:-start)?\(", hlo_text))
  return counts


def compile_train_step(config: ml_collections.ConfigDict, devices: list[Any]) -> Any:
  config_lib.validate(config, len(devices))
  mesh = partitioning.make_mesh(config, devices)
  rules = partitioning.logical_rules(config)
  model = M6(M6Config.from_config(config))
  tx = optim.make_optimizer(config.train)
  schedule = optim.learning_rate_schedule(config.train)
  shardings = state_lib.state_shardings(model, tx, mesh, rules)
  state = state_lib.abstract_state(model, tx, shardings)
  batch = abstract_batch(config)
  batch_sh = partitioning.batch_shardings(batch, mesh, rules)
  batch = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), batch, batch_sh
  )
  step = step_lib.jit_train_step(
    step_lib.make_train_step(model, tx, schedule, config.train, NUM_TASKS),
    shardings,
    batch_sh,
    partitioning.replicated(mesh),
  )
  with partitioning.mesh_context(mesh, rules):
    return step.lower(state, batch).compile()


def analyse(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
  devices = topology_devices(topology)
  chip = topology.split(":")[0]
  hbm_gib, peak_tflops, hbm_tbps = CHIPS.get(chip, (float("nan"),) * 3)
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
  model_flops = model_flops_per_step(config, counts)
  peak = peak_tflops * 1e12
  # Roofline lower bound on the step time per chip (ignores communication and overlap).
  t_compute = model_flops / chips / peak
  t_memory = bytes_accessed / (hbm_tbps * 1e12) if np.isfinite(bytes_accessed) else 0.0
  t_step = max(t_compute, t_memory)
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
      "step_s_lower_bound": t_step,
      "mfu_upper_bound": (model_flops / chips / peak) / t_step if t_step else float("nan"),
    },
    "collectives": count_collectives(hlo),
    "_hlo_text": hlo,
  }


def format_report(r: dict[str, Any]) -> str:
  m, f, rl = r["memory_per_chip_gib"], r["flops_per_step"], r["roofline"]
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
    f"roofline: compute {rl['compute_bound_step_s'] * 1e3:.1f} ms, memory "
    f"{rl['memory_bound_step_s'] * 1e3:.1f} ms -> step >= {rl['step_s_lower_bound'] * 1e3:.1f} ms,"
    f" MFU <= {100 * rl['mfu_upper_bound']:.1f}% (peak {rl['peak_tflops_per_chip']} TFLOP/s)",
    "collectives in the compiled HLO: "
    + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()),
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
