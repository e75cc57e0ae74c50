"""Fine-tune a converted OFA-CN model (--mode=convert --from=ofa) on image captioning.

  python -m m6_jax.main --mode=convert --from=ofa --input=/data/ofa_caption_muge_base_zh \\
    --output=/tmp/ofa_muge
  python -m m6_jax.main --config=configs/finetune_ofa.py:/tmp/ofa_muge --workdir=/tmp/ofa_ft

The argument is the converted folder (append ``,runlocal`` for a 4-step smoke test). The
model and data settings are the converted model's (its config.json); the parameters start
from it (config.init_from) and its WordPiece vocabulary is the tokenizer. Trains the
image-to-text task alone, with the model's caption prompt as the source text, as OFA
fine-tunes captioning; add your data as in configs/caption_user_data.py
(--config.data.source=tfds --config.data.tfds_name=... --config.data.data_dir=...). The
text tasks of M6's pretraining (span in-filling, text continuation) are not OFA's and are
left out; the ResNet stem's BatchNorm statistics are trained as parameters (see
m6_jax/model/resnet.py), so keep the learning rate small.
"""

import json
import os

from m6_jax.config import default_config


def get_config(arg: str | None = None):
  directory, _, variant = (arg or "").partition(",")
  if not directory:
    raise ValueError("configs/finetune_ofa.py needs the converted folder: finetune_ofa.py:DIR")
  with open(os.path.join(directory, "config.json")) as f:
    saved = json.load(f)
  config = default_config()
  for section in ("model", "data"):
    for key, value in saved[section].items():
      if key in config[section] and key != "task_weights":
        config[section][key] = tuple(value) if isinstance(value, list) else value
  config.init_from = directory
  config.data.tokenizer_path = os.path.join(os.path.abspath(directory), "tokenizer", "vocab.txt")
  for task in config.data.task_weights:
    config.data.task_weights[task] = 1.0 if task == "image_to_text" else 0.0
  config.data.batch_size = 16
  config.train.steps = 2000
  config.train.lr = 1e-5
  config.train.warmup_steps = 100
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  if variant == "runlocal":
    config.train.steps = 4
    config.train.log_every = 2
    config.train.checkpoint_every = 4
    config.train.warmup_steps = 1
  elif variant:
    raise ValueError(f"Unknown variant '{variant}' of configs/finetune_ofa.py; known: runlocal.")
  return config
