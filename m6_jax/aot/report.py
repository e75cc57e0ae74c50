"""Ahead-of-time compilation of the real train step for a TPU topology, on this CPU.

  pip install -r requirements-aot.txt      # libtpu: the TPU compiler, no TPU needed
  python -m m6_jax.main --mode=aot --config=configs/m6_10b.py --topology=v5p:4x4x4 \\
    --aot_output=/tmp/m6_10b_aot.json

`jax.experimental.topologies.get_topology_desc` describes the chips of a TPU slice without
any TPU being present; the train step (built by `train/setup.py`, as the train loop builds
it: same model, optimizer, shardings and donation) is lowered with abstract inputs and
compiled by libtpu for that slice. We report per-chip memory (arguments, outputs,
temporaries, total against the chip's HBM), the compiled FLOPs and HBM bytes, the
collectives in the compiled HLO with the bytes each chip sends in them (all three with
every while-loop body counted once per iteration, m6_jax/aot/hlo_costs.py), the step time each
of them implies, which one bounds the step, and an MFU estimate; we print them and write
them as JSON. The MFU's model FLOPs are the analytic count of `model/param_count.py`, the
one the progress line and the benchmarks use; XLA's cost analysis gives the executed FLOPs
and the bytes, to which the Pallas kernels' (splash attention), which it does not see, are
added analytically. Each report names the attention that ran.

Environment: JAX_PLATFORMS is forced to cpu (the TPU platform is only used through the
topology), so that no TPU backend is initialised; TPU_WORKER_HOSTNAMES=localhost quiets
libtpu's search for TPU workers. Without libtpu installed, `run` stops with a ConfigError
saying how to install it; nothing else in the project needs libtpu.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections

from m6_jax import config as config_lib
from m6_jax.aot import hlo_costs
from m6_jax.model import param_count
from m6_jax.model.m6 import M6Config
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


def compile_train_step(
  config: ml_collections.ConfigDict, devices: list[Any], compiler_options: dict | None = None
) -> Any:
  """The train step of `config` (train/setup.py, as the loop builds it) compiled for `devices`
  (`compiler_options`: XLA options of this compile, over those of XLA_FLAGS)."""
  config_lib.validate(config, len(devices))
  setup = setup_lib.build(config, devices)
  # The abstract inputs outside the mesh context: tracing the initialiser makes a PRNG key,
  # which must not be placed on the topology's devices (there are none here).
  state, batch = setup.abstract_state(), setup.abstract_batch()
  with setup.mesh_context():
    return setup.step.lower(state, batch).compile(compiler_options)


def roofline(
  flops: float, model_flops: float, hbm_bytes: float, sent_bytes: float, chip: str
) -> dict[str, Any]:
  """Step time per chip from three terms, and which one bounds the step.

  compute: the FLOPs XLA compiled (remat's recomputation and MoE dispatch einsums included)
  plus the kernels' analytic FLOPs (hlo_costs.kernel_costs), never less than the model's, at
  the chip's peak; memory: the HBM bytes XLA's cost analysis counts plus the kernels', at
  the HBM bandwidth; communication: the bytes the chip sends in collectives, at
  its ICI bandwidth. Overlap: compute and HBM traffic overlap (roofline: the larger of the
  two). Communication is either not overlapped at all (the step estimate) or overlapped
  fully (the lower bound on the step); XLA's async collectives and the latency-hiding
  scheduler land in between. MFU counts the model FLOPs only.
  """
  _, peak_tflops, hbm_tbps, ici_gbps = CHIPS.get(chip, (float("nan"),) * 4)
  peak = peak_tflops * 1e12
  terms = {
    "compute": max(flops, model_flops) / peak,
    "memory": hbm_bytes / (hbm_tbps * 1e12),
    "communication": sent_bytes / (ici_gbps * 1e9),
  }
  t_model = model_flops / peak
  t_step = max(terms.values())
  t_serial = max(terms["compute"], terms["memory"]) + terms["communication"]
  return {
    "peak_tflops_per_chip": peak_tflops,
    "hbm_tb_per_s": hbm_tbps,
    "ici_gb_per_s": ici_gbps,
    "model_flops_step_s": t_model,
    "compute_step_s": terms["compute"],
    "memory_step_s": terms["memory"],
    "communication_step_s": terms["communication"],
    "bound": max(terms, key=terms.get),
    "step_s_lower_bound": t_step,
    "step_s_no_overlap": t_serial,
    "mfu_upper_bound": t_model / t_step if t_step else float("nan"),
    "mfu_estimate": t_model / t_serial if t_serial else float("nan"),
  }


def analyse(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
  devices = topology_devices(topology)
  chip = topology.split(":")[0]
  hbm_gib = CHIPS.get(chip, (float("nan"),) * 4)[0]
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
  # XLA's figures for this chip count each while-loop body once; scale them by how much the
  # loop bodies add when counted per iteration (m6_jax/aot/hlo_costs.py).
  loops = hlo_costs.per_step_costs(hlo)
  once, per_step = loops["once"], loops["per_step"]
  flops_once = float(cost.get("flops", 0.0))
  bytes_once = float(cost.get("bytes accessed", 0.0))
  flops = flops_once * (per_step["flops"] / once["flops"] if once["flops"] else 1.0)
  hbm_bytes = bytes_once * (per_step["bytes"] / once["bytes"] if once["bytes"] else 1.0)
  # XLA counts nothing for a Pallas kernel: add the splash kernels' analytic FLOPs and bytes.
  kernels = hlo_costs.kernel_costs(hlo)

  counts = param_count.count_params(config)
  chips = len(devices)
  model_flops = param_count.train_flops(config, counts)
  traffic = hlo_costs.collective_traffic(hlo, chips)
  times = roofline(
    flops + kernels["flops"],
    model_flops / chips,
    hbm_bytes + kernels["bytes"],
    sum(traffic.values()),
    chip,
  )
  return {
    "config": {
      "d_model": config.model.d_model,
      "num_layers": config.model.num_layers,
      "architecture": config.model.architecture,
      "stack_layers": config_lib.stack_depths(config.model),
      "moe_num_experts": config.model.moe_num_experts,
      "batch_size": config.data.batch_size,
      "tokens_per_chip": config.data.batch_size * M6Config.from_config(config).seq_len // chips,
      "remat_policy": config.model.remat_policy,
      # What ran, read from the program: "auto" and OFA's biased attention may not be splash.
      "attention": "splash"
      if kernels["calls"]
      else config.model.attention_impl.replace("auto", "xla"),
      "moe_capacity_factor": config.model.moe_capacity_factor,
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
      "compiled_per_chip": flops + kernels["flops"],
      "xla_per_chip": flops,
      "kernels_per_chip": kernels["flops"],
      "compiled_per_chip_loop_bodies_once": flops_once,
      "model_analytic_total": model_flops,
      "model_analytic_per_chip": model_flops / chips,
    },
    "bytes_accessed_per_chip": hbm_bytes + kernels["bytes"],
    "bytes_accessed_per_chip_kernels": kernels["bytes"],
    "kernel_calls_per_step": kernels["calls"],
    "bytes_accessed_per_chip_loop_bodies_once": bytes_once,
    "loop_bodies": loops["loops"],
    "roofline": times,
    "collectives": hlo_costs.count_collectives(hlo),
    "collective_bytes_per_chip": traffic,
    "_hlo_text": hlo,
  }


def format_report(r: dict[str, Any]) -> str:
  m, f, rl = r["memory_per_chip_gib"], r["flops_per_step"], r["roofline"]
  comm_gb = sum(r["collective_bytes_per_chip"].values()) / 1e9
  c = r["config"]
  lines = [
    f"AOT train step on {r['topology']} ({r['chips']} x {r['device_kind']}), mesh "
    f"{dict(c['mesh'])}, {c['tokens_per_chip']:,} tokens per chip, remat "
    f"{c['remat_policy']}, attention {c['attention']}, compiled in {r['compile_seconds']:.1f}s",
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
    f"per chip and step (loop bodies counted per iteration): FLOPs {f['compiled_per_chip']:.3e}"
    f" (XLA {f['xla_per_chip']:.3e} + kernels {f['kernels_per_chip']:.3e}; model "
    f"{f['model_analytic_per_chip']:.3e}), HBM bytes {r['bytes_accessed_per_chip'] / 1e9:.2f} GB"
    f" (kernels {r['bytes_accessed_per_chip_kernels'] / 1e9:.2f}), sent in collectives "
    f"{comm_gb:.2f} GB",
    f"step time per chip: compute {rl['compute_step_s'] * 1e3:.1f} ms (at "
    f"{rl['peak_tflops_per_chip']} TFLOP/s; model FLOPs alone {rl['model_flops_step_s'] * 1e3:.1f}"
    f" ms), memory {rl['memory_step_s'] * 1e3:.1f} ms (at {rl['hbm_tb_per_s']} TB/s), "
    f"communication {rl['communication_step_s'] * 1e3:.1f} ms (at {rl['ici_gb_per_s']} GB/s ICI)",
    f"bound: {rl['bound']}. MFU estimate {100 * rl['mfu_estimate']:.1f}% (compute and HBM "
    f"overlapped, communication not: step {rl['step_s_no_overlap'] * 1e3:.1f} ms); upper bound "
    f"{100 * rl['mfu_upper_bound']:.1f}% (all overlapped: step "
    f"{rl['step_s_lower_bound'] * 1e3:.1f} ms)",
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
