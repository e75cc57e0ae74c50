"""The GPU check: train-step MFU with XLA and cuDNN attention, decoding and text-to-image
throughput, on the JAX the machine has, in one command of under 8 minutes.

  bash benchmarks/device_check.sh [--wheels DIR] [-- FLAGS]    # the usual way: the wrapper
  python benchmarks/device_check.py [--sizes=medium,m6_base,medium_scan] [--impls=xla,cudnn]
      [--batch=N] [--reps=20] [--train_budget_s=270] [--peak_flops=F]
      [--decode_lengths=16,64] [--decode_batch_sizes=1,8] [--t2i_batch_sizes=1,8]
      [--skip=train,decoding,text_to_image] [--allow_cpu]
      [--json=benchmarks/results/device_check.json]

Without a GPU it stops with one `error:` line (exit status 2). `--allow_cpu` runs every
section on the CPU at tiny sizes instead (size `tiny`, 3 reps, decoding lengths 4,8 at
batches 1,2 and text-to-image at batch 1, all with 2-layer models of width 64 and a 6 x 6
code grid): a test of the script, not a measurement. The defaults above are the GPU's.

**Train step** (bf16 compute, float32 parameters and AdamW state; the train loop's own
set-up, m6_jax/train/setup.py), for each size and each `model.attention_impl` of `--impls`:
compile time, median step time over `--reps` steps, tokens/s, and MFU = the analytic model
FLOPs (`param_count.train_flops`, the progress line's) / step time / the devices' peak.
The peak of a device is `--peak_flops` if given, else the published dense bf16 figure of its
kind (m6_jax/train/progress.py `PEAK_FLOPS_BY_KIND`), else a matmul measured here (bf16 on a
GPU, float32 on the CPU); the output says which. The matmul is measured either way, as a
reference. Sizes:
  medium       benchmarks/train_step.py's (8 layers, d 512, seq 256) at batch 64
  medium_scan  the same under nn.scan with remat dots_and_attention_saveable, batch 64
  m6_base      configs/m6_base.py (12 layers, d 768, seq 452, scan + remat) at batch 32,
               dropout off (cudnn has no attention dropout), data parallel over the GPUs
  tiny         2 layers, d 64, seq 20, batch 8: the --allow_cpu default
`--batch` overrides every size's batch. `cudnn` is `jax.nn.dot_product_attention` with M6's
boolean mask: cuDNN's fused kernel on an NVIDIA GPU in bf16 (the row counts the
`__cudnn$fmha` calls in the compiled step), its XLA implementation elsewhere; cuDNN trains
with a mask only at even sequence lengths (all the GPU sizes). Each row prints the first
step's loss (same parameters and batch for every impl of a size: they should agree to bf16
accuracy) and says when the last step's metrics are not finite. A row that would end more
than `--train_budget_s` seconds after the start (judged by the longest row so far) is
skipped, so that the other sections fit the time.

**Decoding**: benchmarks/decoding.py's rows (configs/base.py, float32, random parameters;
KV-cached greedy at each batch and length, uncached at batch 1).

**Text to image**: benchmarks/text_to_image.py's rows (guidance 3), with a randomly
initialised model of configs/finetune_text_to_image.py and a randomly initialised VQGAN of
configs/vqgan.py (a sentencepiece tokenizer trained on the synthetic world in a temporary
folder): a GPU machine has no trained workdir, so throughput only; the images are noise.

A measurement that fails is one line in the output and in the JSON, and the others go on;
the exit status is then 1. The JSON (benchmarks/common.write_json, rewritten after each
section) holds the versions (Python, jax, jaxlib, the CUDA plugin and cuDNN packages found,
`jax.print_environment_info`), the device, the peak and every row.

The check runs on the JAX it finds: no version pin, public JAX APIs only (the ones that may
move are guarded). The project's other dependencies come as wheels prepared where a package
index is reachable, `bash benchmarks/device_check.sh --download_wheels DIR --python_version
3.12` (requirements.txt without its jax and jaxlib lines; `pip download -r THAT
--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 ... -d DIR`), and
installed on the GPU machine by `bash benchmarks/device_check.sh --wheels DIR` (`pip install
--no-index --find-links DIR -r THAT`, its jax untouched): docs/performance.md#gpu-check.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
sys.path.insert(0, BENCHMARKS)
sys.path.insert(0, REPO)

from m6_jax.cli import bootstrap  # noqa: E402

bootstrap.choose_platform()  # as benchmarks/common.py does, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from m6_jax import errors  # noqa: E402

IMPLS = ("xla", "cudnn")
GPU_SIZES = ("medium", "m6_base", "medium_scan")
SIZES = GPU_SIZES + ("tiny",)
SECTIONS = ("train", "decoding", "text_to_image")
FUSED_ATTENTION = "__cudnn$fmha"  # the custom-call target of cuDNN's fused attention
# (GPU defaults, --allow_cpu defaults)
DEFAULTS = {
  "sizes": (",".join(GPU_SIZES), "tiny"),
  "reps": (20, 3),
  "decode_lengths": ("16,64", "4,8"),
  "decode_batch_sizes": ("1,8", "1,2"),
  "t2i_batch_sizes": ("1,8", "1"),
  "t2i_reps": (3, 1),
}


# --------------------------------------------------------------------------------------
# What this machine has
# --------------------------------------------------------------------------------------


def packages(pattern: str) -> list[str]:
  """'name version' of the installed distributions whose name matches `pattern`."""
  found = set()
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower().replace("_", "-")
    if re.fullmatch(pattern, name):
      found.add(f"{name} {dist.version}")
  return sorted(found)


def cuda_plugins() -> list[str]:
  return packages(r"jax-cuda\d+-(plugin|pjrt)")


def environment() -> dict:
  """Versions and the device, for the header and the JSON."""
  devices = jax.devices()
  try:
    from jax.extend import backend

    platform_version = str(backend.get_backend().platform_version)
  except Exception as e:  # informative only
    platform_version = f"unknown ({type(e).__name__})"
  try:
    info = jax.print_environment_info(return_string=True)
  except Exception as e:
    info = f"unavailable ({type(e).__name__}: {e})"
  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": _version("jaxlib"),
    "cuda_plugins": cuda_plugins(),
    "cudnn_packages": packages(r"nvidia-cudnn.*"),
    "platform": devices[0].platform,
    "platform_version": platform_version,
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "environment_info": info,
  }


def _version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def require_gpu(allow_cpu: bool) -> bool:
  """True on a GPU; on anything else the one error line and exit status 2, unless
  `allow_cpu` (then False)."""
  try:
    devices = jax.devices()
  except RuntimeError as e:  # e.g. JAX_PLATFORMS names a platform JAX cannot start
    errors.exit_with(f"JAX {jax.__version__} could not start a backend: {errors.one_line(e)}")
  if devices[0].platform in ("gpu", "cuda"):
    return True
  if allow_cpu:
    return False
  plugins = cuda_plugins()
  found = (
    f"the CUDA plugin is installed ({', '.join(plugins)}) but gave no GPU (see JAX's warnings)"
    if plugins
    else "no CUDA plugin (jax-cuda*-plugin) is installed"
  )
  errors.exit_with(
    f"no GPU: JAX {jax.__version__} found {len(devices)} {devices[0].platform} device(s) "
    f"({devices[0].device_kind}) and {found}; run this on a machine with an NVIDIA GPU and a "
    "CUDA build of JAX (pip install 'jax[cuda13]'), or pass --allow_cpu to test the check on "
    "the CPU at tiny sizes."
  )


def matmul_flops(dtype, n: int, reps: int = 10) -> float:
  """FLOP/s of an n x n matmul in `dtype` on the default device (best of `reps`)."""
  import common

  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  times = common.time_calls(lambda: matmul(a, a).block_until_ready(), reps)
  return 2 * n**3 / min(times)


def choose_peak(kind: str, given: float, on_gpu: bool) -> tuple[float, str, float]:
  """(peak FLOP/s per device for the MFU, where it came from, measured matmul FLOP/s)."""
  from m6_jax.train import progress

  dtype, n = (jnp.bfloat16, 8192) if on_gpu else (jnp.float32, 1024)
  measured = matmul_flops(dtype, n)
  name = "bf16" if on_gpu else "float32"
  if given > 0:
    return given, "--peak_flops", measured
  published = progress.peak_flops(kind, 0.0)
  if published and on_gpu:
    return published, "published dense bf16 (m6_jax/train/progress.py)", measured
  return measured, f"measured {name} {n}x{n} matmul on this device (no published peak)", measured


# --------------------------------------------------------------------------------------
# Train step
# --------------------------------------------------------------------------------------


def size_config(name: str):
  """The config of a size (see the module docstring), bf16, at its default batch."""
  import train_step

  from configs import base, m6_base

  if name in ("medium", "medium_scan"):
    config = train_step.medium_config() if name == "medium" else train_step.medium_scan_config()
    config.data.batch_size = 64
  elif name == "m6_base":
    config = m6_base.get_config()
    config.model.dropout_rate = 0.0  # cudnn has no attention dropout; both impls alike
    config.mesh.data, config.mesh.fsdp = -1, 1  # data parallel over whatever GPUs there are
    config.data.batch_size = 32
  elif name == "tiny":
    config = shrink(base.get_config())
    config.model.vocab_size = 512
    d = config.data
    d.image_size, d.src_len, d.tgt_len, d.batch_size, d.length_bucket = 32, 8, 8, 8, 0
  else:
    raise KeyError(name)
  config.model.dtype = "bfloat16"
  return config


def shrink(config):
  """The model of `config` at 2 layers of width 64 (--allow_cpu: quick to compile)."""
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim = 64, 2, 2, 32, 128
  return config


def train_row(name: str, impl: str, batch: int, reps: int, peak: float, on_gpu: bool) -> dict:
  """One size with one attention impl: compile, a first step, `reps` timed steps."""
  import common

  from m6_jax import config as config_lib
  from m6_jax.data.tasks import random_features_batch
  from m6_jax.model import param_count
  from m6_jax.model.m6 import M6Config
  from m6_jax.train import setup as setup_lib

  config = size_config(name)
  config.model.attention_impl = impl
  if batch:
    config.data.batch_size = batch
  config_lib.validate(config, jax.device_count())
  c = M6Config.from_config(config)
  b = int(config.data.batch_size)
  counts = param_count.count_params(config)
  flops = param_count.train_flops(config, counts)
  row = {"size": name, "impl": impl, "params": counts["total"], "seq_len": c.seq_len, "batch": b}
  row["model_flops"] = flops
  setup = setup_lib.build(config)
  state = setup.init_state(seed=0)
  with setup.mesh_context():
    device_batch = setup.put_batch(random_features_batch(b, config))
    start = time.perf_counter()
    compiled = setup.step.lower(state, device_batch).compile()
    row["compile_s"] = time.perf_counter() - start
    try:
      row["fused_attention_calls"] = compiled.as_text().count(FUSED_ATTENTION)
    except Exception:  # the HLO text is a cross-check only
      row["fused_attention_calls"] = None
    holder = {"state": state}

    def run():
      holder["state"], metrics = compiled(holder["state"], device_batch)
      return jax.block_until_ready(metrics)

    first = run()
    times = common.time_calls(run, reps)
    last = run()
  row["attention"] = attention_note(impl, on_gpu, row["fused_attention_calls"])
  row["first_loss"] = float(first["loss_sum"]) / max(float(first["weight_sum"]), 1.0)
  row["finite"] = all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree.leaves(last))
  row.update(common.summarize(times))
  row["tokens_per_sec"] = b * c.seq_len / row["median_s"]
  row["tflops_per_sec_per_device"] = flops / row["median_s"] / jax.device_count() / 1e12
  row["mfu"] = flops / row["median_s"] / (peak * jax.device_count())
  return row


def attention_note(impl: str, on_gpu: bool, fused: int | None) -> str:
  if impl == "xla":
    return "xla: masked softmax in XLA (ops.attention_core)"
  if not on_gpu:
    return "cudnn: jax.nn.dot_product_attention's XLA implementation (no GPU)"
  if fused is None:
    return "cudnn: jax.nn.dot_product_attention (compiled HLO not readable)"
  if fused == 0:
    return f"cudnn: NO {FUSED_ATTENTION} custom call in the compiled step (not cuDNN's kernel?)"
  return f"cudnn: cuDNN fused attention ({fused} {FUSED_ATTENTION} calls in the step)"


def train_section(args, peak: float, on_gpu: bool, start: float, results: dict) -> None:
  rows, longest = results["train"], 0.0
  for name in args.sizes:
    for impl in args.impls:
      if time.perf_counter() - start + longest > args.train_budget_s:
        skipped = f"would end past --train_budget_s={args.train_budget_s:g}"
        rows.append({"size": name, "impl": impl, "skipped": skipped})
        print(f"{name:<12} {impl:<6} skipped: {skipped}")
        continue
      row_start = time.perf_counter()
      try:
        row = train_row(name, impl, args.batch, args.reps, peak, on_gpu)
      except Exception as e:
        row = {"size": name, "impl": impl, "error": failure(e)}
        print(f"{name:<12} {impl:<6} FAILED: {row['error']}", flush=True)
      else:
        print(
          f"{name:<12} {impl:<6} step {row['median_s'] * 1e3:8.2f} ms, MFU {row['mfu']:6.1%} "
          f"(compiled in {row['compile_s']:.0f} s)",
          flush=True,
        )
      rows.append(row)
      longest = max(longest, time.perf_counter() - row_start)


def train_table(rows: list[dict]) -> str:
  lines = [
    f"{'size':<12} {'impl':<6} {'params':>8} {'seq':>4} {'batch':>5} {'compile s':>9} "
    f"{'step ms':>9} {'spread':>6} {'tokens/s':>10} {'TFLOP/s/dev':>11} {'MFU':>6} "
    f"{'1st loss':>8}  attention"
  ]
  for r in rows:
    head = f"{r['size']:<12} {r['impl']:<6}"
    if "median_s" not in r:
      lines.append(f"{head} {r.get('error') or r.get('skipped')}")
      continue
    lines.append(
      f"{head} {r['params'] / 1e6:>7.1f}M {r['seq_len']:>4} {r['batch']:>5} "
      f"{r['compile_s']:>9.1f} {r['median_s'] * 1e3:>9.2f} {r['spread']:>6.0%} "
      f"{r['tokens_per_sec']:>10,.0f} {r['tflops_per_sec_per_device']:>11.2f} {r['mfu']:>6.1%} "
      f"{r['first_loss']:>8.4f}  {r['attention']}" + ("" if r["finite"] else "  NOT FINITE")
    )
  by_size: dict[str, dict] = {}
  for r in rows:
    if "median_s" in r:
      by_size.setdefault(r["size"], {})[r["impl"]] = r
  for size, impls in by_size.items():
    if "xla" in impls and "cudnn" in impls:
      x, c = impls["xla"], impls["cudnn"]
      lines.append(
        f"{size}: cudnn step / xla step = {c['median_s'] / x['median_s']:.2f}; first-step "
        f"loss differs by {abs(c['first_loss'] - x['first_loss']):.2e}"
      )
  return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Decoding and text to image (the other benchmarks' functions)
# --------------------------------------------------------------------------------------


def decoding_section(args, tiny: bool) -> dict:
  import decoding as decoding_bench

  make_config = decoding_bench._config
  if tiny:
    make_config = lambda length: shrink(decoding_bench._config(length))  # noqa: E731
  rows = decoding_bench.run(
    args.decode_lengths, args.decode_batch_sizes, args.reps_small, make_config
  )
  text = decoding_bench.table(rows, args.decode_lengths)
  print(text, flush=True)
  note = "configs/base.py" + (" shrunk" if tiny else "") + ", float32, random parameters"
  return {"model": note, "lengths": args.decode_lengths, "rows": rows, "table": text}


def random_image_tokenizer(config, batch_size: int):
  """A VQGAN of `config` with random parameters, as an ImageTokenizer on all devices
  (coding `batch_size` images a call)."""
  import flax.linen as nn

  from m6_jax.infer import image_tokenizer
  from m6_jax.model import vqgan as vqgan_lib
  from m6_jax.parallel import partitioning

  vq = vqgan_lib.VQGANConfig.from_config(config)
  mesh, rules = partitioning.make_mesh(config), partitioning.logical_rules(config)
  target = image_tokenizer.abstract_params(vq, mesh, rules)
  shardings = jax.tree.map(lambda a: a.sharding, target)
  init = jax.jit(lambda rng: nn.unbox(vqgan_lib.init_params(vq, rng)), out_shardings=shardings)
  with partitioning.mesh_context(mesh, rules):
    params = init(jax.random.PRNGKey(0))
  tokenizer = image_tokenizer.ImageTokenizer
  return tokenizer(config, params["generator"], 0, "", mesh, rules, batch_size)


def text_to_image_section(args, tiny: bool) -> dict:
  import text_to_image as t2i_bench

  from configs import finetune_text_to_image, vqgan
  from m6_jax import config as config_lib
  from m6_jax.data import codes_info
  from m6_jax.data import tokenizer as tokenizer_lib
  from m6_jax.infer import generate as gen

  # tiny: 6 x 6 codes (the config's grid6 variant, a VQGAN downsampling 8x) instead of 12 x 12
  # and a smaller model and VQGAN (8 images a batch)
  config = finetune_text_to_image.get_config("grid6" if tiny else None)
  vq_config = vqgan.get_config()
  if tiny:
    shrink(config)
    v = vq_config.vqgan
    v.downsample_factor, v.channel_multipliers, v.channels = 8, (1, 1, 2, 2), 8
  config_lib.validate(vq_config, jax.device_count(), training=False)
  with tempfile.TemporaryDirectory() as workdir:
    examples = 300 if tiny else int(config.data.tokenizer_corpus_examples)
    tokenizer = tokenizer_lib.get_or_train_tokenizer(
      workdir, int(config.model.vocab_size), 0, examples
    )
  model = gen.init_model(config, tokenizer)
  image_tokenizer = random_image_tokenizer(vq_config, 8 if tiny else 64)
  mismatch = codes_info.codes_mismatch(
    image_tokenizer.codebook_size, image_tokenizer.grid, config.model
  )
  if mismatch:
    raise ValueError(f"the VQGAN does not fit the model: {mismatch}")
  guidance = 3.0
  sampling = t2i_bench.sampling_rows(
    model, image_tokenizer, args.t2i_batch_sizes, guidance, args.t2i_reps
  )
  identical = t2i_bench.same_codes(model, guidance)
  coding = t2i_bench.vqgan_rows(image_tokenizer, args.t2i_reps)
  grid = tuple(model.model.config.code_grid)
  text = t2i_bench.table(sampling, coding, grid, identical)
  note = (
    "randomly initialised configs/finetune_text_to_image.py model and configs/vqgan.py VQGAN: "
    "throughput only (no trained workdir here; the images are noise)"
  )
  print(f"{note}\n{text}", flush=True)
  return {
    "model": note,
    "grid": list(grid),
    "guidance_scale": guidance,
    "cached_equals_uncached": identical,
    "sampling": sampling,
    "vqgan": coding,
    "table": text,
  }


def rate(flops_per_s: float) -> str:
  return (
    f"{flops_per_s / 1e12:.1f} TFLOP/s"
    if flops_per_s >= 1e12
    else f"{flops_per_s / 1e9:.1f} GFLOP/s"
  )


def failure(e: BaseException) -> str:
  return f"{type(e).__name__}: {errors.one_line(e)}"[:500]


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", help=f"comma separated, of {SIZES} (default: {GPU_SIZES})")
  parser.add_argument("--impls", default=",".join(IMPLS), help="model.attention_impl values")
  parser.add_argument("--batch", type=int, default=0, help="every size's batch (0: its own)")
  parser.add_argument("--reps", type=int, help="timed train steps per row (default 20; CPU 3)")
  parser.add_argument(
    "--train_budget_s",
    type=float,
    default=270.0,
    help="seconds from the start by which the train rows end (a row that would end later, "
    "judged by the longest so far, is skipped)",
  )
  parser.add_argument(
    "--peak_flops", type=float, default=0.0, help="peak FLOP/s of one device for the MFU"
  )
  parser.add_argument("--decode_lengths", help="decoding output lengths (default 16,64)")
  parser.add_argument("--decode_batch_sizes", help="cached decoding batches (default 1,8)")
  parser.add_argument("--t2i_batch_sizes", help="images per text-to-image call (default 1,8)")
  parser.add_argument("--skip", default="", help=f"sections to leave out, of {SECTIONS}")
  parser.add_argument(
    "--allow_cpu", action="store_true", help="without a GPU: run on the CPU at tiny sizes"
  )
  parser.add_argument(
    "--json", default=os.path.join(BENCHMARKS, "results", "device_check.json"), help="output"
  )
  return parser.parse_args(argv)


def check_args(args, on_gpu: bool) -> None:
  """Fills the platform's defaults in; one error line for a bad value."""
  column = 0 if on_gpu else 1
  args.sizes = (args.sizes or DEFAULTS["sizes"][column]).split(",")
  args.impls = args.impls.split(",")
  args.skip = [s for s in args.skip.split(",") if s]
  for values, known, flag in (
    (args.sizes, SIZES, "--sizes"),
    (args.impls, IMPLS, "--impls"),
    (args.skip, SECTIONS, "--skip"),
  ):
    unknown = [v for v in values if v not in known]
    if unknown:
      errors.exit_with(f"{flag}: unknown {', '.join(unknown)}; known: {', '.join(known)}.")
  args.reps = args.reps or DEFAULTS["reps"][column]
  args.reps_small = max(1, min(5, args.reps))
  args.t2i_reps = DEFAULTS["t2i_reps"][column]
  for key in ("decode_lengths", "decode_batch_sizes", "t2i_batch_sizes"):
    text = getattr(args, key) or DEFAULTS[key][column]
    try:
      setattr(args, key, [int(x) for x in text.split(",")])
    except ValueError:
      errors.exit_with(f"--{key}={text}: comma-separated integers, e.g. {DEFAULTS[key][0]}.")
  if args.reps < 1 or args.batch < 0:
    errors.exit_with("--reps must be >= 1 and --batch >= 0.")


def main(argv=None) -> int:
  args = parse_args(argv)
  on_gpu = require_gpu(args.allow_cpu)
  check_args(args, on_gpu)
  import common

  start = time.perf_counter()
  env = environment()
  plugins = ", ".join(env["cuda_plugins"]) or "none"
  print(
    f"Python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, CUDA plugin: {plugins}"
    + (f", cuDNN: {', '.join(env['cudnn_packages'])}" if env["cudnn_packages"] else "")
  )
  driver = re.search(r"Driver Version: (\S+)\s+CUDA Version: (\S+)", env["environment_info"])
  print(
    f"devices: {env['device_count']} x {env['device_kind']} ({env['platform']}, "
    f"{env['platform_version']}"
    + (f"; driver {driver[1]}, CUDA {driver[2]} (nvidia-smi)" if driver else "")
    + f"); XLA_FLAGS: {env['xla_flags'] or '(none)'}"
  )
  if not on_gpu:
    print("no GPU (--allow_cpu): on the CPU (tiny sizes by default); a test of the script only")
  peak, source, measured = choose_peak(env["device_kind"], args.peak_flops, on_gpu)
  print(
    f"peak for the MFU: {rate(peak)} per device, {source}; measured "
    f"{'bf16' if on_gpu else 'float32'} matmul: {rate(measured)} ({measured / peak:.0%} of it)",
    flush=True,
  )
  results = {
    "environment": env,
    "on_gpu": on_gpu,
    "peak_flops_per_device": peak,
    "peak_source": source,
    "matmul_flops_measured": measured,
    "train": [],
  }
  try:
    if "train" not in args.skip:
      print(f"\n== train step, bf16, attention impls {', '.join(args.impls)}", flush=True)
      train_section(args, peak, on_gpu, start, results)
      print(train_table(results["train"]))
      common.write_json(args.json, results)
    for section, run in (
      ("decoding", lambda: decoding_section(args, tiny=not on_gpu)),
      ("text_to_image", lambda: text_to_image_section(args, tiny=not on_gpu)),
    ):
      if section in args.skip:
        continue
      print(f"\n== {section}", flush=True)
      try:
        results[section] = run()
      except Exception as e:
        results[section] = {"error": failure(e)}
        print(f"{section} FAILED: {results[section]['error']}", flush=True)
      common.write_json(args.json, results)
  except KeyboardInterrupt:  # the wrapper's timeout: keep what was measured
    results["interrupted"] = True
    print("interrupted; writing what was measured", flush=True)
    common.write_json(args.json, results)
    return 130
  failed = [r for r in results["train"] if "error" in r]
  failed += [s for s in ("decoding", "text_to_image") if "error" in results.get(s, {})]
  results["failures"] = len(failed)
  results["elapsed_s"] = time.perf_counter() - start
  common.write_json(args.json, results)
  print(f"done in {results['elapsed_s']:.0f} s; {len(failed)} measurement(s) failed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
