"""The VQGAN image tokenizer of text-to-image, on the synthetic world (48 px images).

  python -m m6_jax.main --config=configs/vqgan.py --workdir=/tmp/vqgan
  python -m m6_jax.main --mode=eval --workdir=/tmp/vqgan
  python -m m6_jax.main --mode=encode_images --workdir=/tmp/vqgan --codes_dir=/tmp/vqgan_codes

Recipe: 48 px -> 12x12 codes (downsample_factor 4) of a 256-code, 16-dim l2-normalised EMA
codebook; widths 16/32/64, one residual block per level, 409k parameters; L1 + L2
reconstruction, no GAN (vqgan.disc_weight=0); batch 32, 1000 steps at lr 2e-3 (cosine).

Should reach: held-out PSNR 32.3 dB with 100% of the codebook used, in about 4 minutes on 2
quiet CPU cores. The measurements, and the shorter and coarser variants tried:
docs/text_to_image.md.

Variant `configs/vqgan.py:runlocal` is a 20-step smoke test. Every `vqgan.*` key is documented
in m6_jax/config/defaults.py `vqgan_defaults`.
"""

from m6_jax.config import default_config


def get_config(arg: str | None = None):
  config = default_config()
  config.model.family = "vqgan"
  v = config.vqgan
  v.channels = 16
  v.channel_multipliers = (1, 2, 4)
  v.num_res_blocks = 1
  v.downsample_factor = 4  # 48 px -> 12x12 codes
  v.codebook_size = 256
  v.code_dim = 16
  v.l2_weight = 1.0
  config.data.batch_size = 32
  config.train.steps = 1000
  config.train.lr = 2e-3
  config.train.warmup_steps = 20
  config.train.b2 = 0.99
  config.train.weight_decay = 0.0
  config.train.log_every = 50
  config.train.checkpoint_every = 200
  config.train.eval_every = 500
  config.train.eval_metric = "psnr"
  if arg == "runlocal":
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.eval_every = 20
    config.train.warmup_steps = 5
    config.data.num_eval_examples = 64
  elif arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/vqgan.py; known: runlocal.")
  return config
