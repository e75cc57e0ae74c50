"""The files text-to-image writes (m6_jax/infer/image_outputs.py): one set per prompt, never
overwritten without `overwrite`, and an index that records no path the user did not give."""

import json
import os

import numpy as np
import pytest

from m6_jax.errors import GenerationError
from m6_jax.infer import image_outputs
from m6_jax.infer import text_to_image as t2i

RED = "中间有一个大的红色圆形。"
PURPLE = "左上角有一个大的紫色三角形。"


def _result(value: int, n: int = 2) -> t2i.GeneratedImages:
  images = np.full((n, 8, 8, 3), value, np.uint8)
  return t2i.GeneratedImages(images, np.zeros((n, 2, 2), np.int32), np.arange(n), None, n)


def _index(out, prompt) -> dict:
  names = [n for n in os.listdir(out) if n.endswith(".json")]
  for name in names:
    with open(os.path.join(out, name), encoding="utf-8") as f:
      index = json.load(f)
    if index["prompt"] == prompt:
      return index
  raise AssertionError(f"no index JSON for {prompt!r} among {names}")


def test_two_chinese_prompts_in_one_directory_keep_their_own_files(tmp_path):
  out = str(tmp_path)
  red = image_outputs.write_outputs(_result(10), t2i.ImageRequest(RED, 2, out))
  purple = image_outputs.write_outputs(_result(20), t2i.ImageRequest(PURPLE, 2, out))
  red_files, purple_files = red["files"] + [red["grid"]], purple["files"] + [purple["grid"]]
  assert not set(red_files) & set(purple_files)
  assert len(os.listdir(out)) == 2 * 4  # two images, a grid and an index each
  assert _index(out, RED) == red and _index(out, PURPLE) == purple
  assert np.asarray(image_outputs.Image.open(os.path.join(out, red["files"][0]))).max() == 10
  # Names: the prompt's ASCII words (none here) and a hash of the whole prompt.
  assert red["grid"].startswith("image-") and red["grid"] != purple["grid"]
  english = image_outputs.output_names("a small red circle.", 1)
  assert english[0].startswith("a-small-red-circle-") and english[-1].endswith(".json")


def test_an_existing_file_is_never_overwritten_without_overwrite(tmp_path):
  out = str(tmp_path)
  first = image_outputs.write_outputs(_result(10), t2i.ImageRequest(RED, 2, out, seed=1))
  again = t2i.ImageRequest(RED, 2, out, seed=2)
  # Before any sampling (check_request runs first in run and generate_images) ...
  with pytest.raises(GenerationError) as e:
    t2i.check_request(again)
  message = str(e.value)
  assert "\n" not in message and "--overwrite" in message
  assert os.path.join(out, first["files"][0]) in message
  # ... and when writing.
  with pytest.raises(GenerationError, match="--overwrite"):
    image_outputs.write_outputs(_result(30), again)
  assert _index(out, RED)["seed"] == 1
  replaced = t2i.ImageRequest(RED, 2, out, seed=2, overwrite=True)
  t2i.check_request(replaced)
  image_outputs.write_outputs(_result(30), replaced)
  assert _index(out, RED)["seed"] == 2
  # More images than before: the first new file is named.
  with pytest.raises(GenerationError, match="_0.png exists"):
    t2i.check_request(t2i.ImageRequest(RED, 3, out))


def test_the_index_records_paths_as_given_and_the_vqgan_relative_to_the_workdir(tmp_path):
  workdir, vqgan = str(tmp_path / "runs" / "m6_t2i"), str(tmp_path / "runs" / "vqgan")
  # Found through the model's codes (codes_info.json holds an absolute path): relative.
  found = image_outputs.provenance(workdir, 3600, vqgan, vqgan_given=False)
  assert found == {"workdir": workdir, "step": 3600, "vqgan_workdir": "../vqgan"}
  # Given by the user (--workdir, --vqgan_workdir): as given.
  given = image_outputs.provenance("runs/m6_t2i", 3600, "runs/vqgan", vqgan_given=True)
  assert given == {"workdir": "runs/m6_t2i", "step": 3600, "vqgan_workdir": "runs/vqgan"}
