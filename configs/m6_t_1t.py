"""M6-T (> 1T parameters, expert prototyping); a TPU config.

  python -m m6_jax.main --mode=params --config=configs/m6_t_1t.py

Published: "over 1T parameters", trained on 480 V100-32GB; expert prototyping: the experts
are split into k prototypes and each token takes the top-1 expert of every prototype
("k top-1"), same compute as top-1 (M6-T abstract, arXiv 2105.15082).
Assumed: hidden 1024, 24 layers, 16 heads, FFN 4096, every layer MoE with 5120 experts in
4 prototypes ("4 top-1"); vocabulary, images and text as configs/m6_base.py. About 1.03T
parameters (+3.2% of 1T).
Training: bf16, scan, remat; 512-way expert parallelism (10 experts of each layer per chip,
no FSDP: the expert weights are never gathered) on a v5p-1024 slice (512 chips, topology
8x8x8), about 28 GB of params + grads + Adam state per chip (Adam's first moment in
bfloat16). The sorted dispatch
(model.moe_dispatch: no one-hot [tokens, 5120 experts, capacity] tensors) with 8 sequences
per routing group in training (model.moe_group_rows: one 452-token row would round every
expert up to a slot, 5120 slots for 1808 assignments) and capacity factor 1.0 (3 slots per
expert and group; 2.0 at eval, where each row is routed alone); global batch 20480 (18,080
tokens per chip); splash attention on TPU.

Should reach (--mode=aot): 64.0 of 95 GiB per chip, estimated MFU 50%, bound by HBM traffic.
How the layout, dispatch, groups, batch and optimizer state were chosen (and what else was
tried): docs/performance.md.
"""

from configs.m6_base import paper_common
from m6_jax.config import default_config

PUBLISHED_PARAMS = 1e12
TOPOLOGY = "v5p:8x8x8"


def get_config(arg: str | None = None):
  config = paper_common(default_config())
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim = 1024, 24, 16, 64, 4096
  m.moe_num_experts, m.moe_num_groups, m.moe_top_k, m.moe_every = 5120, 4, 1, 1
  m.moe_capacity_factor, m.moe_eval_capacity_factor = 1.0, 2.0
  m.moe_dispatch, m.moe_group_rows = "sorted", 8
  config.data.batch_size = 20480
  config.train.adam_mu_dtype = "bfloat16"  # the optimizer's HBM traffic bounds the step
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 1, 1, 512
  if arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/m6_t_1t.py.")
  return config
