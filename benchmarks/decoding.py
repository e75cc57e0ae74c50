"""Decoding speed: KV-cached vs uncached greedy decoding (tokens/s).

  python benchmarks/decoding.py [--lengths=16,64] [--batch_sizes=1,8] [--json=PATH]

The model is configs/base.py (4 layers, d_model 128) with data.tgt_len = the output
length (one model per length), random parameters and random prefixes (image + source text). Every row decodes
exactly `length` tokens (EOS is set to an id that never wins, so no row stops early).
Uncached decoding reruns the whole model over [image ; source ; target] every step, so its
time per token grows with the length; the cached path feeds one token per step, so its time
per token stays (nearly) flat. The table shows tokens/s and the ratio of time per token at
the longest vs the shortest length for each path. Writes JSON (default
benchmarks/results/decoding.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from m6_jax.infer import decoding  # noqa: E402
from m6_jax.infer import generate as gen  # noqa: E402


def _config(tgt_len: int):
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import base  # configs/base.py

  config = base.get_config()
  config.data.tgt_len = tgt_len
  return config


def _batch(config, batch_size: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  d = config.data
  src = rng.integers(4, config.model.vocab_size, (batch_size, d.src_len)).astype(np.int32)
  return {
    "image": rng.random((batch_size, d.image_size, d.image_size, 3), dtype=np.float32),
    "has_image": np.ones((batch_size,), np.int32),
    "src_tokens": src,
  }


def _time(fn, reps: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(lengths, batch_sizes, reps: int, make_config=_config) -> list[dict]:
  """The rows of the table; `make_config(length)` gives the model's config (default:
  configs/base.py with data.tgt_len = length)."""
  never = -1  # an id no argmax returns: every row decodes `length` tokens
  rows = []
  models = {}
  for length in lengths:  # data.tgt_len = length: the uncached path reruns exactly that
    loaded = gen.init_model(make_config(length), tokenizer=None)
    models[length] = (loaded.config, loaded.model, loaded.params)
  for path in ("cached", "uncached"):
    strategy = "greedy" if path == "cached" else "greedy_uncached"
    for batch_size in batch_sizes if path == "cached" else [1]:
      for length in lengths:
        config, model, params = models[length]
        batch = _batch(config, batch_size)
        seconds = _time(
          lambda: decoding.decode(model, params, batch, strategy, length, 2, never), reps
        )
        rows.append(
          {
            "path": path,
            "batch_size": batch_size,
            "length": length,
            "seconds": seconds,
            "tokens_per_sec": batch_size * length / seconds,
            "ms_per_token_step": 1000 * seconds / length,
          }
        )
        print(f"{path:8s} batch {batch_size:2d} length {length:3d}: {seconds * 1000:8.1f} ms")
  return rows


def table(rows: list[dict], lengths) -> str:
  lo, hi = min(lengths), max(lengths)
  lines = [
    "| path | batch | "
    + " | ".join(f"tok/s @{n}" for n in lengths)
    + f" | ms/step @{lo} | ms/step @{hi} | time/token ratio {hi}/{lo} |",
    "|" + " --- |" * (len(lengths) + 5),
  ]
  keys = sorted({(r["path"], r["batch_size"]) for r in rows})
  for path, b in keys:
    by_len = {r["length"]: r for r in rows if r["path"] == path and r["batch_size"] == b}
    ratio = by_len[hi]["ms_per_token_step"] / by_len[lo]["ms_per_token_step"]
    lines.append(
      f"| {path} | {b} | "
      + " | ".join(f"{by_len[n]['tokens_per_sec']:,.0f}" for n in lengths)
      + f" | {by_len[lo]['ms_per_token_step']:.2f} | {by_len[hi]['ms_per_token_step']:.2f}"
      + f" | {ratio:.2f} |"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="16,64", help="output lengths, comma separated")
  parser.add_argument("--batch_sizes", default="1,8", help="batch sizes for the cached path")
  parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
  parser.add_argument(
    "--json", default=os.path.join(REPO, "benchmarks", "results", "decoding.json")
  )
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
  rows = run(lengths, batch_sizes, args.reps)
  text = table(rows, lengths)
  print(text)
  print(
    "Uncached decoding reruns the full sequence each step (time per token grows with the "
    "length); the cached path's time per token should stay flat (ratio near 1)."
  )
  common.write_json(
    args.json,
    {
      "device": str(jax.devices()[0]),
      "platform": platform.platform(),
      "lengths": lengths,
      "rows": rows,
      "table": text,
    },
  )


if __name__ == "__main__":
  main()
