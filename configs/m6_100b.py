"""M6-100B (sparse Mixture-of-Experts); a TPU config.

  python -m m6_jax.main --mode=params --config=configs/m6_100b.py
  python -m m6_jax.main --mode=aot --config=configs/m6_100b.py --topology=v5p:8x8x8

Published: "100 billion parameters", sparse MoE (M6 abstract, arXiv 2103.00823).
Assumed: a BERT-large-sized stack (hidden 1024, 24 layers, 16 heads, FFN 4096) whose every
feed-forward is 512 experts with GShard top-2 routing (capacity factor 1.0 in training, 2.0 at
eval); vocabulary, images and text as configs/m6_base.py. About 103.3B parameters (+3.3%).
Training: bf16, scan, remat saving every matmul output (`dots_saveable`: the expert and
dispatch einsums have a batch axis, so `dots_with_no_batch_dims_saveable` recomputed them);
one expert of each layer per chip (512-way `expert` axis, no FSDP: expert weights are never
gathered; the small dense weights are replicated) on a v5p-1024 slice (512 chips, topology
8x8x8); global batch 8192 (7,232 tokens per chip). The one-hot einsum dispatch: with 512
experts and 2 slots its tensors are small, and the sorted dispatch moved more bytes here.

Should reach (--mode=aot, splash attention): 16.1 of 95 GiB per chip, estimated MFU 54%, bound
by HBM traffic (the xla attention: 45%).
How the layout, batch and capacity were chosen: docs/performance.md.
"""

from configs.m6_base import paper_common
from m6_jax.config import default_config

PUBLISHED_PARAMS = 100e9
TOPOLOGY = "v5p:8x8x8"


def get_config(arg: str | None = None):
  config = paper_common(default_config())
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim = 1024, 24, 16, 64, 4096
  m.moe_num_experts, m.moe_num_groups, m.moe_top_k, m.moe_every = 512, 1, 2, 1
  m.moe_capacity_factor, m.moe_eval_capacity_factor = 1.0, 2.0
  m.remat_policy = "dots_saveable"
  config.data.batch_size = 8192
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 1, 1, 512
  if arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/m6_100b.py.")
  return config
