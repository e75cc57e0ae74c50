"""The layer stacks of the M6 model and how their blocks run in each mode.

A stack is "unified" (the one prefix-LM stack of M6), "encoder" or "decoder" (the two
stacks of the encoder-decoder architecture; decoder blocks have cross-attention). It is
built either as a list of blocks (`layer_i`, `encoder_layer_i`, `decoder_layer_i`) or, with
`scan_layers`, as one nn.scan over groups of `layers_per_group` blocks whose parameters get
a leading `layers` axis (`layers`, `encoder_layers`, `decoder_layers`); `remat_policy`
rematerialises each block (unrolled) or each group (scanned). Both forms run the same
`run_block`, so every mode works the same way in each.

Modes (StackMode.kind):
  full      the whole sequence (training, scoring, the encoder)
  prefix    unified: the prefix, returning every layer's keys/values (the decoding cache)
  cross_kv  decoder: only the cross-attention keys/values of the encoder output, per layer
  step      one target position against the per-layer caches, returning the new target
            keys/values

`shared` (a dict) holds what every layer reads: the mode, masks, the encoder output;
`caches` the per-layer cache slices of step mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6_jax.model import ofa, ofa_options
from m6_jax.model.layers import CrossInput, LayerKV, StepCache, TransformerBlock
from m6_jax.model.moe import AUX_LOSS_COLLECTION, METRICS_COLLECTION
from m6_jax.model.ops import ATTENTION_OUT, ATTENTION_PROBS

# m6_jax.model.m6.M6Config, which is not imported here: m6.py builds its stacks with this
# module (an import back would be a cycle).
M6Config = Any

STACKS = ("unified", "encoder", "decoder")

REMAT_POLICIES = {
  "full": None,  # jax.checkpoint's default: save nothing, recompute the whole layer
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # The weight matmuls' outputs plus the attention probabilities and output: the backward
  # pass then recomputes only norms and activations. Costs b*h*L*L floats per layer.
  "dots_and_attention_saveable": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(ATTENTION_PROBS, ATTENTION_OUT),
  ),
}


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StackMode:
  """How the stack runs (static: a pytree without leaves, so scan/remat keep it)."""

  kind: str  # "full", "prefix", "cross_kv" or "step" (see the module docstring)
  deterministic: bool = True


def make_block(c: M6Config, index: int, name: str, cross_attention: bool) -> TransformerBlock:
  """Block `index` of a stack (MoE when `c.is_moe_layer(index)`; OFA's options, ofa.py)."""
  relative = (0, 0)
  if c.ofa.biased:  # encoder blocks: text and image tables; decoder blocks: text
    images = 0 if cross_attention else ofa.num_image_buckets(c.ofa.image_bucket_size)
    relative = (2 * c.ofa.token_bucket_size - 1, images)
  return TransformerBlock(
    c.num_heads,
    c.head_dim,
    c.mlp_dim,
    c.dropout_rate,
    c.layer_norm_epsilon,
    jnp.dtype(c.dtype),
    moe=c.moe_options(index),
    cross_attention=cross_attention,
    ofa=None if c.ofa == ofa_options.OfaOptions() else c.ofa,
    relative=relative,
    attention_impl=c.attention_impl,
    attention_interpret=c.attention_interpret,
    attention_dropout_rate=c.attention_dropout_rate,
    name=name,
  )


def run_block(
  block: TransformerBlock, x: jax.Array, shared: dict, cache: dict | None
) -> tuple[jax.Array, LayerKV | None]:
  """One block in `shared["mode"]`: (x, this layer's keys/values or None).

  Step mode: `cache` holds the layer's "prefix" (unified: prefix keys/values; decoder: the
  encoder's cross-attention keys/values) and "target" keys/values. A decoder's
  self-attention reads the target only, its cross-attention the prefix only.
  """
  mode: StackMode = shared["mode"]
  cross, bias, cross_bias = None, shared.get("position_bias"), shared.get("cross_bias")
  if mode.kind == "cross_kv":
    return x, block(None, None, True, cross=CrossInput(encoded=shared["encoded"]))
  if mode.kind == "step":
    target = (cache["target"], shared["visible"], shared["position"])
    if block.cross_attention:
      step = StepCache(None, None, *target)
      cross = CrossInput(step=StepCache(cache["prefix"], shared["prefix_valid"]), bias=cross_bias)
    else:
      step = StepCache(cache["prefix"], shared["prefix_valid"], *target)
    return block(
      x, None, True, step=step, token_mask=shared["token_mask"], cross=cross, position_bias=bias
    )
  if block.cross_attention:
    cross = CrossInput(shared["encoded"], shared["cross_mask"], bias=cross_bias)
  options = {"token_mask": shared["token_mask"], "cross": cross, "position_bias": bias}
  if mode.kind == "prefix":
    return block(x, shared["mask"], True, return_kv=True, **options)
  return block(x, shared["mask"], mode.deterministic, **options), None


class LayerGroup(nn.Module):
  """`config.layers_per_group` consecutive blocks: the body of a scanned layer stack.

  Called as (x, shared, caches) -> (x, per-layer keys/values): `caches` holds one cache dict
  per block of the group (step mode)."""

  config: M6Config
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, shared: dict, caches: Any) -> tuple[jax.Array, Any]:
    kvs = []
    for j in range(self.config.layers_per_group):
      block = make_block(self.config, j, f"layer_{j}", self.cross_attention)
      x, kv = run_block(block, x, shared, None if caches is None else caches[j])
      if kv is not None:
        kvs.append(kv)
    return x, (tuple(kvs) if kvs else None)


def _name(stack: str, suffix: str) -> str:
  return suffix if stack == "unified" else f"{stack}_{suffix}"


def layer_stack(c: M6Config, stack: str) -> nn.Module | list[TransformerBlock]:
  """The blocks of `stack`: a list (unrolled) or one scanned module (`c.scan_layers`)."""
  cross = stack == "decoder"
  if not c.scan_layers:
    return [
      make_block(c, i, _name(stack, f"layer_{i}"), cross) for i in range(c.stack_layers(stack))
    ]
  group = LayerGroup
  if c.remat_policy != "none":
    group = nn.remat(group, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=False)
  scanned = nn.scan(
    group,
    variable_axes={"params": 0, AUX_LOSS_COLLECTION: 0, METRICS_COLLECTION: 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=(nn.broadcast, 0),
    length=c.stack_layers(stack) // c.layers_per_group,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scanned(c, cross, name=_name(stack, "layers"))


def run_stack(
  model: nn.Module,
  stack: str,
  x: jax.Array,
  shared: dict,
  caches: tuple[tuple[LayerKV, ...], tuple[LayerKV, ...]] | None = None,
) -> tuple[jax.Array, list[LayerKV] | None]:
  """Runs `model.<stack>` (built by `layer_stack`) in `shared["mode"]`.

  `caches` (step mode): the per-layer (prefix, target) keys/values. Returns x and, in the
  prefix, cross_kv and step modes, each layer's keys/values in layer order.
  """
  c: M6Config = model.config
  mode: StackMode = shared["mode"]
  if c.scan_layers:
    per_group = None if caches is None else _stack(c, caches)
    x, stacked = getattr(model, stack)(x, shared, per_group)
    return x, (None if stacked is None else _unstack(c, stack, stacked))
  kvs = []
  for i in range(c.stack_layers(stack)):
    cache = None if caches is None else {"prefix": caches[0][i], "target": caches[1][i]}
    if mode.kind == "full" and c.remat_policy != "none":
      layer = lambda mdl, x, shared, i=i: run_block(getattr(mdl, stack)[i], x, shared, None)
      x, kv = nn.remat(layer, policy=REMAT_POLICIES[c.remat_policy])(model, x, shared)
    else:
      x, kv = run_block(getattr(model, stack)[i], x, shared, cache)
    kvs.append(kv)
  return x, (None if mode.kind == "full" else kvs)


def _stack(c: M6Config, caches: tuple[tuple[LayerKV, ...], ...]) -> tuple[dict, ...]:
  """Per-layer (prefix, target) caches -> one cache dict per block of the scanned group,
  each leaf stacked over the groups ([groups, ...])."""
  k = c.layers_per_group
  stacked = [
    tuple(jax.tree.map(lambda *xs: jnp.stack(xs), *p[j::k]) for p in caches) for j in range(k)
  ]
  return tuple({"prefix": prefix, "target": target} for prefix, target in stacked)


def _unstack(c: M6Config, stack: str, stacked: tuple[LayerKV, ...]) -> list[LayerKV]:
  """The scanned stack's outputs -> per-layer keys/values: layer g * layers_per_group + j
  is stacked[j][g]."""
  groups = c.stack_layers(stack) // c.layers_per_group
  return [jax.tree.map(lambda x, g=g: x[g], kv) for g in range(groups) for kv in stacked]
