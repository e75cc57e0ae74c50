"""The tiny CPU default: M6 on the embedded synthetic bilingual image-text world.

  python -m m6_jax.main --config=configs/base.py --workdir=/tmp/m6_base

About 1.0M parameters (4 layers, d_model 128), 9 image patches + <= 32 source + <= 32 target
tokens. It trains every task the README then shows on its workdir: captioning
(image_to_text, weight 1), visual question answering (vqa, 1), text continuation (text_lm,
0.5), and the other two M6 pretraining tasks, span in-filling (text_to_text) and
multimodal-to-text, at 0.25. 800 steps at lr 2e-3 take 4 to 7 minutes on 2 CPU cores; the
image-to-text loss ends below a tenth of its step-0 value (both are printed at the end):
6.95 -> 0.35. Held-out (`--mode=eval`): VQA accuracy 52% (the most frequent answer per
question type: 28%), captions BLEU-4 63, CIDEr-D 4.6. (With word-level Chinese pieces and
32-token texts: VQA 49%, BLEU-4 52.) Measured against the older mixture
(the three pretraining tasks alone, 600 steps at lr 1e-3: captions BLEU-4 66, no VQA, no
continuation) and other weights, learning rates and lengths: all five tasks at weight 1 gave
VQA 32%, lr 3e-3 gave 38%, 600 steps 42%.

Length bucketing is on (data.length_bucket=16; with 48-token texts, buckets of 8 meant up to
36 step shapes to compile, of 16 nine): batches drop their all-padding text columns
(the synthetic texts fill about a quarter of 48 + 48 positions), which gives the same losses as
padded batches at 1.1-1.2x the train-step examples/s (docs/performance.md; measured with
32-token texts and buckets of 8). Sorting by
length (data.bucket_window=16) reaches ~1.8x but makes batches more uniform in task and
length; in 600 steps the image-to-text loss then ended at 0.86 instead of 0.78 (measured
before pixels were scaled to [-1, 1]), so it is off.

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
