"""Small M6 models for the model and decoding tests: initialised once per config, with a
random batch, and an objective that includes the MoE auxiliary losses."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6_jax.model.m6 import M6, M6Config, dummy_batch
from m6_jax.model.moe import AUX_LOSS_COLLECTION, METRICS_COLLECTION, moe_terms


@functools.lru_cache(maxsize=None)
def init_model(cfg: M6Config):
  """(model, unboxed params) of `cfg`, initialised once per config."""
  model = M6(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), dummy_batch(cfg))["params"]
  return model, nn.unbox(params)


def model_and_batch(config, random_batch, batch_size=4, seed=0):
  """(model, params, a random device batch) for a config dict."""
  model, params = init_model(M6Config.from_config(config))
  return model, params, jax.tree.map(jnp.asarray, random_batch(batch_size, config, seed=seed))


def moe_objective(model, params, batch):
  """A scalar of the logits plus 0.1 x the MoE aux losses (with dropout, training capacity);
  returns (objective, the MoE terms)."""
  logits, state = model.apply(
    {"params": params},
    batch,
    deterministic=False,
    mutable=[AUX_LOSS_COLLECTION, METRICS_COLLECTION],
  )
  terms = moe_terms(state)
  aux = terms.get("load_balance_loss", 0.0) + terms.get("router_z_loss", 0.0)
  return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + 0.1 * aux, terms
