"""M6-10B (dense); a TPU config.

  python -m m6_jax.main --mode=params --config=configs/m6_10b.py
  python -m m6_jax.main --mode=aot --config=configs/m6_10b.py --topology=v5p:4x4x4

Published: "10 billion parameters", dense (M6 abstract, arXiv 2103.00823).
Assumed (the paper's size table could not be read): hidden 4096, 48 layers, 32 heads of 128,
FFN 16384 (4x hidden), BERT-Chinese vocabulary (tied embeddings), 196 image patches +
128 + 128 text tokens. That gives about 9.76B parameters (-2.4% of 10B).
Training: bf16 compute / float32 params and Adam state, nn.scan over layers, remat keeping
only the weight matmuls, on the 64 chips of a v5p-128 slice (topology 4x4x4), global batch
512 (3,616 tokens per chip): ZeRO-3 FSDP over 16 chips x 4-way data parallelism (over all 64
chips libtpu lowers the weight gathers as all-reduces, twice the bytes).

Should reach (--mode=aot, splash attention): 25.8 of 95 GiB per chip, estimated MFU 80%, bound
by compute (the xla attention: 82%).
How the layout was chosen: docs/performance.md.
"""

from configs.m6_base import paper_common
from m6_jax.config import default_config

PUBLISHED_PARAMS = 10e9
TOPOLOGY = "v5p:4x4x4"


def get_config(arg: str | None = None):
  config = paper_common(default_config())
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim = 4096, 48, 32, 128, 16384
  config.data.batch_size = 512
  config.mesh.data, config.mesh.fsdp = 4, -1
  if arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/m6_10b.py.")
  return config
