"""M6-10T (10 trillion parameters); a TPU config.

  python -m m6_jax.main --mode=params --config=configs/m6_10t.py

Published: 10T parameters, trained on 512 GPUs in 10 days with "pseudo-to-real" training
and CPU offloading (arXiv 2110.03888). Public description of its shape (secondary source,
see M6_REFERENCE.md): 48 layers, hidden 1024, 16 heads, FFN 9984, 10240 experts in 80
prototypes. Assumed: every layer MoE, "80 top-1" routing; vocabulary,
images and text as configs/m6_base.py. About 10.06T parameters (+0.6%).
Pseudo-to-real training and CPU offloading are not implemented: instead the params, grads
and Adam state (about 160 TB in float32) are sharded over a v5p-8192 slice (4096 chips,
topology 16x16x16) with 1024-way expert x 4-way FSDP parallelism, about 30 GiB per chip.
The sorted dispatch (model.moe_dispatch) with 4 sequences per routing group in training
(model.moe_group_rows; one 452-token row would round each of the 10240 experts up to a slot)
and capacity factor 1.0 (2.0 at eval, each row routed alone); global batch 16384 (1,808 tokens
per chip).

Should reach (--mode=aot, splash attention): 74.6 of 95 GiB per chip, estimated MFU 64%, bound
by compute (the xla attention: the same).
How the dispatch, groups and batch were chosen: docs/performance.md.
"""

from configs.m6_base import paper_common
from m6_jax.config import default_config

PUBLISHED_PARAMS = 10e12
TOPOLOGY = "v5p:16x16x16"


def get_config(arg: str | None = None):
  config = paper_common(default_config())
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim = 1024, 48, 16, 64, 9984
  m.moe_num_experts, m.moe_num_groups, m.moe_top_k, m.moe_every = 10240, 80, 1, 1
  m.moe_capacity_factor, m.moe_eval_capacity_factor = 1.0, 2.0
  m.moe_dispatch, m.moe_group_rows = "sorted", 4
  config.data.batch_size = 16384
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 1, -1, 1024
  if arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/m6_10t.py.")
  return config
