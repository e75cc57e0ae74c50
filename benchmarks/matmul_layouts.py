"""Kernel-gradient matmuls: JAX's derivative of x @ W vs layers.Dense's, with PyTorch's.

  python benchmarks/matmul_layouts.py [--tokens=2048] [--d-model=512] [--mlp-dim=2048]
      [--reps=20] [--no-torch] [--json=benchmarks/results/matmul_layouts.json]

For the two MLP kernels of the medium benchmark model ([d_model, mlp_dim] and [mlp_dim,
d_model], `tokens` = batch x length rows), times the kernel gradient x^T dY alone, as
GFLOP/s: as JAX differentiates x @ W (XLA picks the operand layouts), through
`ops.dense`'s backward pass (on CPU: the narrower operand copied to [features, tokens],
see docs/performance.md (7)), and PyTorch's `x.T @ dY` on the same threads (optional:
requirements-bench.txt). Runs under the same huge-page setting as benchmarks/train_step.py.
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

from m6_jax.cli import bootstrap  # noqa: E402
from m6_jax.model import ops  # noqa: E402


def kernel_grad(dense):
  """jit(x, w, d_y -> d_w) for `dense(x, w)`."""
  return jax.jit(lambda x, w, d_y: jax.vjp(lambda w: dense(x, w), w)[1](d_y)[0])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=2048, help="rows of x (batch x length)")
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--mlp-dim", type=int, default=2048)
  parser.add_argument("--reps", type=int, default=20, help="timed calls per measurement")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument(
    "--json", default=os.path.join(os.path.dirname(__file__), "results", "matmul_layouts.json")
  )
  args = parser.parse_args()
  print(bootstrap.restart_with_huge_pages())
  rng = np.random.default_rng(0)
  forms = {"jax_autodiff": kernel_grad(jnp.dot), "layers_dense": kernel_grad(ops.dense)}
  results = {"device": str(jax.devices()[0].device_kind), "tokens": args.tokens, "kernels": {}}
  print(f"{'kernel':<14} {'JAX autodiff':>13} {'layers.Dense':>13} {'torch':>8}   (GFLOP/s)")
  for n_in, n_out in ((args.d_model, args.mlp_dim), (args.mlp_dim, args.d_model)):
    x = rng.standard_normal((args.tokens, n_in)).astype(np.float32)
    d_y = rng.standard_normal((args.tokens, n_out)).astype(np.float32)
    w = np.zeros((n_in, n_out), np.float32)
    flops = 2 * args.tokens * n_in * n_out
    row = {}
    for name, fn in forms.items():
      xj, wj, dj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(d_y)
      times = common.time_calls(lambda: fn(xj, wj, dj).block_until_ready(), args.reps)
      row[name] = flops / min(times) / 1e9
    if not args.no_torch:
      import torch

      torch.set_num_threads(os.cpu_count() or 1)
      xt, dt = torch.from_numpy(x), torch.from_numpy(d_y)
      row["torch"] = flops / min(common.time_calls(lambda: xt.T @ dt, args.reps)) / 1e9
    key = f"[{n_in}, {n_out}]"
    results["kernels"][key] = row
    torch_cell = f"{row['torch']:>8.1f}" if "torch" in row else f"{'-':>8}"
    print(f"{key:<14} {row['jax_autodiff']:>13.1f} {row['layers_dense']:>13.1f} {torch_cell}")
  common.write_json(args.json, results)


if __name__ == "__main__":
  main()
