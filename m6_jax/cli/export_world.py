"""`--mode=export_world`: the synthetic world written out as a user's dataset would be, an
image folder + JSONL, or WebDataset / Parquet shards (m6_jax/data/export_world.py), to walk
the user-data and streaming paths offline.

    python -m m6_jax.main --mode=export_world --output_dir=/tmp/world_files
    python -m m6_jax.main --mode=export_world --format=webdataset --output_dir=/tmp/world_wds
"""

from __future__ import annotations

from absl import flags

from m6_jax.errors import exit_with

OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write the files or shards into.")
NUM_TRAIN = flags.DEFINE_integer("num_train", 4000, "Train images.")
NUM_VALIDATION = flags.DEFINE_integer("num_validation", 300, "Validation images.")
IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Image side in pixels.")
CAPTION_LANGUAGE = flags.DEFINE_enum(
  "caption_language", "zh", ["zh", "en", "both"], "Caption language(s) of each image."
)
SEED = flags.DEFINE_integer("seed", 0, "The world's seed.")
FORMAT = flags.DEFINE_enum(
  "format",
  "files",
  ["files", "webdataset", "parquet"],
  "files: images/ + <split>.jsonl; webdataset / parquet: <split>/00000.tar (.parquet) shards "
  "in img2dataset's layout.",
)
SHARD_SIZE = flags.DEFINE_integer("shard_size", 1000, "Records per shard (webdataset, parquet).")
IMAGE_FORMAT = flags.DEFINE_enum(
  "image_format", "png", ["png", "jpg"], "How the images are stored: png, or jpg (JPEG quality 95)."
)


def run() -> None:
  from m6_jax.data import export_world

  if not OUTPUT_DIR.value:
    exit_with("--output_dir is required, e.g. --output_dir=/tmp/world_files")
  if NUM_TRAIN.value < 1 or NUM_VALIDATION.value < 1 or IMAGE_SIZE.value < 16:
    exit_with("--num_train and --num_validation must be >= 1, --image_size >= 16")
  if SHARD_SIZE.value < 1:
    exit_with("--shard_size must be >= 1")
  try:
    paths = export_world.export(
      OUTPUT_DIR.value,
      NUM_TRAIN.value,
      NUM_VALIDATION.value,
      IMAGE_SIZE.value,
      CAPTION_LANGUAGE.value,
      SEED.value,
      FORMAT.value,
      SHARD_SIZE.value,
      IMAGE_FORMAT.value,
    )
  except OSError as e:
    exit_with(f"cannot write to {OUTPUT_DIR.value!r}: {e.strerror or e}")
  for split, path in paths.items():
    print(f"{split}: {path}")
