"""M6-base (dense), sized like the MUGE-2021 base baseline; a TPU config.

  python -m m6_jax.main --mode=params --config=configs/m6_base.py
  python -m m6_jax.main --mode=aot --config=configs/m6_base.py --topology=v5p:2x2x1

Published: nothing we could read gives M6-base's exact size (see docs M6_REFERENCE.md).
Assumed: the MUGE base baseline's Transformer (hidden 768, 6+6 = 12 layers in our shared
stack, 12 heads, FFN 3072), the BERT-Chinese WordPiece vocabulary (21128 pieces, padded to
21248 so that it splits over the tensor axis), 224 px images in 16 px patches (196 patches,
linear projection of patch features), 128 + 128 text tokens. About 0.1B parameters.
Training: bf16 compute, float32 params, nn.scan over layers, remat of everything but matmuls,
FSDP over the 4 chips of a v5p-8 slice (topology 2x2x1), splash attention on TPU.

Should reach (--mode=aot, splash attention): 9.4 of 95 GiB per chip, estimated MFU 73%, bound
by HBM traffic (docs/performance.md; the xla attention: 44%).
"""

from m6_jax.config import default_config

PUBLISHED_PARAMS = None  # no published figure
TOPOLOGY = "v5p:2x2x1"


def paper_common(config):
  """Settings shared by the paper-scale configs (all assumed, see each docstring)."""
  m, d, t = config.model, config.data, config.train
  m.vocab_size = 21248  # BERT-Chinese 21128, padded to a multiple of 128
  m.patch_size = 16
  m.image_stem = "linear"
  m.dropout_rate = 0.1
  # No dropout on the attention probabilities: the fused kernels (splash, cuDNN) have no dropout,
  # and MaxText's models train without it; embeddings, residuals and the FFN keep 0.1.
  m.attention_dropout_rate = 0.0
  m.attention_impl = "auto"  # splash on TPU (docs/performance.md: the AOT table), xla on CPU
  m.dtype = "bfloat16"
  m.scan_layers = True
  m.remat_policy = "dots_with_no_batch_dims_saveable"
  d.image_size = 224
  d.src_len = 128
  d.tgt_len = 128
  # MUGE baseline optimiser: Adam (0.9, 0.999), lr 1e-4, warmup 2700, clip 0.1, wd 0.01.
  t.lr = 1e-4
  t.b2 = 0.999
  t.warmup_steps = 2700
  t.schedule = "linear"
  t.grad_clip_norm = 0.1
  t.steps = 45000
  t.log_every = 100
  t.checkpoint_every = 1000
  return config


def get_config(arg: str | None = None):
  config = paper_common(default_config())
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim = 768, 12, 12, 64, 3072
  config.data.batch_size = 256
  config.mesh.data, config.mesh.fsdp = 1, -1
  if arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/m6_base.py.")
  return config
