"""Every paper config compiled ahead of time for its TPU topology: the table in docs/performance.md.

  pip install -r requirements-aot.txt
  python benchmarks/aot_table.py [--configs=m6_base,m6_large,m6_10b,m6_100b,m6_t_1t,m6_10t]
      [--attention=xla,splash] [--json=benchmarks/results/aot_table.json]

Each config is compiled once per attention kernel (`--config.model.attention_impl`), each
compile in its own process (`python -m m6_jax.main --mode=aot`, topology from the config
file's TOPOLOGY), so the compiler's memory is returned between them; the JSON reports are
gathered into one JSON file and a markdown table whose rows name the attention that ran.
A compile takes one to three minutes on 2 cores (M6-10T needs about 10 GB of host memory).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository on sys.path)

PAPER_CONFIGS = ("m6_base", "m6_large", "m6_10b", "m6_100b", "m6_t_1t", "m6_10t")


def compile_config(name: str, attention: str, out_dir: str) -> dict:
  output = os.path.join(out_dir, f"{name}_{attention}.json")
  cmd = [
    sys.executable, "-m", "m6_jax.main", "--mode=aot", f"--config=configs/{name}.py",
    f"--config.model.attention_impl={attention}", f"--aot_output={output}",
  ]  # fmt: skip
  print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[1:])}", flush=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise SystemExit(f"--mode=aot failed for {name} (exit {proc.returncode}):\n{tail}")
  with open(output) as f:
    return json.load(f)


def table(reports: dict[str, dict]) -> str:
  rows = [
    "| config | attention | params | topology | mesh | tokens per chip | remat | memory per chip | "
    "compute / HBM / comm. per step | GB sent per chip | bound | MFU estimate (bound) | compile |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in reports.items():
    m, rl, c = r["memory_per_chip_gib"], r["roofline"], r["config"]
    mesh = " x ".join(f"{k} {v}" for k, v in c["mesh"].items() if v > 1) or "1 chip"
    sent = sum(r["collective_bytes_per_chip"].values()) / 1e9
    fits = "" if m["fits"] else " (DOES NOT FIT)"
    rows.append(
      f"| {name.split(':')[0]} | {c['attention']} | {r['params'] / 1e9:,.1f}B | {r['topology']} ({r['chips']} chips) | {mesh} | "
      f"{c['tokens_per_chip']:,} | {c['remat_policy']} | {m['total']:.1f} of {m['hbm']} GiB{fits}"
      f" | {rl['compute_step_s'] * 1e3:.1f} / {rl['memory_step_s'] * 1e3:.1f} / "
      f"{rl['communication_step_s'] * 1e3:.1f} ms | {sent:.2f} | {rl['bound']} | "
      f"{100 * rl['mfu_estimate']:.0f}% ({100 * rl['mfu_upper_bound']:.0f}%) | "
      f"{r['compile_seconds']:.0f} s |"
    )
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(PAPER_CONFIGS))
  parser.add_argument("--attention", default="xla,splash", help="model.attention_impl values")
  parser.add_argument(
    "--json", default=os.path.join(os.path.dirname(__file__), "results", "aot_table.json")
  )
  args = parser.parse_args()
  names = [n for n in args.configs.split(",") if n]
  for name in names:  # fail on a typo before minutes of compiling
    importlib.import_module(f"configs.{name}")
  reports = {}
  with tempfile.TemporaryDirectory() as out_dir:
    for name in names:
      for attention in [a for a in args.attention.split(",") if a]:
        key = f"{name}:{attention}"
        reports[key] = compile_config(name, attention, out_dir)
        print(table({key: reports[key]}).splitlines()[-1], flush=True)
  print(table(reports))
  common.write_json(args.json, reports)


if __name__ == "__main__":
  main()
