"""The tiny CPU default: M6 on the embedded synthetic bilingual image-text world.

  python -m m6_jax.main --config=configs/base.py --workdir=/tmp/m6_base

About 1.0M parameters (4 layers, d_model 128), 9 image patches + <= 48 source + <= 48 target
tokens, trained 800 steps at lr 2e-3 on every task the README's tour shows on its workdir:
captioning (image_to_text, weight 1), visual question answering (vqa, 1), text continuation
(text_lm, 0.5), and the other two M6 pretraining tasks, span in-filling (text_to_text) and
multimodal-to-text, at 0.25. Length bucketing by 16 (data.length_bucket): batches drop their
all-padding text columns, same losses, fewer FLOPs.

Should reach: image_to_text loss 6.95 -> 0.25 (printed at the end) in 3 to 7 minutes on 2 CPU
cores; held-out (--mode=eval) VQA accuracy 50%, captions BLEU-4 77. How the mixture,
learning rate and bucketing were chosen: docs/training.md. Trade-off of the weights: the
captions, which name every object's place, teach where things are for VQA too (VQA at 2 did
worse).

Variant `configs/base.py:runlocal` is a 20-step smoke test without length bucketing: one
step shape to compile instead of up to nine, which would take most of its time.
"""

from m6_jax.config import default_config


def get_config(arg: str | None = None):
  config = default_config()
  config.data.length_bucket = 16
  weights = config.data.task_weights
  weights.image_to_text, weights.vqa, weights.text_lm = 1.0, 1.0, 0.5
  weights.text_to_text, weights.multimodal_to_text = 0.25, 0.25
  # Text-to-image (caption -> VQGAN codes) is in the mixture at weight 0: it needs
  # model.code_vocab_size / code_grid and data.image_codes_dir (configs/finetune_text_to_image.py).
  weights.text_to_image = 0.0
  config.train.steps = 800
  config.train.lr = 2e-3
  if arg == "runlocal":
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.warmup_steps = 5
    config.data.tokenizer_corpus_examples = 500
    config.data.length_bucket = 0  # one step shape to compile (see above)
  elif arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/base.py; known: runlocal.")
  return config
