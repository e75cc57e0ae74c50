"""Train-step speed: our jitted step vs the machine's measured matmul peak and vs PyTorch.

  python benchmarks/train_step.py [--sizes=base,medium,medium_scan] [--reps=5] [--no-torch]
      [--no-torch-compile] [--no-huge-pages] [--json=benchmarks/results/train_step.json]

For each model size: steady-state step time (after compilation; median and spread of
`--reps` steps), tokens/s, model FLOPs per step (the analytic count of
m6_jax/model/param_count.py, as the progress line and the AOT report take it, and XLA's
cost_analysis of the compiled step as a cross-check), and MFU against a float32 matmul peak measured in the
same run on the same device (before and after the sizes; the better of the two). The PyTorch
reference (benchmarks/torch_reference.py: the same layers, sizes, batch, AdamW and clipping)
runs in the same process on the same CPU threads, in float32, with denormals flushed to
zero as XLA:CPU does, eager and (where it works) torch.compile; the output names the CPU
model (/proc/cpuinfo) and the table gives our step time divided by the reference's (< 1: we are
faster). PyTorch is optional: `pip install -r requirements-bench.txt`. Like `m6_jax.main`,
the benchmark restarts itself once with glibc's transparent-huge-page tunable
(m6_jax/cli/bootstrap.py); both frameworks run under it, in the one process.
`--no-huge-pages` measures without it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from m6_jax.cli import bootstrap  # noqa: E402
from m6_jax.model import param_count  # noqa: E402
from m6_jax.model.m6 import M6Config  # noqa: E402


def medium_config():
  """About 30M parameters at sequence length 256 (64 patches + 96 source + 96 target)."""
  c = base.get_config()
  c.model.vocab_size = 8192
  c.model.d_model = 512
  c.model.num_layers = 8
  c.model.num_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 2048
  c.data.image_size = 128
  c.data.src_len = 96
  c.data.tgt_len = 96
  c.data.batch_size = 8
  return c


def medium_scan_config():
  """`medium` with the layers under `nn.scan`, remat keeping the weight matmuls' outputs and
  the attention probabilities and output (the backward pass recomputes norms and GELU only)."""
  c = medium_config()
  c.model.scan_layers = True
  c.model.remat_policy = "dots_and_attention_saveable"
  return c


SIZES = {"base": base.get_config, "medium": medium_config, "medium_scan": medium_scan_config}
# Sizes that differ from another only in how JAX compiles the stack: the PyTorch reference
# is the same model, so it is timed once and shared.
SAME_TORCH_MODEL = {"medium_scan": "medium"}


def measured_peak_flops(n: int = 2048, reps: int = 10) -> float:
  """float32 matmul FLOP/s of this device, measured now (best of `reps`)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  times = common.time_calls(lambda: matmul(a, a).block_until_ready(), reps)
  return 2 * n**3 / min(times)


def bench_jax(config, reps: int) -> dict:
  step, state, batch, mesh_context = common.jax_train_step(config)
  holder = {"state": state}
  with mesh_context:
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    def run():
      holder["state"], metrics = step(holder["state"], batch)
      jax.block_until_ready(metrics)

    times = common.time_calls(run, reps)
  return dict(common.summarize(times), xla_flops=float(cost.get("flops", float("nan"))))


def bench_torch(config, reps: int, compile_model: bool) -> dict:
  import torch
  from torch_reference import TorchM6, make_train_step

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  # XLA:CPU flushes denormal floats to zero; without the same setting PyTorch's step slows
  # down as small values appear (on an Intel Xeon its medium step took 3.9 s instead of
  # 2.25 s), which would flatter our ratio.
  if not torch.set_flush_denormal(True):
    print("warning: PyTorch cannot flush denormals on this CPU; its step may be slowed by them")
  model = TorchM6(M6Config.from_config(config))
  if compile_model:
    model = torch.compile(model)
  t = config.train
  step = make_train_step(model, t.lr, t.weight_decay, t.grad_clip_norm)
  batch = {
    k: torch.from_numpy(np.asarray(v).astype(np.int64 if v.dtype.kind == "i" else np.float32))
    for k, v in common.random_features_batch(config.data.batch_size, config).items()
  }
  times = common.time_calls(lambda: step(batch), reps)
  return common.summarize(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="base,medium,medium_scan", help=f"from {sorted(SIZES)}")
  parser.add_argument("--reps", type=int, default=5, help="timed steps per measurement")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile")
  parser.add_argument(
    "--no-huge-pages",
    action="store_true",
    help="run as started, without restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "
    "(m6_jax/cli/bootstrap.py; the setting applies to both frameworks, one process)",
  )
  parser.add_argument(
    "--json", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json")
  )
  args = parser.parse_args()
  memory = "host memory: as started" if args.no_huge_pages else bootstrap.restart_with_huge_pages()

  # The MFU denominator: the better of two peak measurements, before and after the sizes,
  # so that a busy moment on a shared machine during one of them does not inflate MFU.
  peak_before = measured_peak_flops()
  device = jax.devices()[0]
  threads = os.cpu_count()
  cpu = common.cpu_model()
  print(
    f"device: {device.device_kind} x{jax.device_count()} ({cpu}), {threads} CPU threads for "
    f"both frameworks, float32, denormals flushed in both\n{memory}, for both"
  )
  results = {
    "device": str(device.device_kind),
    "cpu_model": cpu,
    "threads": threads,
    "huge_pages": bootstrap.huge_pages_enabled(),
    "sizes": {},
  }
  header = (
    f"{'size':<15} {'params':>8} {'seq':>5} {'batch':>5} {'step ms':>9} {'spread':>7} "
    f"{'tokens/s':>9} {'GFLOP/step':>10} {'XLA/ours':>8} {'MFU':>6} "
    f"{'torch ms':>9} {'ratio':>6} {'compiled ms':>11} {'ratio':>6}"
  )
  rows = []
  for name in args.sizes.split(","):
    config = SIZES[name]()
    c = M6Config.from_config(config)
    batch = config.data.batch_size
    flops = param_count.train_flops(config, param_count.count_params(config))
    ours = bench_jax(config, args.reps)
    row = {"jax": ours, "model_flops": flops, "seq_len": c.seq_len, "batch": batch}
    row["params"] = param_count.count_params(config)["total"]
    row["tokens_per_sec"] = batch * c.seq_len / ours["median_s"]
    shared = results["sizes"].get(SAME_TORCH_MODEL.get(name, ""), {})
    if not args.no_torch and "torch_eager" in shared:
      for key in ("torch_eager", "torch_compile"):
        if "median_s" in shared.get(key, {}):
          row[key] = shared[key]
          row[f"ratio_to_{key}"] = ours["median_s"] / shared[key]["median_s"]
    elif not args.no_torch:
      row["torch_eager"] = bench_torch(config, args.reps, compile_model=False)
      row["ratio_to_torch_eager"] = ours["median_s"] / row["torch_eager"]["median_s"]
      if not args.no_torch_compile:
        try:
          row["torch_compile"] = bench_torch(config, args.reps, compile_model=True)
          row["ratio_to_torch_compile"] = ours["median_s"] / row["torch_compile"]["median_s"]
        except Exception as e:  # a missing compiler toolchain must not lose the other figures
          row["torch_compile"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    results["sizes"][name] = row
    rows.append((name, row))

  peak_after = measured_peak_flops()
  peak = max(peak_before, peak_after)
  results["peak_flops"] = peak
  results["peak_flops_measured"] = [peak_before, peak_after]
  for _, row in rows:
    row["mfu"] = row["model_flops"] / row["jax"]["median_s"] / peak
  print(
    f"measured float32 matmul peak: {peak_before / 1e9:.1f} GFLOP/s before the sizes, "
    f"{peak_after / 1e9:.1f} after; MFU uses {peak / 1e9:.1f}"
  )
  print(header)
  for name, row in rows:
    te = row.get("torch_eager", {}).get("median_s")
    tc = row.get("torch_compile", {}).get("median_s")
    print(
      f"{name:<15} {row['params'] / 1e6:>7.1f}M {row['seq_len']:>5} {row['batch']:>5} "
      f"{row['jax']['median_s'] * 1e3:>9.1f} {row['jax']['spread']:>6.0%} "
      f"{row['tokens_per_sec']:>9.0f} {row['model_flops'] / 1e9:>10.2f} "
      f"{row['jax']['xla_flops'] / row['model_flops']:>8.2f} {row['mfu']:>6.1%} "
      + (f"{te * 1e3:>9.1f} {row['ratio_to_torch_eager']:>6.2f} " if te else f"{'-':>9} {'-':>6} ")
      + (
        f"{tc * 1e3:>11.1f} {row['ratio_to_torch_compile']:>6.2f}" if tc else f"{'-':>11} {'-':>6}"
      )
    )
    if "error" in row.get("torch_compile", {}):
      print(f"  torch.compile failed: {row['torch_compile']['error']}")
  print(
    "ratio = our step time / reference step time (< 1: ours is faster); MFU = analytic "
    "model FLOPs / step time / measured matmul peak; XLA/ours = cost_analysis FLOPs / "
    "analytic FLOPs (a scanned stack's loop body is counted once by XLA)"
  )
  common.write_json(args.json, results)


if __name__ == "__main__":
  main()
