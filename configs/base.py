"""The tiny CPU default: M6 on the embedded synthetic bilingual image-text world.

  python -m m6_jax.main --config=configs/base.py --workdir=/tmp/m6_base

About 0.9M parameters (4 layers, d_model 128), 9 image patches + 32 source + 32 target tokens,
the three M6 pretraining tasks mixed equally (text-to-text denoising, image-to-text,
multimodal-to-text). On 2 CPU cores it trains 600 steps in a few minutes; the image-to-text
loss ends well below half of its step-0 value (both are printed at the end).

Variant `configs/base.py:runlocal` is a 20-step smoke test.
"""

from m6_jax.config import default_config


def get_config(arg: str | None = None):
  config = default_config()
  if arg == "runlocal":
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.warmup_steps = 5
    config.data.tokenizer_corpus_examples = 500
  elif arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/base.py; known: runlocal.")
  return config
