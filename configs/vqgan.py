"""The VQGAN image tokenizer of text-to-image, on the synthetic world (48 px images).

  python -m m6_jax.main --config=configs/vqgan.py --workdir=/tmp/vqgan
  python -m m6_jax.main --mode=eval --workdir=/tmp/vqgan
  python -m m6_jax.main --mode=encode_images --workdir=/tmp/vqgan --codes_dir=/tmp/vqgan_codes

Recipe: 48 px -> 12x12 codes (downsample_factor 4) of a 256-code, 16-dim l2-normalised EMA
codebook; widths 16/32/64, one residual block per level, 409k parameters; L1 + L2
reconstruction, no GAN (vqgan.disc_weight=0); batch 32, 1000 steps at lr 2e-3 (cosine).

Measured (held-out synthetic validation, 512 images; PSNR over [0, 255] images, codebook
usage over all 512 x 144 codes), on 2 CPU cores shared with other jobs (load 5-9):
  this recipe (1000 steps):  step 500: PSNR 28.8 dB, usage 87.9%
                             step 1000: PSNR 32.3 dB, usage 100%, perplexity 176
                             20m30s wall, 14m50s CPU (0.7-1.4 steps/s under that load);
                             7m06s wall, 5m15s CPU on a faster AMD EPYC (load 5-6, 1.9-2.6
                             steps/s): the same PSNR 32.3 dB, usage 100%, perplexity 171;
                             3m43s wall on the same machine with nothing else running
  the same for 600 steps:    step 600: PSNR 28.6 dB, usage 95.3%, perplexity 125
  factor 8 (6x6 codes), widths 8/16/32/64, L1 only: step 200: PSNR 19.4 dB, usage 87.1%
(the 6x6 grid would be cheaper to generate but did not come near 30 dB).

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
