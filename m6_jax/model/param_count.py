"""Parameter counts from `jax.eval_shape` (nothing is allocated), by component.

  python -m m6_jax.main --mode=params --config=configs/m6_10b.py

`train_flops` turns the counts into the analytic model FLOPs of a train step (the MFU of the
progress line and of the AOT report).

Components: embeddings (token, text position, segment, 2-D image and code-grid positions,
an untied LM head), image stem, attention, FFN dense, experts, router, norms. A config file may define
`PUBLISHED_PARAMS` (the paper's total); the report then prints ours against it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from m6_jax.model import embeddings
from m6_jax.model.m6 import M6, M6Config, dummy_batch

COMPONENTS = ("embeddings", "image stem", "attention", "FFN dense", "experts", "router", "norms")


def component(path: tuple[str, ...]) -> str:
  """The component a parameter (given by its path of names) belongs to."""
  if "stem" in path:
    return "image stem"
  if "experts" in path:
    return "experts"
  if "router" in path:
    return "router"
  if "attention" in path or "cross_attention" in path:
    return "attention"
  if "mlp" in path:
    return "FFN dense"
  if any("norm" in p for p in path):
    return "norms"
  return "embeddings"  # token / position / segment tables, image row/col, lm_head


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """The parameter tree as ShapeDtypeStructs (jax.eval_shape of init)."""
  model = M6(M6Config.from_config(config))
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  variables = jax.eval_shape(lambda: model.init(rngs, dummy_batch(model.config)))
  # Shapes only: no sharding constraint, whatever mesh the caller is under.
  boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(
    lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.LogicallyPartitioned) else x,
    variables["params"],
    is_leaf=boxed,
  )


def count_params(config: ml_collections.ConfigDict) -> dict[str, int]:
  """{component: number of parameters} plus "total" and "active per token" (MoE: the
  experts a token is routed to, num_groups * top_k of num_experts, instead of all).

  An encoder-decoder model also gets "encoder active per token" and "decoder active per
  token": the active parameters of each layer stack (a prefix token passes through the
  encoder's, a target token through the decoder's)."""
  counts = dict.fromkeys(COMPONENTS, 0)
  stacks = {"encoder": [0, 0], "decoder": [0, 0]}  # [all, experts]
  cross_kv = 0  # the decoder's cross-attention key/value projections (run on prefix tokens)
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]:
    names = tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
    part = component(names)
    counts[part] += math.prod(leaf.shape)
    stack = names[0].split("_")[0]
    if stack in stacks and "layer" in names[0]:
      stacks[stack][0] += math.prod(leaf.shape)
      stacks[stack][1] += math.prod(leaf.shape) if part == "experts" else 0
      if "cross_attention" in names and names[-1] in ("key", "value", "value_bias"):
        cross_kv += math.prod(leaf.shape)
  counts["total"] = sum(counts[c] for c in COMPONENTS)
  counts["active per token"] = _active(config.model, counts["total"], counts["experts"])
  if config.model.architecture == "encoder_decoder":
    for stack, (total, experts) in stacks.items():
      counts[f"{stack} active per token"] = _active(config.model, total, experts)
    counts["decoder cross-attention key/value"] = cross_kv
  return counts


def _active(m: ml_collections.ConfigDict, total: int, experts: int) -> int:
  """Of `total` parameters with `experts` in MoE experts, those one token uses."""
  if m.moe_num_experts <= 0:
    return total
  return int(total - experts * (1 - m.moe_num_groups * m.moe_top_k / m.moe_num_experts))


def stem_forward_flops(config: ml_collections.ConfigDict) -> float:
  """Forward FLOPs of the image stem on one image: 2 x kernel size x output positions of every
  convolution and projection in it (shapes from a shape-only trace; a convolution's weights
  apply at each of its output positions, not once per token as a layer's do)."""
  c = M6Config.from_config(config)
  stem = (c.d_model, c.patch_size, c.image_stem, c.stem_channels, tuple(c.ofa.resnet_layers))
  return _stem_forward_flops(stem, c.image_size)


@functools.cache  # one trace per stem: train_flops runs again for every batch shape
def _stem_forward_flops(stem_args: tuple, image_size: int) -> float:
  flops = [0.0]

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    params = context.module.variables.get("params", {}) if context.method_name == "__call__" else {}
    kernel = params.get("kernel")
    if kernel is not None and hasattr(out, "shape"):
      kernel = kernel.unbox() if isinstance(kernel, nn.meta.AxisMetadata) else kernel
      flops[0] += 2.0 * math.prod(kernel.shape) * math.prod(out.shape[:-1])
    return out

  d_model, patch_size, kind, channels, resnet_layers = stem_args
  stem = embeddings.ImageEmbedding(
    d_model, patch_size, kind, channels, jnp.float32, True, resnet_layers
  )
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  with nn.intercept_methods(count):
    jax.eval_shape(lambda: stem.init(jax.random.PRNGKey(0), image))
  return flops[0]


def train_flops(
  config: ml_collections.ConfigDict,
  counts: dict[str, int],
  batch_size: int | None = None,
  src_len: int | None = None,
  tgt_len: int | None = None,
) -> float:
  """Analytic model FLOPs of one train step (forward + backward = 3x forward, no remat).

  6 * (active non-embedding params) per token over the whole sequence (encoder-decoder:
  the encoder's per prefix token, the decoder's per target token but its cross-attention
  key/value projections per prefix token, the rest per token; the
  image stem's 3x its forward FLOPs per image, `stem_forward_flops`), + the LM head on the
  target positions, + attention scores and mixing (12 * heads * head_dim per
  (query, key) pair a layer scores blockwise, M6Config.total_attention_pairs, fwd+bwd).
  `counts` is `count_params(config)`; the batch size and text lengths default to the
  config's (a length-bucketed batch passes its own).
  """
  m, d = config.model, config.data
  c = M6Config.from_config(config)
  c = dataclasses.replace(c, src_len=src_len or c.src_len, tgt_len=tgt_len or c.tgt_len)
  b = batch_size or d.batch_size
  dense_params = counts["active per token"] - counts["embeddings"] - counts["image stem"]
  if c.is_encoder_decoder:
    encoder, decoder = counts["encoder active per token"], counts["decoder active per token"]
    prefix_tokens = c.seq_len - c.tgt_len
    flops = 6.0 * (dense_params - encoder - decoder) * b * c.seq_len
    flops += 6.0 * (encoder * prefix_tokens + decoder * c.tgt_len) * b
    # The decoder's cross-attention keys and values are projected from the prefix tokens.
    cross_kv = counts["decoder cross-attention key/value"]
    flops += 6.0 * cross_kv * (prefix_tokens - c.tgt_len) * b
  else:
    flops = 6.0 * dense_params * b * c.seq_len
  flops += 3.0 * stem_forward_flops(config) * b
  flops += 6.0 * c.total_vocab_size * m.d_model * b * c.tgt_len
  flops += 12.0 * c.total_attention_pairs * m.num_heads * m.head_dim * b
  return flops


def _human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3f}{unit}"
  return str(int(n))


def report(
  config: ml_collections.ConfigDict, published: float | None = None
) -> tuple[str, dict[str, Any]]:
  """A printable table and its JSON-able figures; with `published`, the % difference."""
  counts = count_params(config)
  total = counts["total"]
  lines = [f"{'component':<18}{'parameters':>20}{'share':>9}"]
  stacks = tuple(k for k in ("encoder active per token", "decoder active per token") if k in counts)
  for name in COMPONENTS + ("total", "active per token") + stacks:
    share = f"{100 * counts[name] / total:.1f}%" if name in COMPONENTS else ""
    width = max(18, len(name) + 1)  # the numbers stay right-aligned at column 38
    lines.append(
      f"{name:<{width}}{counts[name]:>{38 - width},}{share:>9}  ({_human(counts[name])})"
    )
  out: dict[str, Any] = dict(counts)
  if published:
    diff = 100.0 * (total - published) / published
    lines.append(f"published total: {_human(published)}; ours {_human(total)} ({diff:+.2f}%)")
    out.update(published=published, difference_percent=diff)
  return "\n".join(lines), out
