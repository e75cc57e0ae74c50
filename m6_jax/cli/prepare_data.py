"""`--mode=prepare_data`: user images and texts (an image folder + JSONL, or MUGE TSV files)
-> a TFDS array_record dataset at --data_dir/--name (m6_jax/data/prepare.py; no config), or
with --output_format=webdataset|parquet shards at --data_dir/--name/<split>/
(m6_jax/data/prepare_shards.py) that data.source='shards' streams.

    python -m m6_jax.main --mode=prepare_data --input_format=image_folder_jsonl \\
      --input_path=/data/my_caps/captions.jsonl --validation_fraction=0.02 \\
      --data_dir=/data/tfds --name=my_caps
"""

from __future__ import annotations

import functools

from absl import flags

from m6_jax.errors import exit_with

INPUT_FORMAT = flags.DEFINE_enum(
  "input_format",
  "image_folder_jsonl",
  ["image_folder_jsonl", "muge_tsv"],
  "image_folder_jsonl (images + JSONL with image/caption/question/answer) or muge_tsv "
  "(id<TAB>base64 image TSV + JSONL of texts keyed by image id).",
)
INPUT_PATH = flags.DEFINE_string(
  "input_path",
  None,
  "A JSONL file, 'train=a.jsonl,validation=b.jsonl' (MUGE: 'train=texts.jsonl+images.tsv,"
  "...'), or a folder whose file names contain the split.",
)
DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir to write into.")
NAME = flags.DEFINE_string("name", None, "Dataset name (a folder in --data_dir).")
IMAGE_DIR = flags.DEFINE_string(
  "image_dir", "", "Folder the JSONL image paths are relative to (default: the JSONL's folder)."
)
VALIDATION_FRACTION = flags.DEFINE_float(
  "validation_fraction",
  0.0,
  "Share of images (by hash of the image) held out as the validation split when no "
  "validation file is given.",
)
MAX_TEXT_CHARS = flags.DEFINE_integer("max_text_chars", 1000, "Longest text kept.")
MAX_IMAGE_SIZE = flags.DEFINE_integer(
  "max_image_size", 512, "Images are re-encoded with their long side at most this."
)
MAX_REJECTED_FRACTION = flags.DEFINE_float(
  "max_rejected_fraction",
  0.1,
  "Stop with an error when a split rejects more than this share of its records.",
)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a finished dataset of the same name.")
OUTPUT_FORMAT = flags.DEFINE_enum(
  "output_format",
  "tfds",
  ["tfds", "webdataset", "parquet"],
  "tfds (an array_record dataset), or webdataset / parquet shards in img2dataset's layout at "
  "<data_dir>/<name>/<split>/.",
)
SHARD_SIZE = flags.DEFINE_integer("shard_size", 1000, "Records per shard (webdataset, parquet).")
TASK_MODULES = flags.DEFINE_string(
  "task_modules",
  "",
  "Comma-separated modules that register record fields (as data.task_modules does for "
  "training): their columns are read from the input and stored too (docs/tasks.md).",
)


def run() -> None:
  from m6_jax.data import prepare, prepare_shards, task_modules

  if not INPUT_PATH.value or not NAME.value:
    exit_with("--mode=prepare_data needs --input_path and --name (and usually --data_dir).")
  task_modules.import_all(TASK_MODULES.value, "--task_modules")
  if OUTPUT_FORMAT.value == "tfds":
    convert = prepare.prepare_data
  else:
    convert = functools.partial(
      prepare_shards.prepare_shards,
      output_format=OUTPUT_FORMAT.value,
      shard_size=SHARD_SIZE.value,
    )
  convert(
    INPUT_FORMAT.value,
    INPUT_PATH.value,
    DATA_DIR.value,
    NAME.value,
    validation_fraction=VALIDATION_FRACTION.value,
    image_dir=IMAGE_DIR.value or None,
    max_text_chars=MAX_TEXT_CHARS.value,
    max_image_size=MAX_IMAGE_SIZE.value,
    max_rejected_fraction=MAX_REJECTED_FRACTION.value,
    overwrite=OVERWRITE.value,
  )
