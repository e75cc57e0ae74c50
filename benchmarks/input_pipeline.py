"""Input pipeline throughput next to the train step's, for the base config.

  python benchmarks/input_pipeline.py [--batches=60] [--json=benchmarks/results/input_pipeline.json]

Measures examples/s of the full grain pipeline (render or JPEG-decode + tokenize + task
features + batch) for the synthetic world, for a prepared TFDS dataset of JPEG files and for
the same JPEGs streamed from WebDataset and Parquet shards (data.source='shards'), and
examples/s of the jitted train step of configs/base.py on the same machine in the same run.
For the WebDataset shards also decoded images/s of one thread (read + decode + resize of a
record, no task): the rate each core adds.

At the paper configs' resolution: WebDataset shards of photo-like JPEGs (the world's scenes
with pixel noise, so that they compress as photos do, not as flat drawings; img2dataset's
256 px at quality 95, and 512 px) read, decoded and resized to 224 px by 1 and 2 threads,
beside the rate one host of an M6-10B slice consumes: its global batch over the slice's
hosts (4 chips each on v5p) per step, at the step time `--mode=aot` estimates for it
(`--m6_10b_step_ms`, docs/performance.md).
The pipeline must not be the bottleneck: the printed ratio (pipeline / train step) must be
above 1. Both run on the same cores here, so the ratio is a conservative bound: on an
accelerator the step leaves the CPU to the pipeline.

Padding efficiency (length bucketing, config.data.length_bucket / bucket_window): for no
bucketing, bucketing, and bucketing + window sort, the fraction of text positions per batch
that hold a real token (source != 0, target weight > 0) over `--batches` batches of the
synthetic pipeline, and examples/s of the base config's jitted train step fed those batches
(every batch shape compiled before timing; the median of `--reps` passes over `--steps`
batches).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository on sys.path)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from configs import base, m6_10b  # noqa: E402
from m6_jax.data import (  # noqa: E402
  export_world,
  pipeline,
  prepare,
  shard_files,
  shard_source,
  shard_writer,
  synthetic,
)
from m6_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from m6_jax.parallel import partitioning  # noqa: E402

V5P_CHIPS_PER_HOST = 4
PAPER_IMAGE_SIZE = 224  # configs/m6_base.py's data.image_size, shared by the paper configs
# (JPEG side, quality): img2dataset's default resize and quality, and larger photos
PHOTO_SHARDS = ((256, 95), (512, 95))

# (name, data.length_bucket, data.bucket_window)
BUCKETING = (
  ("no bucketing (src_len x tgt_len)", 0, 0),
  ("length_bucket=8", 8, 0),
  ("length_bucket=8 + bucket_window=16", 8, 16),
)


def pipeline_rate(config, tokenizer, batches: int) -> float:
  it = pipeline.make_iterator(config, tokenizer, process_index=0, process_count=1)
  next(it)  # start-up (thread pool, first reads) is not throughput
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * config.data.batch_size / (time.perf_counter() - start)


def make_jpeg_dataset(root: str, count: int) -> tuple[str, str]:
  """A prepared TFDS dataset of `count` JPEG images of the synthetic world, with captions."""
  images = os.path.join(root, "images")
  os.makedirs(images)
  with open(os.path.join(root, "captions.jsonl"), "w") as f:
    for i in range(count):
      example = synthetic.make_example(1, i, 96)
      Image.fromarray(example["image"]).save(os.path.join(images, f"{i}.jpg"), quality=90)
      f.write(json.dumps({"image": f"images/{i}.jpg", "caption": example["caption_en"]}) + "\n")
  data_dir = os.path.join(root, "tfds")
  prepare.prepare_data(
    "image_folder_jsonl",
    os.path.join(root, "captions.jsonl"),
    data_dir,
    "bench",
    print_fn=lambda *a, **k: None,
  )
  return data_dir, "bench"


def make_jpeg_shards(root: str, count: int, fmt: str) -> str:
  """`count` JPEG images of the world (96 px) as `fmt` shards of 128 records; their pattern."""
  paths = export_world.export(os.path.join(root, fmt), count, 1, 96, "en", 1, fmt, 128, "jpg")
  return paths["train"]


def make_photo_shards(root: str, count: int, size: int, quality: int) -> tuple[str, float]:
  """`count` photo-like JPEGs of `size` px as WebDataset shards; their pattern, mean KiB."""
  rng = np.random.default_rng(0)
  writer = shard_writer.ShardWriter(os.path.join(root, f"photos_{size}"), "webdataset", 128)
  total = 0
  for i in range(count):
    pixels = synthetic.make_example(1, i, size)["image"].astype(np.float32)
    pixels += rng.normal(0.0, 16.0, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    total += buffer.tell()
    writer.add(buffer.getvalue(), f"photo {i}")
  writer.close()
  return os.path.join(root, f"photos_{size}", "*.tar"), total / count / 1024


def decode_rate(pattern: str, image_size: int, count: int, threads: int = 1) -> float:
  """Records/s of `threads` threads reading and decoding shard records (index built and
  files opened before timing)."""
  source = shard_source.ShardSource(shard_files.resolve(pattern), image_size)
  source[0]

  def read(i):
    return source[i % len(source)]

  start = time.perf_counter()
  if threads == 1:  # a pool's hand-offs cost a quarter of a small image's decoding time
    for i in range(count):
      read(i)
  else:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      list(pool.map(read, range(count)))
  return count / (time.perf_counter() - start)


def m6_10b_host_rate(step_ms: float) -> tuple[float, int]:
  """Images/s one host of the M6-10B slice consumes at `step_ms` a step; its host count."""
  chips = math.prod(int(n) for n in m6_10b.TOPOLOGY.split(":")[1].split("x"))
  hosts = chips // V5P_CHIPS_PER_HOST
  return m6_10b.get_config().data.batch_size / hosts / (step_ms / 1e3), hosts


def train_step_rate(config, steps: int) -> float:
  step, state, batch, mesh_context = common.jax_train_step(config)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)

  with mesh_context:
    times = common.time_calls(run, steps, warmup=3)
  return config.data.batch_size / common.summarize(times)["median_s"]


def padding_efficiency(config, tokenizer, batches: int, steps: int, reps: int) -> dict:
  """Text fill and train-step examples/s for each BUCKETING setting, on one jitted step."""
  step, state, device_batch, mesh_context = common.jax_train_step(config)
  shardings = jax.tree.map(lambda x: x.sharding, device_batch)  # depend on ndim only
  holder = {"state": state}

  def run(device_batches):
    for b in device_batches:
      holder["state"], metrics = step(holder["state"], b)
    jax.block_until_ready(metrics)

  out = {}
  with mesh_context:
    for name, bucket, window in BUCKETING:
      cfg = config.copy_and_resolve_references()
      cfg.data.length_bucket, cfg.data.bucket_window = bucket, window
      it = pipeline.make_iterator(cfg, tokenizer, process_index=0, process_count=1)
      host = [next(it) for _ in range(max(batches, steps))]
      real = sum(
        np.count_nonzero(b["src_tokens"]) + np.count_nonzero(b["tgt_weights"]) for b in host
      )
      positions = sum(b["src_tokens"].size + b["tgt_weights"].size for b in host)
      timed = [partitioning.host_batch_to_global(b, shardings) for b in host[:steps]]
      shapes = {}
      for b in timed:
        shapes.setdefault((b["src_tokens"].shape[1], b["tgt_input"].shape[1]), b)
      run(list(shapes.values()))  # compile every shape before timing
      times = common.time_calls(lambda: run(timed), reps, warmup=0)
      out[name] = {
        "length_bucket": bucket,
        "bucket_window": window,
        "text_fill": real / positions,
        "batch_shapes": len(shapes),
        "train_step_examples_per_sec": steps * config.data.batch_size / float(np.median(times)),
      }
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=60, help="batches timed per pipeline")
  parser.add_argument("--steps", type=int, default=30, help="train steps timed")
  parser.add_argument("--reps", type=int, default=3, help="timed passes per bucketing setting")
  parser.add_argument(
    "--photos", type=int, default=512, help="photo-like JPEGs decoded per paper-resolution row"
  )
  parser.add_argument(
    "--m6_10b_step_ms",
    type=float,
    default=482.6,
    help="M6-10B's step time (--mode=aot's estimate for configs/m6_10b.py, splash attention)",
  )
  parser.add_argument(
    "--json", default=os.path.join(os.path.dirname(__file__), "results", "input_pipeline.json")
  )
  args = parser.parse_args()

  config = base.get_config()
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = tokenizer_lib.get_or_train_tokenizer(
      tmp, config.model.vocab_size, config.seed, config.data.tokenizer_corpus_examples
    )
    rows = {"synthetic (render + tokenize + batch)": pipeline_rate(config, tokenizer, args.batches)}
    sorted_ = base.get_config()
    sorted_.data.length_bucket, sorted_.data.bucket_window = 8, 16
    rows["synthetic, length_bucket=8 + bucket_window=16"] = pipeline_rate(
      sorted_, tokenizer, args.batches
    )
    padding = padding_efficiency(config, tokenizer, args.batches, args.steps, args.reps)
    data_dir, name = make_jpeg_dataset(tmp, 512)
    user = base.get_config()
    user.data.source, user.data.data_dir, user.data.tfds_name = "tfds", data_dir, name
    user.data.task_weights.text_to_text = 0.0
    user.data.task_weights.vqa = 0.0  # captions only
    rows["tfds JPEG (decode + resize + tokenize + batch)"] = pipeline_rate(
      user, tokenizer, args.batches
    )
    for fmt in ("webdataset", "parquet"):
      streamed = base.get_config()
      streamed.data.source, streamed.data.shards = "shards", make_jpeg_shards(tmp, 512, fmt)
      streamed.data.task_weights = user.data.task_weights  # the tfds row's tasks
      rows[f"{fmt} JPEG shards (decode + ... + batch)"] = pipeline_rate(
        streamed, tokenizer, args.batches
      )
    decoded = decode_rate(make_jpeg_shards(tmp + "/one", 512, "webdataset"), 48, 1024)
    photos = {}
    for size, quality in PHOTO_SHARDS:
      pattern, kib = make_photo_shards(tmp, args.photos, size, quality)
      rates = {t: decode_rate(pattern, PAPER_IMAGE_SIZE, args.photos, t) for t in (1, 2)}
      photos[f"{size} px JPEG q{quality} -> {PAPER_IMAGE_SIZE} px"] = {
        "mean_kib": kib,
        "images_per_sec": {str(t): r for t, r in rates.items()},
      }
  step_rate = train_step_rate(config, args.steps)

  print(
    f"\nbase config, global batch {config.data.batch_size}, {jax.device_count()} device(s),"
    f" {os.cpu_count()} CPU cores"
  )
  print(f"{'what':<48} {'examples/s':>12} {'pipeline / step':>16}")
  print(f"{'train step (jitted, base config)':<48} {step_rate:>12.0f} {'':>16}")
  results = {"train_step_examples_per_sec": step_rate, "pipelines": {}}
  for name, rate in rows.items():
    print(f"{name:<48} {rate:>12.0f} {rate / step_rate:>15.1f}x")
    results["pipelines"][name] = {"examples_per_sec": rate, "ratio_to_step": rate / step_rate}
  print(f"\n{'padding efficiency':<40} {'text fill':>10} {'shapes':>7} {'step examples/s':>16}")
  plain = padding[BUCKETING[0][0]]["train_step_examples_per_sec"]
  for name, row in padding.items():
    rate = row["train_step_examples_per_sec"]
    print(
      f"{name:<40} {row['text_fill']:>10.1%} {row['batch_shapes']:>7} "
      f"{rate:>9.0f} ({rate / plain:.2f}x)"
    )
  results["padding_efficiency"] = padding
  print(f"\nwebdataset JPEG shards, one thread: {decoded:.0f} decoded images/s (per core)")
  results["webdataset_jpeg_decoded_images_per_sec_per_core"] = decoded
  need, hosts = m6_10b_host_rate(args.m6_10b_step_ms)
  print(
    f"\nat the paper configs' resolution (WebDataset, photo-like JPEGs; M6-10B consumes"
    f" {need:.0f} images/s per host: batch 512 over {hosts} v5p hosts, {args.m6_10b_step_ms:g}"
    " ms a step)"
  )
  print(f"{'shards':<32} {'KiB':>6} {'1 thread':>10} {'2 threads':>10} {'1 thread / need':>16}")
  for name, row in photos.items():
    one, two = row["images_per_sec"]["1"], row["images_per_sec"]["2"]
    print(f"{name:<32} {row['mean_kib']:>6.1f} {one:>10.0f} {two:>10.0f} {one / need:>15.1f}x")
  results["paper_resolution"] = {
    "image_size": PAPER_IMAGE_SIZE,
    "shards": photos,
    "m6_10b": {"step_ms": args.m6_10b_step_ms, "hosts": hosts, "images_per_sec_per_host": need},
  }
  bottleneck = [n for n, r in rows.items() if r < step_rate]
  print(
    "pipeline is the bottleneck for: " + ", ".join(bottleneck)
    if bottleneck
    else "the pipeline is not the bottleneck (all ratios > 1)"
  )
  common.write_json(args.json, results)


if __name__ == "__main__":
  main()
