"""Text-to-image speed: ms per image (KV-cached vs uncached code sampling) and VQGAN images/s.

  python benchmarks/text_to_image.py --workdir=/tmp/m6_t2i [--batch_sizes=1,8] [--json=PATH]

The model is a trained text-to-image workdir (configs/finetune_text_to_image.py, e.g. the
recipe's of docs/text_to_image.md) and its VQGAN (found through the model's data.image_codes_dir). A row
samples `batch` images of one prompt with classifier-free guidance (--guidance_scale, so
2 x batch rows run through the model) and decodes them to pixels; ms per image is the
median call over --reps calls divided by the batch. The uncached path reruns the whole
model over [source ; codes so far] at every one of the h x w steps; for a fixed key it must
give the same codes as the cached path, which the benchmark checks and reports. VQGAN
encode / decode images/s are measured on rendered validation scenes at the tokenizer's own
batch. Writes JSON (default benchmarks/results/text_to_image.json).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from m6_jax.evaluation import scene_scores  # noqa: E402
from m6_jax.infer import generate as gen  # noqa: E402
from m6_jax.infer import text_to_image as t2i  # noqa: E402

PROMPT = "一个大的红色圆形在左上角"


def sampling_rows(model, vqgan, batch_sizes, guidance: float, reps: int) -> list[dict]:
  rows = []
  for path in ("cached", "uncached"):
    for batch in batch_sizes if path == "cached" else batch_sizes[:1]:
      cached = path == "cached"

      def draw():
        codes = t2i.sample_codes(model, [PROMPT] * batch, range(batch), 0, guidance, cached=cached)
        return vqgan.decode(codes)

      times = common.time_calls(draw, reps if cached else max(1, reps // 2), warmup=1)
      stats = common.summarize(times)
      row = {"path": path, "batch_size": batch, **stats}
      row["ms_per_image"] = 1000 * stats["median_s"] / batch
      rows.append(row)
      print(f"{path:8s} batch {batch}: {row['ms_per_image']:.1f} ms per image", flush=True)
  return rows


def same_codes(model, guidance: float) -> bool:
  """Cached and uncached sampling give the same codes for a fixed key."""
  a, b = (t2i.sample_codes(model, [PROMPT] * 2, [0, 1], 7, guidance, cached=c) for c in (1, 0))
  return bool(np.array_equal(a, b))


def vqgan_rows(vqgan, reps: int) -> list[dict]:
  size = vqgan.image_size
  images = scene_scores.render(scene_scores.world_scenes(0, "validation", vqgan.batch_size), size)
  codes = vqgan.encode(images)
  rows = []
  for name, fn in (
    ("encode", lambda: vqgan.encode(images)),
    ("decode", lambda: vqgan.decode(codes)),
  ):
    stats = common.summarize(common.time_calls(fn, reps))
    rows.append({"op": name, "images": len(images), **stats})
    rows[-1]["images_per_sec"] = len(images) / stats["median_s"]
    print(f"VQGAN {name}: {rows[-1]['images_per_sec']:.0f} images/s", flush=True)
  return rows


def table(sampling: list[dict], vqgan: list[dict], grid, identical: bool) -> str:
  lines = ["| sampling path | batch | ms per image | spread |", "|---|---|---|---|"]
  for r in sampling:
    lines.append(
      f"| {r['path']} | {r['batch_size']} | {r['ms_per_image']:.1f} | {r['spread']:.0%} |"
    )
  lines += ["", "| VQGAN | images/s |", "|---|---|"]
  lines += [f"| {r['op']} ({r['images']} images) | {r['images_per_sec']:.0f} |" for r in vqgan]
  lines.append(
    f"\n{grid[0]}x{grid[1]} codes per image; cached and uncached sampling give "
    + ("the same codes for a fixed key." if identical else "DIFFERENT codes for a fixed key!")
  )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained text-to-image workdir")
  parser.add_argument("--batch_sizes", default="1,8", help="images per call, comma separated")
  parser.add_argument("--guidance_scale", type=float, default=3.0)
  parser.add_argument("--reps", type=int, default=5, help="timed calls per row (median)")
  parser.add_argument(
    "--json", default=os.path.join(REPO, "benchmarks", "results", "text_to_image.json")
  )
  args = parser.parse_args()
  model = gen.load_model(args.workdir)
  vqgan = t2i.load_image_tokenizer(*t2i.vqgan_location(model.config))
  batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
  sampling = sampling_rows(model, vqgan, batch_sizes, args.guidance_scale, args.reps)
  identical = same_codes(model, args.guidance_scale)
  coding = vqgan_rows(vqgan, args.reps)
  grid = tuple(model.model.config.code_grid)
  print(f"CPU: {common.cpu_model()}; devices: {jax.device_count()} x {jax.devices()[0].platform}")
  print(table(sampling, coding, grid, identical))
  common.write_json(
    args.json,
    {
      "cpu": common.cpu_model(),
      "device": str(jax.devices()[0]),
      "workdir": os.path.abspath(args.workdir),
      "step": model.step,
      "grid": list(grid),
      "guidance_scale": args.guidance_scale,
      "cached_equals_uncached": identical,
      "sampling": sampling,
      "vqgan": coding,
    },
  )


if __name__ == "__main__":
  main()
