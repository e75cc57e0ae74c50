"""One image loader: a file gives the model the same pixels in training (through a prepared
dataset) and in generation (read from the file), EXIF orientation and transparency included."""

import json

import numpy as np
import pytest
from PIL import Image

from m6_jax.data import images, prepare, sources, tasks
from m6_jax.errors import ImageError

SIZE = 32


def _awkward_png(path):
  """37 x 23 RGBA: red left half, blue right half, a transparent top-left corner; EXIF says
  'rotate 90 degrees clockwise to view' (orientation 6)."""
  rgba = np.zeros((23, 37, 4), np.uint8)
  rgba[:, :18] = (220, 30, 30, 255)
  rgba[:, 18:] = (30, 70, 220, 255)
  rgba[:8, :10, 3] = 0  # transparent: must come out white, not the red under it
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(rgba, "RGBA").save(path, exif=exif.tobytes())


def test_training_and_generation_see_the_same_pixels(tmp_path, tokenizer):
  _awkward_png(tmp_path / "odd.png")
  with open(tmp_path / "data.jsonl", "w") as f:
    f.write(json.dumps({"image": "odd.png", "caption": "a red and blue picture"}) + "\n")
  prepare.prepare_data(
    "image_folder_jsonl", str(tmp_path / "data.jsonl"), str(tmp_path / "tfds"), "odd", print_fn=None
  )
  example = sources.PreparedSource(str(tmp_path / "tfds"), "odd", "train", SIZE)[0]
  cfg = tasks.TaskConfig(src_len=8, tgt_len=8)
  trained_on = tasks.image_to_text(example, tokenizer, np.random.default_rng(0), cfg)["image"]

  decoded = images.load_image_file(str(tmp_path / "odd.png"), SIZE)  # --mode=generate's read
  generated_from = tasks.prefix_features(decoded, (SIZE, SIZE, 3), [], cfg.src_len)["image"]
  np.testing.assert_array_equal(trained_on, generated_from)

  # The orientation was applied (red on top after the rotation, blue at the bottom) and the
  # transparent corner (now top right) is white.
  assert decoded.shape == (SIZE, SIZE, 3)
  assert tuple(decoded[SIZE // 4, SIZE // 2]) == (220, 30, 30)
  assert tuple(decoded[3 * SIZE // 4, SIZE // 2]) == (30, 70, 220)
  assert tuple(decoded[1, SIZE - 2]) == (255, 255, 255)


def test_missing_and_corrupt_files_are_one_line_errors(tmp_path):
  with pytest.raises(ImageError, match="image file not found"):
    images.load_image_file(str(tmp_path / "nope.png"), SIZE)
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  with pytest.raises(ImageError, match="cannot read image"):
    images.load_image_file(str(tmp_path / "bad.png"), SIZE)


def test_an_unreadable_image_is_named_by_its_path_or_as_bytes(tmp_path):
  """Pillow names what it read from memory `<_io.BytesIO object at 0x...>`; the errors name
  the file, or say that bytes were read (a record names itself around them)."""
  from m6_jax.data import image_files
  from m6_jax.data.readers import Reject

  bad = tmp_path / "scene.png"
  bad.write_bytes(b"not an image at all")
  with pytest.raises(ImageError) as file_error:
    images.load_image_file(str(bad), SIZE)
  with pytest.raises(ImageError) as bytes_error:
    images.load_image(b"not an image at all", SIZE)
  with pytest.raises(Reject) as rejected:
    image_files.process_image(b"not an image at all", 64)
  messages = [str(file_error.value), str(bytes_error.value), str(rejected.value)]
  assert not [m for m in messages if "BytesIO" in m or " at 0x" in m], messages
  assert str(file_error.value).startswith(f"cannot read image {bad}: "), messages
  assert str(bytes_error.value).startswith("cannot read the image bytes: "), messages
  assert "unknown image format" in messages[0] and "unknown image format" in messages[2]
