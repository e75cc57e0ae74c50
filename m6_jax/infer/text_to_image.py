"""Text-to-image: a caption -> M6 samples the h x w image codes -> a VQGAN decodes the pixels.

    model = generate.load_model(workdir)                      # model.code_vocab_size > 0
    vqgan = load_image_tokenizer(vqgan_workdir)
    result = generate_images(model, vqgan, ImageRequest("一个红色的圆", num_images=8))
    image_outputs.write_outputs(result, request)              # PNGs, a grid, an index JSON

`--mode=generate --prompt=... --num_images=N --output_dir=OUT` runs `run` (m6_jax/cli/generate.py).

Sampling (`sample_codes`) is the ancestral sampling of decoding.py (`generic_sample`, KV
cache, temperature / top-k / top-p) with a step function that
  * masks every logit but the K image codes, so it takes exactly h * w steps and never
    emits EOS or text before the grid is full;
  * applies classifier-free guidance (dalle-mini's condition scale): the conditional rows
    (the caption) and the unconditional rows (an empty caption, what training saw for
    data.guidance_drop_rate of its examples) run as one batch of 2B rows, and the logits
    sampled from are uncond + s * (cond - uncond). s = 1 is plain conditional sampling and
    runs the B conditional rows alone.
Image i of a request samples step t with the key fold_in(fold_in(PRNGKey(seed), i), t), so
a seed gives the same images whatever the batch size or the number of devices. `cached=False`
samples with the uncached reference decoder (a full forward pass per step), for tests.

Reranking (`rerank` = N > 0): N candidates are sampled and decoded to images, and the
`num_images` with the highest image-to-text log-likelihood of the prompt under the same
model (teacher forced: image -> prompt, as the image_to_text task trains it) are kept,
best first. OFA reranks with CLIP; here the model scores its own images and nothing is
downloaded (train image_to_text alongside text_to_image for this to mean something).

The image tokenizer is any object with `codebook_size`, `grid`, `image_size` and
`decode(codes int [b, h, w]) -> uint8 [b, H, W, 3]` (m6_jax/infer/image_tokenizer.py's
`ImageTokenizer`, imported only when `load_image_tokenizer` is called). By default it is the
VQGAN the model's codes came from: `vqgan_workdir` / `vqgan_step` of the codes_info.json in
the model config's data.image_codes_dir.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from m6_jax.data import codes_info, tasks
from m6_jax.data import images as images_lib
from m6_jax.errors import ConfigError, GenerationError
from m6_jax.infer import decoding, image_outputs
from m6_jax.infer import generate as gen
from m6_jax.model import loss as loss_lib
from m6_jax.model.m6 import M6, M6Config
from m6_jax.parallel import multihost, partitioning

DEFAULT_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class ImageRequest:
  """What to generate and how (--mode=generate's drawing flags)."""

  prompt: str = ""
  num_images: int = 4
  output_dir: str = ""
  guidance_scale: float = 3.0
  rerank: int = 0  # N > 0: sample N candidates, keep the num_images the model scores best
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  vqgan_workdir: str = ""  # empty: the one in the model's data.image_codes_dir
  batch_size: int = DEFAULT_BATCH_SIZE  # images sampled per decoding call
  overwrite: bool = False  # replace the files of an earlier drawing of the prompt

  def settings(self) -> dict[str, Any]:
    keys = ("guidance_scale", "rerank", "temperature", "top_k", "top_p", "batch_size")
    return {k: getattr(self, k) for k in keys}


@dataclasses.dataclass
class GeneratedImages:
  """The kept images (best first when reranked), their codes, which candidates they were
  and their scores (None without reranking)."""

  images: np.ndarray  # uint8 [n, H, W, 3]
  codes: np.ndarray  # int32 [n, h, w]
  candidates: np.ndarray  # int [n]: the candidate (key) index of each image
  scores: np.ndarray | None  # float [n]: prompt log-likelihood given the image
  num_candidates: int


# --------------------------------------------------------------------------------------
# Checks (before long work)
# --------------------------------------------------------------------------------------


def check_request(req: ImageRequest) -> None:
  """GenerationError (one line) for a request that cannot work."""
  if not req.prompt or not req.prompt.strip():
    raise GenerationError("the prompt is empty; pass the text to draw with --prompt.")
  if req.num_images <= 0:
    raise GenerationError(f"--num_images={req.num_images} must be positive.")
  if not req.output_dir:
    raise GenerationError("text-to-image needs --output_dir, a directory for the PNG files.")
  if os.path.exists(req.output_dir) and not os.path.isdir(req.output_dir):
    raise GenerationError(f"--output_dir={req.output_dir} exists and is not a directory.")
  image_outputs.check_not_written(req.output_dir, req.prompt, req.num_images, req.overwrite)
  if req.rerank < 0 or 0 < req.rerank < req.num_images:
    raise GenerationError(
      f"--rerank={req.rerank} must be 0 (no reranking) or at least --num_images="
      f"{req.num_images}: the best num_images of that many candidates are kept."
    )
  if req.guidance_scale < 0:
    raise GenerationError(f"--guidance_scale={req.guidance_scale} must be >= 0 (1: no guidance).")
  if req.temperature < 0 or req.top_k < 0 or not 0 < req.top_p <= 1:
    raise GenerationError(
      f"need --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1; got {req.temperature}, "
      f"{req.top_k}, {req.top_p}."
    )
  if req.batch_size <= 0:
    raise GenerationError(f"batch_size={req.batch_size} must be positive.")


def check_model_has_codes(config: ml_collections.ConfigDict, workdir: str) -> None:
  if int(config.model.code_vocab_size) <= 0:
    raise GenerationError(
      f"the model in {workdir} has no image codes (model.code_vocab_size=0), so it cannot "
      "draw; --num_images / --output_dir need a text-to-image model "
      "(configs/finetune_text_to_image.py)."
    )


def vqgan_location(config: ml_collections.ConfigDict, override: str = "") -> tuple[str, Any]:
  """(VQGAN workdir, checkpoint step or None): `override`, else the vqgan_workdir and
  vqgan_step of the codes the model was trained on (data.image_codes_dir/codes_info.json)."""
  if override:
    return override, None
  codes_dir = str(config.data.image_codes_dir)
  if not codes_dir:
    raise GenerationError(
      "the model's config has no data.image_codes_dir to find its VQGAN from; pass --vqgan_workdir."
    )
  try:
    info = codes_info.read_codes_info(codes_dir)
  except ConfigError as e:
    raise GenerationError(f"{e} Or pass --vqgan_workdir.") from None
  if not info.get("vqgan_workdir"):
    raise GenerationError(
      f"{codes_dir}/codes_info.json names no vqgan_workdir; pass --vqgan_workdir."
    )
  return str(info["vqgan_workdir"]), info.get("vqgan_step")


def load_image_tokenizer(workdir: str, step: int | None = None):
  """The VQGAN of `workdir` (m6_jax/infer/image_tokenizer.py's ImageTokenizer)."""
  if not os.path.isdir(workdir):
    raise GenerationError(f"no VQGAN workdir at {workdir}; pass --vqgan_workdir.")
  from m6_jax.infer import image_tokenizer

  return image_tokenizer.ImageTokenizer.load(workdir, checkpoint_step=step)


def check_image_tokenizer(vqgan: Any, model_config: ml_collections.ConfigDict, where: str) -> None:
  """GenerationError when the VQGAN's codebook or grid is not the model's."""
  mismatch = codes_info.codes_mismatch(vqgan.codebook_size, vqgan.grid, model_config)
  if mismatch:
    raise GenerationError(
      f"the VQGAN in {where} does not fit the model: {mismatch}; pass the --vqgan_workdir "
      "whose codes the model was trained on."
    )


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def code_token_mask(config: M6Config) -> np.ndarray:
  """bool [vocab_size + code_vocab_size]: True on the image codes only."""
  mask = np.zeros(config.total_vocab_size, bool)
  mask[config.vocab_size :] = True
  return mask


def example_keys(seed: int, indices: Sequence[int]) -> jax.Array:
  """One key per image, fold_in(PRNGKey(seed), index): uint32 [n, 2]."""
  base = jax.random.PRNGKey(int(seed))
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def row_keys(seeds: Sequence[int], indices: Sequence[int]) -> np.ndarray:
  """uint32 [n, 2]: row i's key fold_in(PRNGKey(seeds[i]), indices[i]), the key image
  indices[i] of a request with seed seeds[i] has (`example_keys`), whatever the other rows."""
  seeds, indices = [int(s) for s in seeds], [int(i) for i in indices]
  keys = np.zeros((len(seeds), 2), np.uint32)
  for seed in sorted(set(seeds)):
    rows = [r for r, s in enumerate(seeds) if s == seed]
    keys[rows] = np.asarray(example_keys(seed, [indices[r] for r in rows]))
  return keys


def guided_step_fn(
  step_fn: decoding.StepFn, guidance_scale: jax.Array | None, allowed: jax.Array
) -> decoding.StepFn:
  """A step function over B sampled rows. guidance_scale None: `step_fn` runs those B rows
  (plain conditional sampling). Else its state holds 2B rows, the B conditional then the B
  unconditional ones; each step feeds both the sampled tokens and returns
  uncond + s * (cond - uncond). Tokens not `allowed` get -inf after the mix (masking
  before would give -inf - -inf = NaN)."""

  def step(token, position, state):
    if guidance_scale is None:
      logits, state = step_fn(token, position, state)
    else:
      both, state = step_fn(jnp.concatenate([token, token]), position, state)
      cond, uncond = jnp.split(both.astype(jnp.float32), 2)
      logits = uncond + guidance_scale * (cond - uncond)
    return decoding.allow_only(logits, allowed), state

  return step


@functools.partial(
  jax.jit, static_argnames=("model", "guided", "cached", "temperature", "top_k", "top_p")
)
def _sample_codes_jit(
  model,
  params,
  batch,
  keys,
  guidance_scale,
  bos_id,
  eos_id,
  allowed,
  *,
  guided,
  cached,
  temperature,
  top_k,
  top_p,
):
  if cached:
    cache = decoding.encode_prefix(model, params, batch)
    step, state = decoding.m6_step_fn(model, params, cache), cache.target
  else:
    step, state = decoding.m6_uncached_step_fn(model, params, batch)
  step = guided_step_fn(step, guidance_scale if guided else None, allowed)
  return decoding.generic_sample(
    step,
    state,
    keys,
    batch_size=keys.shape[0],
    max_len=math.prod(model.config.code_grid),
    bos_id=bos_id,
    eos_id=eos_id,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )


def sample_codes(
  model: gen.LoadedModel,
  prompts: Sequence[str],
  indices: Sequence[int],
  seed: int = 0,
  guidance_scale: float = 1.0,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  cached: bool = True,
  seeds: Sequence[int] | None = None,
) -> np.ndarray:
  """Codes int32 [n, h, w] for prompts[i] sampled with the key of image indices[i]
  (`example_keys`; of seed `seed`, or of seeds[i] when `seeds` is given: `row_keys`), on
  the model's mesh; cached=False: the uncached reference decoder."""
  c = model.model.config
  if c.code_vocab_size <= 0:
    raise GenerationError("the model has no image codes (model.code_vocab_size=0).")
  if c.tgt_len < math.prod(c.code_grid):
    raise GenerationError(f"data.tgt_len={c.tgt_len} holds fewer than the {c.code_grid} codes.")
  d, tok = model.config.data, model.tokenizer
  shape, src_len = (int(d.image_size), int(d.image_size), 3), int(d.src_len)
  rows = len(prompts)
  multiple = partitioning.batch_rows_multiple(model.mesh, model.rules)
  padded = -(-rows // multiple) * multiple
  # The unconditional prefix is what training saw for a dropped caption: no image, no text.
  empty = tasks.prefix_features(None, shape, [], src_len)
  prefixes = [tasks.prefix_features(None, shape, tok.encode(p)[:src_len], src_len) for p in prompts]
  prefixes += [empty] * (padded - rows)
  guided = float(guidance_scale) != 1.0
  if guided:
    prefixes += [empty] * padded
  batch = {k: np.stack([r[k] for r in prefixes]) for k in decoding.PREFIX_KEYS}
  keys = row_keys(list(seeds) if seeds is not None else [seed] * rows, indices)
  keys = np.concatenate([keys, np.zeros((padded - rows, 2), np.uint32)])
  with model.mesh_context():
    inputs, _ = partitioning.put_full_batch(batch, model.mesh, model.rules)
    keys, _ = partitioning.put_full_batch({"keys": keys}, model.mesh, model.rules)
    ids = _sample_codes_jit(
      model.model,
      model.params,
      inputs,
      keys["keys"],
      jnp.float32(guidance_scale),
      tok.bos_id,
      tok.eos_id,
      jnp.asarray(code_token_mask(c)),
      guided=guided,
      cached=cached,
      temperature=float(temperature),
      top_k=int(top_k),
      top_p=float(top_p),
    )
    ids = np.asarray(multihost.to_host(ids))[:rows]
  return (ids - c.vocab_size).reshape((rows,) + tuple(c.code_grid)).astype(np.int32)


# --------------------------------------------------------------------------------------
# Reranking
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _log_likelihood_fn(model: M6) -> Callable:
  """Jitted (params, batch) -> [b] summed target log-probabilities (the training loss's)."""

  def log_likelihood(params, batch):
    logits = model.apply({"params": params}, batch)
    losses = loss_lib.token_losses(logits, batch["tgt_target"], 0.0) * batch["tgt_weights"]
    return -losses.sum(axis=1)

  return jax.jit(log_likelihood)


def _model_pixels(image: np.ndarray, size: int) -> np.ndarray:
  """A decoded image at the model's image size, through the training image loader."""
  if image.shape[:2] == (size, size):
    return image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return images_lib.load_image(buffer.getvalue(), size)


def prompt_log_likelihood(
  model: gen.LoadedModel, images: np.ndarray, prompt: str, batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
  """float [n]: log p(prompt | image) under the model's image_to_text task, per image."""
  d, tok = model.config.data, model.tokenizer
  size = int(d.image_size)
  cfg = tasks.TaskConfig(src_len=int(d.src_len), tgt_len=int(d.tgt_len))
  ids = tok.encode(prompt)[: cfg.tgt_len - 1]
  rows = [
    tasks.make_features(
      _model_pixels(img, size), (size, size, 3), [], ids, "image_to_text", tok, cfg
    )
    for img in images
  ]
  fn, out = _log_likelihood_fn(model.model), []
  with model.mesh_context():
    for start in range(0, len(rows), batch_size):
      chunk = rows[start : start + batch_size]
      real = len(chunk)
      chunk += [chunk[0]] * (batch_size - real)  # one shape, one compilation
      batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
      inputs, _ = partitioning.put_full_batch(batch, model.mesh, model.rules)
      out.append(np.asarray(multihost.to_host(fn(model.params, inputs)))[:real])
  return np.concatenate(out)[: len(rows)].astype(np.float64)


def best_candidates(scores: Sequence[float], keep: int) -> np.ndarray:
  """Indices of the `keep` highest scores, best first (ties: the earlier candidate)."""
  return np.argsort(-np.asarray(scores, np.float64), kind="stable")[:keep]


# --------------------------------------------------------------------------------------
# Generation and outputs
# --------------------------------------------------------------------------------------


def draw_images(
  model: gen.LoadedModel,
  vqgan: Any,
  prompts: Sequence[str],
  indices: Sequence[int],
  seed: int,
  guidance_scale: float,
  batch_size: int,
  **sampling: Any,
) -> tuple[np.ndarray, np.ndarray]:
  """(codes int32 [n, h, w], uint8 images [n, H, W, 3]) for prompts[i] sampled with the key
  of image indices[i] (`sample_codes`; `sampling`: temperature, top_k, top_p, cached),
  batch_size at a time, the last batch padded so that every call has one shape."""
  prompts, indices = list(prompts), list(indices)
  codes = []
  for start in range(0, len(prompts), batch_size):
    rows, keys = prompts[start : start + batch_size], indices[start : start + batch_size]
    real = len(rows)
    rows += [rows[0]] * (batch_size - real)
    keys += [keys[0]] * (batch_size - real)
    codes.append(sample_codes(model, rows, keys, seed, guidance_scale, **sampling)[:real])
  codes = np.concatenate(codes)
  return codes, decode_codes(vqgan, codes, batch_size)


def decode_codes(vqgan: Any, codes: np.ndarray, batch_size: int) -> np.ndarray:
  """uint8 images [n, H, W, 3] of codes [n, h, w], decoded batch_size at a time (the last
  call the rest): the calls drawing makes, so that the same codes give the same pixels."""
  return np.concatenate(
    [
      np.asarray(vqgan.decode(codes[start : start + batch_size]), np.uint8)
      for start in range(0, len(codes), batch_size)
    ]
  )


def generate_images(
  model: gen.LoadedModel,
  vqgan: Any,
  req: ImageRequest,
  scorer: Callable[[np.ndarray], Sequence[float]] | None = None,
  cached: bool = True,
) -> GeneratedImages:
  """The request's images: rerank or num_images candidates sampled (batch_size at a time,
  the last batch padded so every call has one shape) and decoded; with rerank, the
  num_images best by `scorer(images) -> scores` (default: `prompt_log_likelihood`)."""
  check_request(req)
  n = req.rerank or req.num_images
  b = min(req.batch_size, n)
  sampling = dict(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, cached=cached)
  codes_all, images_all = draw_images(
    model, vqgan, [req.prompt] * n, range(n), req.seed, req.guidance_scale, b, **sampling
  )
  if not req.rerank:
    return GeneratedImages(images_all, codes_all, np.arange(n), None, n)
  if scorer is None:
    scorer = lambda imgs: prompt_log_likelihood(model, imgs, req.prompt, req.batch_size)
  scores = np.asarray(scorer(images_all), np.float64)
  keep = best_candidates(scores, req.num_images)
  return GeneratedImages(images_all[keep], codes_all[keep], keep, scores[keep], n)


def run(
  req: ImageRequest,
  workdir: str,
  config: ml_collections.ConfigDict | None = None,
  step: int | None = None,
  best: bool = False,
  image_tokenizer_loader: Callable[[str, Any], Any] = load_image_tokenizer,
) -> dict[str, Any]:
  """--mode=generate for text-to-image: every check that needs no parameters first (the
  request, the model's config, the VQGAN), then the model, then the images; returns the
  index written to the output directory."""
  check_request(req)
  model_config = config if config is not None else gen.workdir_config(workdir, step, best)
  check_model_has_codes(model_config, workdir)
  vqgan_dir, vqgan_step = vqgan_location(model_config, req.vqgan_workdir)
  vqgan = image_tokenizer_loader(vqgan_dir, vqgan_step)
  check_image_tokenizer(vqgan, model_config.model, vqgan_dir)
  model = gen.load_model(workdir, step, config, best=best)
  result = generate_images(model, vqgan, req)
  extra = image_outputs.provenance(workdir, model.step, vqgan_dir, bool(req.vqgan_workdir))
  if not multihost.is_primary():  # every process samples the same images; one writes them
    return extra
  return image_outputs.write_outputs(result, req, extra)


def draws_images(
  drawing_options: bool, prompt: str | None, asks_text: bool, model_has_codes: Callable[[], bool]
) -> bool:
  """Whether --mode=generate draws: an option that only drawing takes is given
  (`drawing_options`; on a model without image codes that is then an error, not a text
  continuation), or a prompt alone (not `asks_text`: no image to caption, no question) goes
  to a model with image codes (`model_has_codes()`, asked only then: it reads a config)."""
  if drawing_options:
    return True
  if prompt is None or asks_text:
    return False
  return model_has_codes()
