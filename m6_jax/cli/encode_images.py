"""`--mode=encode_images`: the VQGAN of --workdir encodes the train and validation images of a
data source (--config's, default the VQGAN's own) into code grids in --codes_dir, once, so
text-to-image training never runs the VQGAN (m6_jax/data/image_codes.py)."""

from __future__ import annotations

from absl import flags

from m6_jax.cli import common
from m6_jax.errors import exit_with

CODES_DIR = flags.DEFINE_string("codes_dir", None, "A new directory for the code grids.")
CHECKPOINT_STEP = flags.DEFINE_integer(
  "checkpoint_step", None, "The VQGAN checkpoint step (default: the latest)."
)


def run() -> None:
  from m6_jax.data import image_codes
  from m6_jax.infer.image_tokenizer import ImageTokenizer

  config = common.load_config(
    "encode_images", required=False, workdir_hint="a trained VQGAN workdir"
  )
  if not CODES_DIR.value:
    exit_with("--mode=encode_images needs --codes_dir, a new directory for the code grids.")
  tokenizer = ImageTokenizer.load(common.WORKDIR.value, CHECKPOINT_STEP.value)
  info = image_codes.encode_dataset(tokenizer, config or tokenizer.config, CODES_DIR.value)
  print(f"wrote the code grids {info['splits']} ({info['grid']} codes each) to {CODES_DIR.value}")
