"""The scene judge: a small network that reads the synthetic world's attributes off an image.

Every synthetic caption (``m6_jax/data/synthetic.py``) states the shape, colour, size and
grid cell (of 3x3) of 1 to 3 objects, so a classifier that reads those attributes back from
pixels turns "does the generated image show its caption" into plain accuracies:

    judge = scene_judge.load_or_train("/tmp/judge")          # ~1 min on 2 CPU cores, cached
    scores = scene_scores.attribute_accuracy(judge, images, scenes)
    chance = scene_scores.chance_accuracy(judge, images, scenes)
    fd = scene_scores.frechet_distance(judge.features(real), judge.features(generated))

The scores, chance levels and Fréchet distance are ``scene_scores``'s (plain numpy on the
judge's readings). ``--mode=scene_judge`` (m6_jax/cli/scene_judge.py) trains the judge, or
loads it from its cache, and prints its held-out accuracy.

**The network** (``JudgeNet``) predicts, for each of the 9 cells, the shape with "empty" as
a sixth class (occupancy and shape are one decision), the colour (6) and the size (2), the
latter two trained only where a cell is occupied. Each cell's pixels (16x16 at 48 px, plus
a 2 px margin so that a slightly misplaced shape is still seen whole) go through one hidden
layer to 32 per-cell *features*, and from there to the three heads; all cells share the
weights. It is a per-cell MLP rather than a CNN because the grid is fixed and XLA's
convolution gradients are slow on CPU: a four-layer CNN of similar size took about ten
times longer per training step on 2 cores, while the MLP reads held-out scenes perfectly.

**Training** draws batches from ``num_train_scenes`` scenes of the world's train split,
rendered once, and augments every batch afresh: a shift of up to 2 px, a blur of random
strength (up to a Gaussian of about 1.2 px), per-channel gain and offset, Gaussian noise.
The judge is to score VQGAN reconstructions and generated images, which are slightly
blurry, noisy, off in colour and not pixel-exact; a judge that only saw the renderer's clean
pixels can be thrown by such departures and would blame the generator for its own
brittleness. The augmentation stays mild (colours far from their palette neighbours, shapes
near their cell's centre) so that it never changes what the image shows.

A trained judge is saved as ``params.msgpack`` (flax serialization) and ``judge.json`` (the
training settings, their fingerprint, the held-out accuracy); ``load_or_train`` keeps one
folder per fingerprint, so a changed setting trains a new judge instead of reusing a stale one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from m6_jax.data import synthetic
from m6_jax.errors import EvaluationError
from m6_jax.evaluation.scene_scores import (
  COLOR_NAMES,
  EMPTY,
  NUM_CELLS,
  evaluate_on_world,
  render,
  scene_targets,
  world_scenes,
)

# Bump when the network, the augmentation or the labels change: cached judges then retrain.
FORMAT_VERSION = 2
_PARAMS_FILE = "params.msgpack"
_META_FILE = "judge.json"
# The augmentation's strength (images in [0, 1]): shifts, blur, colour, noise.
MAX_SHIFT = 2  # px
MAX_BLUR_PASSES = 3  # of a 3x3 binomial kernel; 3 passes ~ a Gaussian of sigma 1.2 px
MAX_GAIN = 0.06  # per-channel gain in [1 - g, 1 + g]
MAX_OFFSET = 0.03  # per-channel offset
MAX_NOISE = 0.04  # noise sigma (about 10 grey levels)
_NOISE_BANK_SIZE = 512  # noise images to draw the augmentation's noise from
_PREDICT_BATCH = 256  # the most images per jitted call


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Everything that decides the trained judge; its fingerprint names the cache folder."""

  seed: int = 0  # the world's seed (train scenes) and the init / augmentation key
  num_steps: int = 1500
  batch_size: int = 64
  learning_rate: float = 3e-3
  num_train_scenes: int = 5000
  image_size: int = 48

  def check(self) -> None:
    problems = []
    if self.seed < 0:
      problems.append(f"seed must be >= 0, got {self.seed}")
    for name in ("num_steps", "batch_size", "num_train_scenes"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if not self.learning_rate > 0:
      problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.image_size < 12 or self.image_size % 3:
      problems.append(f"image_size must be a multiple of 3 (>= 12), got {self.image_size}")
    if problems:
      raise EvaluationError("scene judge: " + "; ".join(problems) + ".")

  def fingerprint(self) -> str:
    settings = dict(dataclasses.asdict(self), format_version=FORMAT_VERSION)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class JudgeNet(nn.Module):
  """Images [b, s, s, 3] in [0, 1] -> per-cell logits [b, 9, classes] of ``shape``,
  ``color`` and ``size``, and ``features`` [b, 9 * cell_features] (see the module doc)."""

  margin: int = 2
  hidden: int = 256
  cell_features: int = 32

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    b, s = images.shape[:2]
    cell, m = s // 3, self.margin
    padded = jnp.pad(images - 0.5, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    crops = [
      padded[:, r * cell : (r + 1) * cell + 2 * m, c * cell : (c + 1) * cell + 2 * m]
      for r in range(3)
      for c in range(3)
    ]
    x = jnp.stack(crops, axis=1).reshape(b, NUM_CELLS, -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    feats = nn.relu(nn.Dense(self.cell_features)(x))
    return {
      "shape": nn.Dense(len(synthetic.SHAPES) + 1)(feats),
      "color": nn.Dense(len(COLOR_NAMES))(feats),
      "size": nn.Dense(len(synthetic.SIZES))(feats),
      "features": feats.reshape(b, NUM_CELLS * self.cell_features),
    }


# --------------------------------------------------------------------------------------
# Labels, images, augmentation
# --------------------------------------------------------------------------------------


def _blur(x: jax.Array) -> jax.Array:
  """A 3x3 binomial blur per channel (edges replicated)."""
  k = jnp.array([1.0, 2.0, 1.0]) / 4.0
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = x.shape[1:3]
  rows = sum(k[i] * padded[:, i : i + h] for i in range(3))
  return sum(k[j] * rows[:, :, j : j + w] for j in range(3))


def augment(key: jax.Array, images: jax.Array, noise_bank: jax.Array) -> jax.Array:
  """Mild, label-preserving damage to float images in [0, 1] (why: the module doc).

  ``noise_bank`` [n, s, s, 3] holds standard-normal noise images drawn once: picking one per
  image costs a gather, while drawing fresh noise on the CPU costs more than the step.
  """
  b, h, w, _ = images.shape
  # One draw for every random choice: each call site of the PRNG costs compile time.
  u = jax.random.uniform(key, (b, 11))
  shift, blur, gain, offset = u[:, 0:2], u[:, 2], u[:, 3:6], u[:, 6:9]
  sigma, noise_index = u[:, 9], u[:, 10]
  # Shift by up to MAX_SHIFT px (edges replicated): generated shapes need not sit pixel-exact.
  m = MAX_SHIFT
  padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
  dy, dx = (shift * (2 * m + 1)).astype(jnp.int32).T
  x = jax.vmap(lambda im, y0, x0: jax.lax.dynamic_slice(im, (y0, x0, 0), (h, w, 3)))(padded, dy, dx)
  # Blur of random strength, from none to MAX_BLUR_PASSES passes of the 3x3 kernel
  # (interpolating between consecutive passes).
  passes = [x]
  for _ in range(MAX_BLUR_PASSES):
    passes.append(_blur(passes[-1]))
  t = (blur * MAX_BLUR_PASSES)[:, None, None, None]
  for i in range(MAX_BLUR_PASSES):
    x = jnp.where(t >= i, passes[i] + jnp.clip(t - i, 0, 1) * (passes[i + 1] - passes[i]), x)
  # Colour: per-channel gain and offset.
  x = x * (1 + MAX_GAIN * (2 * gain[:, None, None, :] - 1))
  x = x + MAX_OFFSET * (2 * offset[:, None, None, :] - 1)
  # Gaussian noise of random strength.
  noise = noise_bank[(noise_index * len(noise_bank)).astype(jnp.int32)]
  x = x + MAX_NOISE * sigma[:, None, None, None] * noise
  return jnp.clip(x, 0.0, 1.0)


def _to_float(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) / 255.0


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _loss(net: JudgeNet, params, images, targets) -> jax.Array:
  """Cross-entropy of the shape (incl. empty) over all cells, plus that of the colour and
  size averaged over the occupied cells (elsewhere they have no answer)."""
  out = net.apply({"params": params}, images)
  ce = optax.softmax_cross_entropy_with_integer_labels
  occupied = (targets["shape"] != EMPTY).astype(jnp.float32)
  per_object = ce(out["color"], targets["color"]) + ce(out["size"], targets["size"])
  object_loss = (per_object * occupied).sum() / jnp.maximum(occupied.sum(), 1.0)
  return ce(out["shape"], targets["shape"]).mean() + object_loss


def train_judge(
  seed: int = 0,
  num_steps: int = TrainSettings.num_steps,
  batch_size: int = TrainSettings.batch_size,
  learning_rate: float = TrainSettings.learning_rate,
  num_train_scenes: int = TrainSettings.num_train_scenes,
  image_size: int = TrainSettings.image_size,
  log: Callable[[str], None] | None = None,
  log_every: int = 100,
) -> Judge:
  """A judge trained on ``num_train_scenes`` scenes of the world ``seed``'s train split
  (AdamW with warmup and cosine decay, fresh augmentation every step). ``log`` (e.g.
  ``print``) gets a progress line (step, loss, steps/s) every ``log_every`` steps."""
  settings = TrainSettings(seed, num_steps, batch_size, learning_rate, num_train_scenes, image_size)
  settings.check()
  start = time.perf_counter()
  scenes = world_scenes(seed, "train", num_train_scenes)
  noise_shape = (_NOISE_BANK_SIZE, image_size, image_size, 3)
  data = {
    "images": jnp.asarray(render(scenes, image_size)),
    "targets": {k: jnp.asarray(v) for k, v in scene_targets(scenes).items()},
    "noise_bank": jnp.asarray(np.random.default_rng(seed).standard_normal(noise_shape, np.float32)),
  }
  if log:
    log(f"rendered {num_train_scenes} train scenes in {time.perf_counter() - start:.1f}s")

  net = JudgeNet()
  # XLA's own generator ("rbg"): threefry's unrolled rounds cost seconds of compile time at
  # every place that draws, more than this training needs its bit-exact portability.
  key_init, key_train = jax.random.split(jax.random.key(seed, impl="rbg"))
  params = jax.jit(net.init)(key_init, jnp.zeros((1, image_size, image_size, 3)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, min(100, num_steps // 10), num_steps, learning_rate * 0.02
  )
  optimizer = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = optimizer.init(params)

  # The data are arguments, not closed-over constants: XLA would fold constants of this size
  # into the program and compile for many seconds.
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, step_index, data):
    key = jax.random.fold_in(key_train, step_index)
    k_batch, k_aug = jax.random.split(key)
    idx = jax.random.randint(k_batch, (batch_size,), 0, num_train_scenes)
    batch = augment(k_aug, _to_float(data["images"][idx]), data["noise_bank"])
    batch_targets = {k: v[idx] for k, v in data["targets"].items()}
    loss, grads = jax.value_and_grad(lambda p: _loss(net, p, batch, batch_targets))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  last_time, last_step = time.perf_counter(), 0
  for i in range(num_steps):
    params, opt_state, loss = step(params, opt_state, i, data)
    if log and ((i + 1) % log_every == 0 or i + 1 == num_steps):
      loss = float(loss)
      now = time.perf_counter()
      rate = (i + 1 - last_step) / (now - last_time)
      log(f"step {i + 1}/{num_steps} | loss {loss:.4f} | {rate:.1f} steps/s")
      last_time, last_step = now, i + 1
  return Judge(settings, jax.device_get(params))


# --------------------------------------------------------------------------------------
# The trained judge
# --------------------------------------------------------------------------------------


class Judge:
  """A trained ``JudgeNet`` with the settings it was trained with."""

  def __init__(self, settings: TrainSettings, params: Any):
    self.settings = settings
    self.params = params
    self._net = JudgeNet()
    self._apply = jax.jit(lambda p, x: self._net.apply({"params": p}, _to_float(x)))

  def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    s = self.settings.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
      raise EvaluationError(
        f"the scene judge takes uint8 images [batch, {s}, {s}, 3]; got {images.dtype} "
        f"{list(images.shape)}."
      )
    outs = []
    for start in range(0, len(images), _PREDICT_BATCH):
      chunk = images[start : start + _PREDICT_BATCH]
      # Padded to a power of two: a few compiled shapes serve any number of images.
      padded = np.zeros((max(8, 1 << (len(chunk) - 1).bit_length()), s, s, 3), np.uint8)
      padded[: len(chunk)] = chunk
      out = jax.device_get(self._apply(self.params, padded))
      outs.append({k: v[: len(chunk)] for k, v in out.items()})
    if not outs:
      raise EvaluationError("the scene judge got no images.")
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 [b, s, s, 3] -> int32 [b, 9] per cell: ``shape`` (EMPTY = 0, else 1 + index in
    SHAPES), ``color`` (index in COLORS), ``size`` (index in SIZES); colour and size mean
    nothing where the predicted shape is EMPTY."""
    out = self._run(images)
    return {k: out[k].argmax(-1).astype(np.int32) for k in ("shape", "color", "size")}

  def features(self, images: np.ndarray) -> np.ndarray:
    """float32 [b, 9 * cell_features]: the per-cell penultimate layer, cells concatenated
    (so the features say where things are, not only what)."""
    return self._run(images)["features"].astype(np.float32)

  def save(self, directory: str, extra: Mapping[str, Any] | None = None) -> None:
    """Writes ``params.msgpack`` and ``judge.json`` (settings, fingerprint, ``extra``)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _PARAMS_FILE), "wb") as f:
      f.write(flax.serialization.to_bytes(self.params))
    meta = {
      "format_version": FORMAT_VERSION,
      "fingerprint": self.settings.fingerprint(),
      "settings": dataclasses.asdict(self.settings),
      **(extra or {}),
    }
    with open(os.path.join(directory, _META_FILE), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)

  @classmethod
  def load(cls, directory: str) -> Judge:
    """The judge saved in ``directory``; EvaluationError if it is missing or unreadable."""
    try:
      with open(os.path.join(directory, _META_FILE)) as f:
        meta = json.load(f)
      settings = TrainSettings(**meta["settings"])
      if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('format_version')} != {FORMAT_VERSION}")
      s = settings.image_size
      template = jax.eval_shape(JudgeNet().init, jax.random.key(0), jnp.zeros((1, s, s, 3)))
      with open(os.path.join(directory, _PARAMS_FILE), "rb") as f:
        params = flax.serialization.from_bytes(template["params"], f.read())
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise EvaluationError(f"cannot load a scene judge from {directory!r}: {e}") from e
    return cls(settings, jax.tree.map(np.asarray, params))


def load_or_train(cache_dir: str, log: Callable[[str], None] | None = None, **settings) -> Judge:
  """The judge cached in ``cache_dir`` for these ``train_judge`` settings, else trains one,
  scores it on validation scenes and caches it (written to a temporary folder first, so an
  interrupted run leaves no half-written judge behind)."""
  wanted = TrainSettings(**settings)
  wanted.check()
  directory = os.path.join(cache_dir, f"judge_{wanted.fingerprint()}")
  if os.path.isdir(directory):
    try:
      judge = Judge.load(directory)
      if judge.settings == wanted:
        if log:
          log(f"loaded the scene judge from {directory}")
        return judge
    except EvaluationError as e:
      if log:
        log(f"retraining: {e}")
  os.makedirs(cache_dir, exist_ok=True)  # before training: an unusable folder fails at once
  tmp = tempfile.mkdtemp(prefix=".judge_", dir=cache_dir)
  try:
    judge = train_judge(**dataclasses.asdict(wanted), log=log)
    held_out = evaluate_on_world(judge, wanted.seed, image_size=wanted.image_size)
    judge.save(tmp, extra={"held_out": held_out})
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  if log:
    log(f"saved the scene judge to {directory}")
  return judge
