"""`--mode=serve`: an HTTP JSON API over a checkpoint of --workdir (a trained workdir, an
export or a converted checkpoint): captions, answers, continuations and, on a text-to-image
model, drawings, with dynamic batching and a demo page at /. Every batch shape is compiled
before the port opens (--warmup); SIGTERM or Ctrl-C finishes the requests in flight, then
the process exits 0. The API and its limits: docs/serve.md.

    python -m m6_jax.main --mode=serve --workdir=/tmp/m6_base
    curl -s localhost:8000/v1/caption -F image=@scene.png
"""

from __future__ import annotations

import time

from absl import flags

from m6_jax.cli import checkpoint_flags, common
from m6_jax.errors import exit_with

HOST = flags.DEFINE_string(
  "host", "127.0.0.1", "The address to listen on (0.0.0.0: every interface; mind who can reach it)."
)
PORT = flags.DEFINE_integer("port", 8000, "The port to listen on (0: a free one, printed).")
WARMUP = flags.DEFINE_bool(
  "warmup", True, "Compile every batch bucket of the default options before the port opens."
)
MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Most rows decoded together.")
MAX_WAIT_MS = flags.DEFINE_float(
  "max_wait_ms", 2.0, "Longest a request waits for others to share its batch."
)
BUCKETS = flags.DEFINE_list(
  "buckets", [], "Batch sizes compiled (default: powers of two up to --max_batch)."
)
CONCURRENT_BATCHES = flags.DEFINE_integer(
  "concurrent_batches",
  1,
  "Batches decoded at once (on a CPU one batch keeps about one core busy: up to its cores).",
)
MAX_REQUEST_BYTES = flags.DEFINE_integer(
  "max_request_bytes", 10 * 2**20, "Largest request body (413 above)."
)
MAX_IMAGE_PIXELS = flags.DEFINE_integer(
  "max_image_pixels", 25_000_000, "Most pixels of an uploaded image, read from its header."
)
MAX_TEXT_CHARS = flags.DEFINE_integer(
  "max_text_chars", 1000, "Longest question or prompt, in characters."
)
MAX_CANDIDATES = flags.DEFINE_integer(
  "max_candidates", 64, "Most images sampled for one /v1/image request (num_images, rerank)."
)
MAX_SETTINGS = flags.DEFINE_integer(
  "max_settings", 32, "Most distinct decoding settings compiled (each compiles programs)."
)
MAX_CONNECTIONS = flags.DEFINE_integer(
  "max_connections", 512, "Most open connections and requests (503 above)."
)
DRAIN_TIMEOUT = flags.DEFINE_float(
  "drain_timeout_s", 60.0, "On SIGTERM, the longest wait for the requests in flight."
)
DRAW = flags.DEFINE_bool(
  "draw",
  True,
  "On a text-to-image model, serve /v1/image (--nodraw: the text endpoints only, no VQGAN).",
)
VQGAN_WORKDIR = flags.DEFINE_string(
  "vqgan_workdir", None, "The VQGAN that decodes drawn codes (default: the model's)."
)


def _settings():
  from m6_jax.serve import service

  try:
    buckets = tuple(int(b) for b in BUCKETS.value)
  except ValueError:
    exit_with(f"--buckets={','.join(BUCKETS.value)} must be integers, e.g. --buckets=1,4,16.")
  batching = service.Batching(MAX_BATCH.value, MAX_WAIT_MS.value, buckets, CONCURRENT_BATCHES.value)
  limits = service.Limits(
    max_request_bytes=MAX_REQUEST_BYTES.value,
    max_image_pixels=MAX_IMAGE_PIXELS.value,
    max_text_chars=MAX_TEXT_CHARS.value,
    max_candidates=MAX_CANDIDATES.value,
    max_settings=MAX_SETTINGS.value,
  )
  positive = {
    "--max_batch": MAX_BATCH.value,
    "--concurrent_batches": CONCURRENT_BATCHES.value,
    "--max_request_bytes": MAX_REQUEST_BYTES.value,
    "--max_image_pixels": MAX_IMAGE_PIXELS.value,
    "--max_text_chars": MAX_TEXT_CHARS.value,
    "--max_candidates": MAX_CANDIDATES.value,
    "--max_settings": MAX_SETTINGS.value,
    "--max_connections": MAX_CONNECTIONS.value,
  }
  for name, value in positive.items():
    if value < 1:
      exit_with(f"{name}={value} must be >= 1.")
  if MAX_WAIT_MS.value < 0 or any(b < 1 for b in buckets):
    exit_with("--max_wait_ms must be >= 0 and every --buckets size >= 1.")
  if not 0 <= PORT.value <= 65535:
    exit_with(f"--port={PORT.value} must be in [0, 65535].")
  return batching, limits


def _vqgan(model, workdir: str):
  """The model's VQGAN (None for a model without image codes)."""
  from m6_jax.infer import text_to_image as t2i

  if int(model.config.model.code_vocab_size) <= 0 or not DRAW.value:
    if VQGAN_WORKDIR.value:
      why = "--nodraw" if not DRAW.value else f"the model in {workdir} has no image codes"
      exit_with(f"--vqgan_workdir names a VQGAN, but {why}: nothing is drawn.")
    return None
  location, step = t2i.vqgan_location(model.config, VQGAN_WORKDIR.value or "")
  vqgan = t2i.load_image_tokenizer(location, step)
  t2i.check_image_tokenizer(vqgan, model.config.model, location)
  return vqgan


def run() -> None:
  config = common.load_config("serve", required=False, workdir_hint="a trained workdir or export")
  batching, limits = _settings()
  from m6_jax.infer import generate
  from m6_jax.serve import app, server, service

  try:  # a port in use fails before minutes of loading; it accepts nothing until warmed up
    sock = server.bind(HOST.value, PORT.value)
  except OSError as e:
    exit_with(f"cannot listen on {HOST.value}:{PORT.value}: {e.strerror or e}.")
  workdir = common.WORKDIR.value
  step, best = checkpoint_flags.CHECKPOINT_STEP.value, checkpoint_flags.BEST.value
  model = generate.load_model(workdir, step, config, best=best)
  svc = service.Service(model, _vqgan(model, workdir), batching, limits)
  if WARMUP.value:
    start = time.perf_counter()
    svc.warmup(log=lambda line: print(line, flush=True))
    print(
      f"warmed up {len(svc.buckets)} batch sizes {list(svc.buckets)} in "
      f"{time.perf_counter() - start:.1f}s",
      flush=True,
    )
  sock.listen(2048)
  host, port = sock.getsockname()[:2]
  kinds = ", ".join(svc.summary()["endpoints"])
  print(f"serving step {model.step} of {workdir} ({kinds}) on http://{host}:{port}", flush=True)
  server.run(app.create_app(svc), sock, DRAIN_TIMEOUT.value, MAX_CONNECTIONS.value, svc.close)
  print("stopped: every request in flight was answered", flush=True)
