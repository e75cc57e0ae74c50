"""Code grids stored once: a trained VQGAN as ImageTokenizer, encode_dataset, the pipeline's
`image_codes`, the fingerprint check; and the VQGAN's evaluation and CLI modes."""

import json
import os

import numpy as np
import pytest

from m6_jax.checkpoint import checkpoints
from m6_jax.data import image_codes, pipeline
from m6_jax.errors import CheckpointError, ConfigError
from m6_jax.evaluation import vqgan_eval
from m6_jax.infer.image_tokenizer import ImageTokenizer
from m6_jax.train import loop


def _config():
  from m6_jax.config import default_config

  c = default_config()
  c.model.family = "vqgan"
  c.data.image_size = 16
  c.data.batch_size = 8
  c.data.num_train_examples = 24
  c.data.num_eval_examples = 12
  v = c.vqgan
  v.channels, v.channel_multipliers, v.downsample_factor = 8, (1, 1, 1), 4
  v.codebook_size, v.code_dim = 16, 4
  c.train.steps, c.train.log_every, c.train.warmup_steps = 2, 1, 0
  c.mesh.data = 2  # inference on the training mesh (2 of the 8 devices)
  return c


@pytest.fixture(scope="module")
def vqgan(tmp_path_factory):
  """(config, workdir) of a VQGAN trained for 2 steps."""
  workdir = str(tmp_path_factory.mktemp("vqgan"))
  config = _config()
  loop.train(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_the_image_tokenizer_encodes_deterministically_in_any_batch(vqgan):
  config, workdir = vqgan
  tokenizer = ImageTokenizer.load(workdir)
  assert (tokenizer.codebook_size, tokenizer.grid, tokenizer.image_size) == (16, (4, 4), 16)
  assert tokenizer.step == 2 and tokenizer.workdir == workdir
  images = np.random.default_rng(0).integers(0, 256, (70, 16, 16, 3), dtype=np.uint8)
  codes = tokenizer.encode(images)  # 70 images: two padded chunks
  assert codes.shape == (70, 4, 4) and codes.dtype == np.int32
  np.testing.assert_array_equal(tokenizer.encode(images[5:6]), codes[5:6])
  np.testing.assert_array_equal(tokenizer.encode(images), codes)
  decoded = tokenizer.decode(codes[:3])
  assert decoded.shape == (3, 16, 16, 3) and decoded.dtype == np.uint8
  assert tokenizer.encode(images[:0]).shape == (0, 4, 4)
  with pytest.raises(ValueError, match="codes must be in"):
    tokenizer.decode(np.full((1, 4, 4), 16))
  with pytest.raises(ValueError, match="uint8 images"):
    tokenizer.encode(images.astype(np.float32))


@pytest.mark.slow
def test_loading_something_else_than_a_vqgan_is_one_clear_error(vqgan, tmp_path, monkeypatch):
  with pytest.raises(CheckpointError, match="no checkpoint"):
    ImageTokenizer.load(str(tmp_path))
  _, workdir = vqgan
  with pytest.raises(CheckpointError, match="no checkpoint step 7"):
    ImageTokenizer.load(workdir, checkpoint_step=7)
  saved = checkpoints.saved_config
  monkeypatch.setattr(
    checkpoints, "saved_config", lambda *a: dict(saved(*a), model={"family": "m6"})
  )
  with pytest.raises(ConfigError, match="family 'm6', not a VQGAN"):
    ImageTokenizer.load(workdir)


@pytest.mark.slow
def test_codes_round_trip_through_the_dataset_and_check_their_source(vqgan, tmp_path):
  config, workdir = vqgan
  tokenizer = ImageTokenizer.load(workdir)
  codes_dir = str(tmp_path / "codes")
  info = image_codes.encode_dataset(tokenizer, config, codes_dir)
  assert info["splits"] == {"train": 24, "validation": 12} and info["grid"] == [4, 4]
  saved = json.loads(open(os.path.join(codes_dir, "codes_info.json")).read())
  assert saved["source"] == {
    "kind": "synthetic",
    "seed": 0,
    "image_size": 16,
    "splits": {"train": 24, "validation": 12},
  }
  assert saved["vqgan_step"] == 2 and saved["vqgan_workdir"] == os.path.abspath(workdir)
  assert np.load(os.path.join(codes_dir, "train.npy")).dtype == np.uint16

  m6 = config.copy_and_resolve_references()
  m6.data.image_codes_dir = codes_dir
  m6.data.num_train_examples = 20  # fewer examples than were encoded: still this source
  for split in ("train", "validation"):
    source, _ = pipeline.open_source(m6, split, [])
    for i in (0, len(source) - 1):
      example = source[i]
      assert example["image_codes"].dtype == np.int32
      np.testing.assert_array_equal(
        example["image_codes"], tokenizer.encode(example["image"][None])[0]
      )

  other = m6.copy_and_resolve_references()
  other.seed = 1
  with pytest.raises(ConfigError, match=r"another data source \(seed 0 \(codes\) != 1"):
    pipeline.open_source(other, "train", [])
  other = m6.copy_and_resolve_references()
  other.data.num_train_examples = 30
  with pytest.raises(ConfigError, match="has 24 coded examples but the data has 30"):
    pipeline.open_source(other, "train", [])
  other.data.image_codes_dir = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="has no codes_info.json"):
    pipeline.open_source(other, "train", [])
  with pytest.raises(ConfigError, match="not empty"):
    image_codes.encode_dataset(tokenizer, config, codes_dir)


def test_eval_metrics_cover_the_whole_split():
  # Usage over the whole set, not per batch: two batches using codes {0, 1} and {2, 3}.
  histogram = np.bincount([0, 1, 0, 2, 3, 3], minlength=8)
  metrics = vqgan_eval.code_metrics(histogram)
  assert metrics["codebook_usage"] == 0.5
  p = np.array([2, 1, 1, 2]) / 6
  assert metrics["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
  image = np.full((1, 4, 4, 3), 100, np.uint8)
  assert vqgan_eval.psnr(image, image + 1)[0] == pytest.approx(10 * np.log10(255.0**2))


@pytest.mark.slow
def test_eval_and_encode_images_from_the_command_line(vqgan, tmp_path, run_main):
  _, workdir = vqgan
  result = run_main("--mode=eval", f"--workdir={workdir}", devices=2)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "eval step 2: psnr" in result.stdout and "over 12 held-out images" in result.stdout
  metrics = json.loads(open(os.path.join(workdir, "eval_metrics.json")).read())["metrics"]
  assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 16
  assert metrics["num_images"] == 12
  result = run_main("--mode=encode_images", f"--workdir={workdir}", devices=2)
  assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
    "error: --mode=encode_images needs --codes_dir, a new directory for the code grids."
  )
