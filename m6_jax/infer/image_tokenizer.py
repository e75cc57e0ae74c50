"""A trained VQGAN as an image tokenizer: images <-> grids of discrete codes (text-to-image).

    tokenizer = ImageTokenizer.load("/tmp/vqgan")        # latest checkpoint of a VQGAN workdir
    codes = tokenizer.encode(images)     # uint8 [b, H, W, 3] -> int32 [b, h, w]
    images = tokenizer.decode(codes)     # int [b, h, w] -> uint8 [b, H, W, 3]

The parameters are restored onto the mesh of the workdir's config (all devices over the
batch when that mesh does not fit here), like generation's; images and codes are split over
the batch axes. Encoding and decoding are jitted once, for a fixed batch (`batch_size`,
rounded up to the batch shards): any number of images goes through in padded chunks, so no
call recompiles. Encoding is deterministic (nearest code, no noise).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from m6_jax.checkpoint import checkpoints
from m6_jax.errors import ConfigError
from m6_jax.infer import generate
from m6_jax.model import features
from m6_jax.model import vqgan as vqgan_lib
from m6_jax.parallel import partitioning

__all__ = ["ImageTokenizer"]


@functools.lru_cache(maxsize=8)
def _jitted(model: vqgan_lib.VQGAN) -> tuple[Any, Any]:
  """(encode, decode) of `model`, jitted (shared by every tokenizer of this model)."""
  encode = jax.jit(lambda p, images: model.apply({"params": p}, images, method="tokenize"))
  decode = jax.jit(lambda p, codes: model.apply({"params": p}, codes, method="decode_codes"))
  return encode, decode


def abstract_params(config: vqgan_lib.VQGANConfig, mesh, rules) -> Any:
  """The training parameter tree as ShapeDtypeStructs with their shardings on `mesh`."""
  boxed = jax.eval_shape(lambda: vqgan_lib.init_params(config, jax.random.PRNGKey(0)))
  shardings = partitioning.logical_to_shardings(boxed, mesh, rules)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )


class ImageTokenizer:
  """Encode images to code grids and decode code grids to images with a trained VQGAN."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    params: Any,
    step: int,
    workdir: str,
    mesh,
    rules,
    batch_size: int = 64,
  ):
    """`params`: the VQGAN's ("generator") parameters, sharded over `mesh`."""
    self.config = config
    self.model = vqgan_lib.VQGAN(vqgan_lib.VQGANConfig.from_config(config))
    c = self.model.config
    self.codebook_size: int = c.codebook_size
    self.grid: tuple[int, int] = c.grid
    self.image_size: int = c.image_size
    self.step, self.workdir = int(step), workdir
    self.params, self.mesh, self.rules = params, mesh, rules
    shards = partitioning.batch_rows_multiple(mesh, rules)
    self.batch_size = -(-int(batch_size) // shards) * shards

  @classmethod
  def load(
    cls,
    workdir: str,
    checkpoint_step: int | None = None,
    devices: Sequence[jax.Device] | None = None,
  ) -> ImageTokenizer:
    """The VQGAN of `workdir`'s checkpoint `checkpoint_step` (None: the newest intact one),
    on the mesh of its config over `devices` (default: all). CheckpointError when the workdir
    holds no checkpoint (or not that step, or that step is damaged), ConfigError when it
    holds another model family."""
    devices = list(devices if devices is not None else jax.devices())

    def load(ckpts: checkpoints.Checkpoints, step: int) -> ImageTokenizer:
      saved = checkpoints.saved_config(ckpts, step, workdir)
      family = saved.get("model", {}).get("family", "m6")
      if family != "vqgan":
        raise ConfigError(
          f"{workdir} holds a model of family '{family}', not a VQGAN (model.family='vqgan'); "
          "point at a workdir trained with --config=configs/vqgan.py."
        )
      config = generate.inference_config(saved, None, len(devices))
      mesh = partitioning.make_mesh(config, devices)
      rules = partitioning.logical_rules(config)
      target = abstract_params(vqgan_lib.VQGANConfig.from_config(config), mesh, rules)
      loaded = checkpoints.read_params(ckpts, step, target)
      return cls(config, loaded.params["generator"], loaded.step, workdir, mesh, rules)

    step = None if checkpoint_step is None else int(checkpoint_step)
    return checkpoints.load_intact(workdir, load, step)

  def _in_batches(self, fn, inputs: np.ndarray, dtype, item_shape) -> np.ndarray:
    """fn(params, batch) over `inputs` in padded batches of `batch_size`, on the mesh."""
    out = [np.zeros((0,) + tuple(item_shape), dtype)]
    with partitioning.mesh_context(self.mesh, self.rules):
      for start in range(0, len(inputs), self.batch_size):
        chunk = inputs[start : start + self.batch_size]
        padded = np.zeros((self.batch_size,) + chunk.shape[1:], chunk.dtype)
        padded[: len(chunk)] = chunk
        placed, _ = partitioning.put_full_batch({"x": padded}, self.mesh, self.rules)
        out.append(np.asarray(jax.device_get(fn(self.params, placed["x"])))[: len(chunk)])
    return np.concatenate(out).astype(dtype)

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 [b, H, W, 3] (H = W = image_size) -> int32 codes [b, h, w]."""
    images = np.asarray(images)
    want = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.uint8:
      raise ValueError(
        f"encode takes uint8 images [b, {want[0]}, {want[1]}, 3], got {images.dtype} "
        f"{list(images.shape)}; resize them with m6_jax.data.images.load_image first."
      )
    encode, _ = _jitted(self.model)
    return self._in_batches(encode, features.pixels(images), np.int32, self.grid)

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """int codes [b, h, w] in [0, codebook_size) -> uint8 images [b, H, W, 3]."""
    codes = np.asarray(codes)
    integer = np.issubdtype(codes.dtype, np.integer)
    if codes.ndim != 3 or codes.shape[1:] != self.grid or not integer:
      raise ValueError(
        f"decode takes integer codes [b, {self.grid[0]}, {self.grid[1]}], got {codes.dtype} "
        f"{list(codes.shape)}."
      )
    if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
      raise ValueError(
        f"codes must be in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]."
      )
    _, decode = _jitted(self.model)
    image_shape = (self.image_size, self.image_size, 3)
    pixels = self._in_batches(decode, codes.astype(np.int32), np.float32, image_shape)
    return np.round(pixels * 255.0).astype(np.uint8)
