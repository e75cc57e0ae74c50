"""Text-to-image on the embedded synthetic world: caption -> VQGAN codes -> pixels.

  # 1. a VQGAN (configs/vqgan.py) and the codes of the world's images in /tmp/codes:
  #    python -m m6_jax.main --mode=encode_images --workdir=/tmp/vqgan --codes_dir=/tmp/codes
  # 2. train M6 to generate the codes from the captions (and to caption, for reranking)
  python -m m6_jax.main --config=configs/finetune_text_to_image.py --workdir=/tmp/m6_t2i \
    --config.data.image_codes_dir=/tmp/codes
  # 3. draw: 8 images, no guidance (scale 1: the best here), the best 8 of 32 candidates
  python -m m6_jax.main --mode=generate --workdir=/tmp/m6_t2i --prompt="一个红色的圆" \
    --num_images=8 --guidance_scale=1 --rerank=32 --output_dir=/tmp/m6_t2i_images

Tasks: text_to_image (weight 1; data.guidance_drop_rate=0.1 of its captions dropped, so one
model is conditional and unconditional for guidance) and image_to_text (0.25), whose
likelihood of the prompt reranks the candidates (--rerank). The model's codebook and grid
must be the VQGAN's: model.code_vocab_size=256 and model.code_grid=(12, 12) here, those of
configs/vqgan.py (a 48 x 48 image downsampled 4x); variant `:grid6` is a 6 x 6 grid
(downsampled 8x, tgt_len 48), and `--config.model.code_vocab_size=K` another codebook
size. Config validation compares them with the codes_info.json of data.image_codes_dir and
says which differs; an empty data.image_codes_dir is an error too.

The model is the base one (1.1M parameters with the 256 code rows), trained from scratch
for 3600 steps: `init_from` a text-only model does not fit (a fine-tune takes the
checkpoint's model, and its embedding has no code rows).

Should reach: text_to_image loss 0.41 per code (eval), and at guidance 1, best of 8, shape
95.6%, colour 98.0%, position 99.0% (--mode=text_to_image_eval), in about 18 minutes on 2
quiet CPU cores. The measurements, and why 3600 steps of this model: docs/text_to_image.md.

Variant `:runlocal`: 20 steps (smoke test).
"""

from m6_jax.config import default_config


def get_config(arg: str | None = None):
  config = default_config()
  config.model.code_vocab_size = 256
  config.model.code_grid = (12, 12)  # configs/vqgan.py: 48 px downsampled 4x
  weights = config.data.task_weights
  weights.text_to_text, weights.multimodal_to_text, weights.vqa, weights.text_lm = 0, 0, 0, 0
  weights.text_to_image, weights.image_to_text = 1.0, 0.25
  config.data.tgt_len = 152  # 144 codes + EOS, a multiple of the length bucket
  config.data.length_bucket = 8
  config.data.image_codes_dir = ""  # required: --config.data.image_codes_dir=/tmp/codes
  config.train.steps = 3600
  config.train.lr = 2e-3
  config.train.warmup_steps = 100
  config.train.log_every = 50
  config.train.checkpoint_every = 900
  config.train.eval_every = 1800
  config.train.eval_metric = "text_to_image_loss"
  config.train.eval_examples = 32
  if arg == "grid6":  # a VQGAN with vqgan.downsample_factor=8
    config.model.code_grid = (6, 6)
    config.data.tgt_len = 48  # 36 codes + EOS, and the longest caption (42 pieces) + EOS
  elif arg == "runlocal":
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.eval_every = 0
    config.train.warmup_steps = 5
  elif arg:
    raise ValueError(
      f"Unknown variant '{arg}' of configs/finetune_text_to_image.py; known: grid6, runlocal."
    )
  return config
