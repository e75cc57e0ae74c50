"""The tiny CPU MoE config: configs/base.py with Mixture-of-Experts feed-forward layers.

  python -m m6_jax.main --config=configs/moe_base.py --workdir=/tmp/m6_moe

Every second layer's feed-forward is 8 experts in 2 M6-T prototypes ("2 top-1": each token
goes to the best expert of each prototype), capacity factor 1.25 (2.0 at eval), load-balance
and router z aux losses. About 2.9M parameters (1.3M active per token): the compute of the dense base model plus one
extra expert per token per MoE layer. Variant `:runlocal` is a 20-step smoke test; on several
devices split the experts with e.g. --config.mesh.expert=4 (the batch is split over
data x expert).
"""

from configs import base


def get_config(arg: str | None = None):
  config = base.get_config(arg)
  config.model.moe_num_experts = 8
  config.model.moe_num_groups = 2
  config.model.moe_top_k = 1
  config.model.moe_every = 2
  config.model.moe_capacity_factor = 1.25
  config.model.moe_eval_capacity_factor = 2.0
  return config
