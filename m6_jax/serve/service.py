"""What the server serves: a loaded model (and its VQGAN, if it draws) behind two batchers.

    service = Service(generate.load_model(workdir), vqgan, Batching(max_batch=16))
    service.warmup()                                   # compiles every bucket
    task, future = service.submit_text("caption", pixels, None, schemas.Caption())
    text = future.result()

Captions, answers and continuations are one program (the prefix features of generation and
a decoding strategy), so they share the `text` batcher: a batch holds rows with equal
decoding options, whatever their kind. Drawing samples one row per candidate image in the
`codes` batcher (a request's candidates may span batches); the request's VQGAN decoding,
reranking and PNGs follow, as `--mode=generate` does them.

Shapes are bucketed: a batch of n rows runs at the smallest bucket >= n (its rows padded
with copies of its first), so every shape is compiled by `warmup`. A row's output depends on
its own inputs only: every op of the model is per row; sampling draws row i with the key of
its own request's seed (text: PRNGKey(seed); image candidate i: fold_in(PRNGKey(seed), i)),
never the batch's; padded rows are copies, which end when the row they copy ends. Within
one bucket a row's numbers are bitwise those it has alone; across buckets the matmuls may sum
in another order (the logits' last bits on a CPU), which a greedy or sampled token follows
only where two candidates tie that closely. One bucket (`buckets=(max_batch,)`)
makes outputs bitwise independent of the batch, at the cost of padding every batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np

from m6_jax.checkpoint import checkpoints
from m6_jax.data import images as images_lib
from m6_jax.infer import decoding, image_outputs
from m6_jax.infer import generate as gen
from m6_jax.infer import text_to_image as t2i
from m6_jax.parallel import partitioning
from m6_jax.serve import schemas
from m6_jax.serve.batcher import Batcher
from m6_jax.serve.inputs import RequestError

# kind -> the text input it names (as --mode=generate's flags name them)
TEXT_KINDS = {"caption": None, "answer": "question", "continue": "prompt"}
DRAW_BATCH = t2i.DEFAULT_BATCH_SIZE  # --mode=generate's VQGAN-decoding and scoring batch
WORKERS = 4  # threads decoding uploaded images and finishing drawings


@dataclasses.dataclass(frozen=True)
class Batching:
  """How requests are batched: at most `max_batch` rows, the first waiting at most
  `max_wait_ms`, run at bucketed sizes (empty: powers of two up to max_batch); at most
  `concurrent` batches run at once (on a CPU one batch keeps about one core busy)."""

  max_batch: int = 16
  max_wait_ms: float = 2.0
  buckets: tuple[int, ...] = ()
  concurrent: int = 1


@dataclasses.dataclass(frozen=True)
class Limits:
  """What a request may ask for."""

  max_request_bytes: int = 10 * 2**20
  max_image_pixels: int = 25_000_000
  max_text_chars: int = 1000
  max_candidates: int = 64  # images sampled for one /v1/image request (num_images, rerank)
  max_settings: int = 32  # distinct decoding settings compiled, the warmed defaults included


def bucket_sizes(batching: Batching, multiple: int = 1) -> tuple[int, ...]:
  """The batch sizes compiled: the buckets (default powers of two) up to max_batch and
  max_batch itself, each rounded up to a multiple of the mesh's batch split."""
  if batching.max_batch < 1:
    raise ValueError(f"max_batch={batching.max_batch} must be >= 1")
  sizes = set(batching.buckets) or {2**i for i in range(batching.max_batch.bit_length())}
  if any(s < 1 for s in sizes):
    raise ValueError(f"buckets must be >= 1, got {sorted(sizes)}")
  sizes = {s for s in sizes if s < batching.max_batch} | {batching.max_batch}
  return tuple(sorted({-(-s // multiple) * multiple for s in sizes}))


@dataclasses.dataclass(frozen=True)
class TextRow:
  image: np.ndarray | None
  source: str
  seed: int


@dataclasses.dataclass(frozen=True)
class CodeRow:
  prompt: str
  seed: int
  index: int  # the candidate's index in its request: its key is fold_in(PRNGKey(seed), index)


class Service:
  def __init__(
    self,
    model: gen.LoadedModel,
    vqgan: Any = None,
    batching: Batching = Batching(),
    limits: Limits = Limits(),
  ):
    self.model, self.vqgan, self.batching, self.limits = model, vqgan, batching, limits
    multiple = partitioning.batch_rows_multiple(model.mesh, model.rules)
    self.buckets = bucket_sizes(batching, multiple)
    self._settings: set[Any] = set()
    self._settings_lock = threading.Lock()
    # `concurrent` batches at a time on the model's devices, of either kind
    device = threading.Semaphore(batching.concurrent)
    wait, workers = batching.max_wait_ms / 1000, batching.concurrent
    self.text = Batcher(
      self._decode_rows, batching.max_batch, wait, device, "text-batcher", workers
    )
    self.codes = None
    if vqgan is not None:
      self.codes = Batcher(
        self._sample_rows, batching.max_batch, wait, device, "codes-batcher", workers
      )
    self.device = device
    # Image decoding and drawing's last steps run off the event loop on a few threads of
    # their own, so that many large uploads at once take no more (docs/serve.md#batching).
    self.workers = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="serve")

  @property
  def draws(self) -> bool:
    return self.codes is not None

  def bucket(self, rows: int) -> int:
    return next(b for b in self.buckets if b >= rows)

  # -- inputs ----------------------------------------------------------------------------

  def pixels(self, data: bytes) -> np.ndarray:
    """Image bytes -> the model's pixels, by the loader training uses; ImageError (400)."""
    size = int(self.model.config.data.image_size)
    return images_lib.load_image(data, size, "the image", self.limits.max_image_pixels)

  def check_text(self, name: str, text: str) -> None:
    if len(text) > self.limits.max_text_chars:
      raise RequestError(
        422, f"{name}: {len(text):,} characters; at most {self.limits.max_text_chars:,}."
      )

  def _admit(self, key: Any) -> None:
    """Refuses a new decoding setting past `max_settings` (each one compiles programs)."""
    with self._settings_lock:
      if key in self._settings:
        return
      if len(self._settings) >= self.limits.max_settings:
        raise RequestError(
          422,
          f"this server compiles at most {self.limits.max_settings} decoding settings and has "
          "them all; use the default options or ones sent before.",
        )
      self._settings.add(key)

  # -- text: captions, answers, continuations ----------------------------------------------

  def text_key(self, options: schemas.Decoding) -> tuple:
    """The options a batch shares: the strategy, its max_len, the language and the options
    the strategy takes."""
    strategy = decoding.STRATEGIES[options.decoding]
    tgt_len = int(self.model.config.data.tgt_len)
    max_len = options.max_len or strategy.max_len or tgt_len
    if not 1 <= max_len <= tgt_len:
      raise RequestError(
        422, f"max_len: {max_len} must be in [1, {tgt_len}] (the model's data.tgt_len)."
      )
    key = {"decoding_method": options.decoding, "max_len": max_len, "language": options.language}
    key.update({k: getattr(options, k) for k in strategy.options if k != "rng"})
    return tuple(sorted(key.items()))

  def submit_text(self, kind: str, image: np.ndarray | None, text: str | None, options):
    """(the task generating it, a Future of its text) for one request of `kind` (caption,
    answer, continue)."""
    text_arg = TEXT_KINDS[kind]
    if text_arg:
      self.check_text(text_arg, text or "")
    task = gen.inputs_task(self.model, image is not None, text_arg)
    source = gen.task_sources(task, [text or ""], self.model.config)[0]
    key = self.text_key(options)
    self._admit(("text", key))
    return task.name, self.text.submit(key, TextRow(image, source, options.seed))

  def _decode_rows(self, key: tuple, rows: list[TextRow]) -> list[str]:
    n = len(rows)
    rows = rows + [rows[0]] * (self.bucket(n) - n)
    batch = gen.make_inputs(self.model, [r.image for r in rows], [r.source for r in rows])
    options = dict(key)
    sampled = "rng" in decoding.STRATEGIES[options["decoding_method"]].options
    seeds = [r.seed for r in rows] if sampled else None
    return gen.decode(self.model, batch, **options, row_seeds=seeds)[:n]

  # -- images ------------------------------------------------------------------------------

  def submit_draw(self, req: schemas.Draw) -> list:
    """Futures of the request's candidate code grids, one per candidate."""
    if not self.draws:
      raise RequestError(
        404,
        "this model does not draw: it has no image codes (model.code_vocab_size=0) or no "
        "VQGAN was loaded.",
      )
    self.check_text("prompt", req.prompt)
    n = req.rerank or req.num_images
    if n > self.limits.max_candidates:
      raise RequestError(
        422,
        f"{'rerank' if req.rerank else 'num_images'}: {n} images to sample; at most "
        f"{self.limits.max_candidates}.",
      )
    key = (float(req.guidance_scale), float(req.temperature), int(req.top_k), float(req.top_p))
    self._admit(("codes", key))
    return [self.codes.submit(key, CodeRow(req.prompt, req.seed, i)) for i in range(n)]

  def _sample_rows(self, key: tuple, rows: list[CodeRow]) -> list[np.ndarray]:
    guidance_scale, temperature, top_k, top_p = key
    n = len(rows)
    rows = rows + [rows[0]] * (self.bucket(n) - n)
    codes = t2i.sample_codes(
      self.model,
      [r.prompt for r in rows],
      [r.index for r in rows],
      guidance_scale=guidance_scale,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      seeds=[r.seed for r in rows],
    )
    return list(codes[:n])

  def finish_draw(self, req: schemas.Draw, codes: Sequence[np.ndarray]) -> dict[str, Any]:
    """The request's images from its candidates' codes, as --mode=generate makes them: the
    VQGAN decodes them DRAW_BATCH at a time, reranking keeps the best, each a PNG."""
    codes = np.stack(codes)
    n = len(codes)
    with self.device:
      images = t2i.decode_codes(self.vqgan, codes, min(DRAW_BATCH, n))
      scores = None
      keep = np.arange(n)
      if req.rerank:
        scores = t2i.prompt_log_likelihood(self.model, images, req.prompt, DRAW_BATCH)
        keep = t2i.best_candidates(scores, req.num_images)
    pngs = [image_outputs.png_bytes(images[k], image_outputs.image_fields(req, k)) for k in keep]
    out = {"pngs": pngs, "candidates": [int(k) for k in keep], "num_candidates": n}
    if scores is not None:
      out["scores"] = [float(scores[k]) for k in keep]
    return out

  # -- start-up, description, shutdown -----------------------------------------------------

  def warmup(self, log: Callable[[str], None] = lambda line: None) -> None:
    """Compiles every bucket of the default options (and drawing's VQGAN and scorer)."""
    size = int(self.model.config.data.image_size)
    gray = np.full((size, size, 3), 128, np.uint8)
    text_key = self.text_key(schemas.Caption())
    self._settings.add(("text", text_key))
    for b in self.buckets:
      self._decode_rows(text_key, [TextRow(gray, "a", 0)] * b)
      log(f"compiled text decoding for batch {b}")
    if not self.draws:
      return
    d = schemas.Draw(prompt="a")
    draw_key = (d.guidance_scale, d.temperature, d.top_k, d.top_p)
    self._settings.add(("codes", draw_key))
    for b in self.buckets:
      codes = self._sample_rows(draw_key, [CodeRow("a", 0, 0)] * b)
      log(f"compiled image sampling for batch {b}")
    for b in range(1, min(DRAW_BATCH, self.limits.max_candidates) + 1):
      t2i.decode_codes(self.vqgan, np.stack(codes[:1] * b), b)
    t2i.prompt_log_likelihood(self.model, np.stack([gray]), "a", DRAW_BATCH)
    log("compiled the VQGAN decoder and the reranking scorer")

  def summary(self) -> dict[str, Any]:
    """GET /v1/model: what is served (no file paths)."""
    config, tok = self.model.config, self.model.tokenizer
    m = config.model
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.model.params))
    return {
      "step": int(self.model.step),
      "parameters": params,
      "model": {
        k: m[k]
        for k in ("architecture", "d_model", "num_layers", "num_heads", "mlp_dim", "vocab_size")
      }
      | {"code_vocab_size": int(m.code_vocab_size), "code_grid": list(m.code_grid)},
      "data": {k: int(config.data[k]) for k in ("image_size", "src_len", "tgt_len")},
      "tasks": sorted(n for n, w in dict(config.data.task_weights).items() if w > 0),
      **checkpoints.tokenizer_fingerprint(tok),
      "mesh": dict(self.model.mesh.shape),
      "endpoints": ["caption", "answer", "continue"] + (["image"] if self.draws else []),
      "batching": {
        "max_batch": self.batching.max_batch,
        "max_wait_ms": self.batching.max_wait_ms,
        "buckets": list(self.buckets),
        "concurrent": self.batching.concurrent,
      },
      "limits": dataclasses.asdict(self.limits),
      "batches_run": {  # batch size -> batches run since start-up (warm-up excluded)
        name: {str(k): v for k, v in sorted(b.batch_sizes.items())}
        for name, b in (("text", self.text), ("codes", self.codes))
        if b is not None
      },
    }

  def close(self, timeout: float | None = None) -> None:
    """Runs what waits and stops the batchers."""
    self.text.close(timeout)
    if self.codes is not None:
      self.codes.close(timeout)
    self.workers.shutdown()
