"""User data end to end through the CLI: --mode=prepare_data, then --mode=train on it, as a
user runs it: JAX_PLATFORMS unset on a CPU machine with libtpu installed (the test
requirements bring it), which must run on the CPU without TPU error lines."""

import json
import os

import pytest
from PIL import Image

from m6_jax.cli import bootstrap
from m6_jax.data import synthetic

# Multi-process / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow


def test_prepare_data_then_train(tmp_path, run_main):
  (tmp_path / "images").mkdir()
  lines = []
  for i in range(24):
    example = synthetic.make_example(3, i, 64)
    Image.fromarray(example["image"]).save(tmp_path / "images" / f"{i}.png")
    lines.append({"image": f"images/{i}.png", "caption": example["caption_en"]})
  lines.append({"image": "images/nope.png", "caption": "a red circle"})  # missing file
  (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")

  data_dir = tmp_path / "tfds"
  prep = run_main(
    "--mode=prepare_data",
    f"--input_path={tmp_path / 'captions.jsonl'}",
    f"--data_dir={data_dir}",
    "--name=caps",
  )
  assert prep.returncode == 0, prep.stderr
  assert "missing_image         1" in prep.stdout, prep.stdout
  assert os.path.isdir(data_dir / "caps" / "1.0.0")

  train = run_main(
    f"--config=configs/caption_user_data.py:{data_dir / 'caps'},runlocal",
    f"--workdir={tmp_path / 'work'}",
    "--config.train.steps=4",
    "--config.model.num_layers=1",
    platforms=None if not bootstrap.has_tpu_chip() else "cpu",
  )
  assert train.returncode == 0, train.stderr
  assert "JAX platforms: cpu" in train.stderr
  for noise in ("host bounds", "TPU_WORKER_HOSTNAMES", "E0000", "libtpu_init"):
    assert noise not in train.stderr, train.stderr[-3000:]
  assert "step 4/4" in train.stderr and "image_to_text loss" in train.stdout
  # The tokenizer was trained on the dataset's own captions.
  assert "on the dataset's texts" in train.stderr

  again = run_main(
    "--mode=prepare_data",
    f"--input_path={tmp_path / 'captions.jsonl'}",
    f"--data_dir={data_dir}",
    "--name=caps",
  )
  assert again.returncode == 2 and "error: " in again.stderr and "Traceback" not in again.stderr
