"""M6-large (dense), sized like the MUGE-2021 large baseline; a TPU config.

  python -m m6_jax.main --mode=params --config=configs/m6_large.py

Published: no exact figure we could read. Assumed: the MUGE large baseline (hidden 1024,
12+12 = 24 layers in our shared stack, 16 heads, FFN 4096); vocabulary, images, text lengths
and optimiser as configs/m6_base.py. About 0.33B parameters. bf16, scan, remat, data parallel
over a v5p 2x2x2 slice (8 chips), splash attention on TPU.

Should reach (--mode=aot): 16.4 of 95 GiB per chip, estimated MFU 85%, bound by compute
(docs/performance.md; the xla attention: 53%).
"""

from configs.m6_base import paper_common
from m6_jax.config import default_config

PUBLISHED_PARAMS = None
TOPOLOGY = "v5p:2x2x2"


def get_config(arg: str | None = None):
  config = paper_common(default_config())
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim = 1024, 24, 16, 64, 4096
  config.data.batch_size = 256
  # Data parallel: 0.3B parameters and their Adam state fit every chip, and FSDP over 8 chips
  # made libtpu run the weight matmuls as collective-matmul loops (docs/performance.md).
  config.mesh.data, config.mesh.fsdp = -1, 1
  if arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/m6_large.py.")
  return config
