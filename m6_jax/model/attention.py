"""The attention implementations `model.attention_impl` chooses, and the mask they read.

  xla     `ops.attention_core`: masked softmax in XLA with a hand-written backward pass and
          the prefix-to-target block skipped (the default; what the CPU runs).
  splash  Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), a
          TPU kernel that never holds an L x L tensor in memory and skips the blocks the
          mask rules out. With `model.attention_interpret` it runs in Pallas interpret mode
          on any platform (slow; how the tests check it on CPU).
  cudnn   `jax.nn.dot_product_attention` with the boolean mask: cuDNN's fused attention on
          an NVIDIA GPU in bfloat16 (cuDNN has no float32 kernel), its XLA implementation
          everywhere else.
  auto    by the platform of the mesh's devices (so an AOT compile for a TPU slice on a CPU
          host picks the TPU's): splash on TPU, cudnn on GPU, xla otherwise; and xla
          wherever attention-probability dropout is on, which only xla implements.

Only self- and cross-attention over whole sequences take this path; a decoding step
(layers._cached_attention) and OFA's additive position biases (ops.biased_attention) stay in
XLA whatever the key says.

How M6's mask maps to splash: the kernel's mask must be static (one per compiled shape), so
it is the structure alone, `k < prefix_len or k <= q` (`PrefixLmMask`: the prefix-LM mask,
bidirectional over the prefix of the batch's fixed length, image patches and padded source,
causal over the target; 0 gives a causal mask, the full length a bidirectional one), and what
varies per example goes into the kernel's segment ids: a query attends a key when their ids
are equal, so the queries get the example's segment ids (0 without packing) and a padding key
gets -1, which no query has. That is `AttentionMask.allowed` exactly, for every query row.
Sequences are padded to a multiple of 128 (the kernel's lane width; padded keys get id -1)
and the kernel runs per example, under `shard_map` over the batch and head axes as the
logical rules partition them (the length and head-dim axes are gathered whole).

A query row with no allowed key at all is a padding position (the structure always allows
the diagonal, so such a query is itself a masked key); both kernels return a finite average
of value rows there, but not the same one (xla: of all the keys, or of the prefix keys when
the prefix block is split off; splash: of the keys of the blocks it visits). Nothing reads
those rows: no query attends them and the loss gives them weight 0.

Where this differs from MaxText's splash path, and what was checked: docs/scale.md
(#attention-kernels).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from m6_jax.errors import ConfigError
from m6_jax.model.ops import ATTENTION_OUT, attention_core
from m6_jax.parallel import partitioning

Dtype = Any

IMPLS = ("xla", "splash", "cudnn", "auto")  # config/defaults.py ATTENTION_IMPLS (no jax there)
LANES = 128  # the splash kernel's sequence blocks are multiples of this
BLOCK_SIZES = (512, 256, 128)  # tried in order: the largest that divides the padded length
PAD_KEY_ID = -1  # the segment id of a padding key: no query has it


def prefix_lm_mask(prefix_valid: jax.Array, target_valid: jax.Array) -> jax.Array:
  """Boolean attention mask [b, L, L] for the sequence [prefix ; target].

  Query q may attend key k when k is a real (non-padding) position and either k is in the
  prefix and q is in the prefix (bidirectional encoder), or q is in the target and k is in
  the prefix or at or before q in the target (causal decoder). Prefix queries never see
  target keys.
  """
  valid = jnp.concatenate([prefix_valid, target_valid], axis=1).astype(bool)
  p, t = prefix_valid.shape[1], target_valid.shape[1]
  is_prefix = jnp.arange(p + t) < p
  pos = jnp.arange(p + t)
  causal = pos[None, :] <= pos[:, None]
  structure = is_prefix[None, :] | (~is_prefix[:, None] & causal)  # [q, k]
  return structure[None] & valid[:, None, :]


@struct.dataclass
class AttentionMask:
  """A boolean attention mask and the structure the kernels may exploit.

  `allowed` [b, q, k]: query q may attend key k; the xla kernel reads this. `prefix_len`
  (static) promises that the first `prefix_len` queries attend to none of the keys at or
  after it, as in the prefix-LM mask; 0 promises nothing.

  A mask made by `prefix_lm` or `cross` also carries its factors, which the splash kernel
  needs: `allowed[b, q, k]` is then exactly `(k < prefix_len or k <= q) and key_valid[b, k]
  and segment_ids[b, q] == segment_ids[b, k]`, with `key_valid` [b, k] the real keys and
  `segment_ids` [b, L] the packed example of each position (None: one example per row), and
  `prefix_len` 0 means causal. The layers accept a plain boolean array wherever they accept
  this (for the xla kernel).
  """

  allowed: jax.Array
  prefix_len: int = struct.field(pytree_node=False, default=0)
  key_valid: jax.Array | None = None
  segment_ids: jax.Array | None = None

  @classmethod
  def prefix_lm(
    cls, prefix_valid: jax.Array, target_valid: jax.Array, segment_ids: jax.Array | None = None
  ) -> "AttentionMask":
    """The self-attention mask of [prefix ; target]: `prefix_lm_mask`, and with
    `segment_ids` [b, L] (packing) no attention across examples. An empty target gives the
    bidirectional (encoder) mask, an empty prefix the causal one."""
    allowed = prefix_lm_mask(prefix_valid, target_valid)
    if segment_ids is not None:
      allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    key_valid = jnp.concatenate([prefix_valid, target_valid], axis=1).astype(bool)
    return cls(allowed, prefix_valid.shape[1], key_valid, segment_ids)

  @classmethod
  def cross(cls, key_valid: jax.Array, query_len: int) -> "AttentionMask":
    """Cross-attention from `query_len` queries to every real key of `key_valid` [b, S]:
    bidirectional, so its `prefix_len` covers every query and every key."""
    b, s = key_valid.shape
    key_valid = key_valid.astype(bool)
    allowed = jnp.broadcast_to(key_valid[:, None, :], (b, query_len, s))
    return cls(allowed, max(s, query_len), key_valid)

  @property
  def structured(self) -> bool:
    return self.key_valid is not None


GPU_PLATFORMS = ("gpu", "cuda")


def platform() -> str | None:
  """The platform of the context mesh's devices (`jax.set_mesh`); None without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return None if device is None else device.platform


def resolve(impl: str, interpret: bool, dropout: bool, structured: bool = True) -> str:
  """The implementation that runs: "auto" made concrete for the mesh's platform (without a
  mesh: the default backend's), and xla where attention probabilities are dropped or the
  mask has no structure. A ConfigError for a choice that cannot run on the mesh's platform;
  a trace without a mesh (the shape-only `jax.eval_shape` of the set-up, which an AOT
  compile for a TPU runs on its CPU host) takes an explicit choice as it is."""
  if impl not in IMPLS:
    raise ConfigError(f"model.attention_impl='{impl}' is not one of {IMPLS}.")
  here = platform()
  if impl == "auto":
    if dropout or not structured:
      return "xla"
    here = here or jax.default_backend()
    return "splash" if here == "tpu" else "cudnn" if here in GPU_PLATFORMS else "xla"
  if dropout and impl != "xla":
    raise ConfigError(
      f"model.attention_impl='{impl}' does not drop attention probabilities, and this call "
      "trains with attention dropout (model.attention_dropout_rate, or model.dropout_rate when "
      "that is None) > 0; use model.attention_impl='xla' or 'auto' (which keeps xla wherever "
      "attention dropout is on), or set model.attention_dropout_rate=0."
    )
  if impl == "splash" and here not in (None, "tpu") and not interpret:
    raise ConfigError(
      f"model.attention_impl='splash' is a TPU kernel and this mesh runs on {here}; use "
      "model.attention_impl='auto' or 'xla', or model.attention_interpret=True to run the "
      "kernel in Pallas interpret mode (slow; for tests)."
    )
  if impl == "splash" and not structured:
    raise ValueError(
      "the splash kernel needs an AttentionMask made by AttentionMask.prefix_lm or .cross "
      "(a plain boolean mask has no static structure)"
    )
  return impl


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: AttentionMask,
  dtype: Dtype,
  dropout: Any = None,
  impl: str = "xla",
  interpret: bool = False,
) -> jax.Array:
  """softmax(q k^T masked) v over head-major [b, h, L, kv] blocks by `impl` (see the module
  docstring); `q` is already scaled. `dropout` (an nn.Dropout or None) as in
  ops.attention_core."""
  impl = resolve(impl, interpret, dropout is not None, mask.structured)
  if impl == "splash":
    return splash_attention(q, k, v, mask, interpret)
  if impl == "cudnn":
    return dot_product_attention(q, k, v, mask, dtype)
  return attention_core(q, k, v, mask.allowed, dtype, dropout, mask.prefix_len)


def dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, dtype: Dtype
) -> jax.Array:
  """jax.nn.dot_product_attention with the boolean mask: cuDNN on an NVIDIA GPU in bfloat16
  or float16, its XLA implementation otherwise. [b, h, L, kv] in and out."""
  low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  here = platform() or jax.default_backend()
  implementation = "cudnn" if here in GPU_PLATFORMS and low_precision else "xla"
  causal = mask.structured and mask.prefix_len == 0 and q.shape[2] == k.shape[2]
  out = jax.nn.dot_product_attention(
    q.swapaxes(1, 2),
    k.swapaxes(1, 2),
    v.swapaxes(1, 2),
    mask=mask.allowed[:, None],
    scale=1.0,
    is_causal=causal,
    implementation=implementation,
  )
  return checkpoint_name(out.swapaxes(1, 2), ATTENTION_OUT)


class PrefixLmMask(splash_mask._ComputableMask):  # a private base; MaxText's masks use it too
  """The static splash mask `k < prefix_len or k <= q`, computed inside the kernel."""

  def __init__(self, shape: tuple[int, int], prefix_len: int):
    self.prefix_len = prefix_len

    def mask_function(q_ids, kv_ids):
      return (kv_ids < prefix_len) | (kv_ids <= q_ids)

    super().__init__(shape=shape, mask_function=mask_function)

  def __eq__(self, other: object):
    if not isinstance(other, type(self)):
      return NotImplemented
    return self.shape == other.shape and self.prefix_len == other.prefix_len

  def __hash__(self):
    return hash((type(self), self.shape, self.prefix_len))


KERNEL_SCOPE = "splash_blocks_{}x{}_visited_{}"  # hlo_costs.kernel_costs reads it back


def visited_blocks(shape: tuple[int, int], blocks: tuple[int, int], prefix_len: int) -> int:
  """(query block, key block) pairs of a `PrefixLmMask` of `shape` that hold an allowed pair:
  the blocks the kernel computes (it skips the others), for the analytic kernel FLOPs."""
  (lq, lk), (bq, bk) = shape, blocks
  first_key = np.arange(0, lk, bk)[None, :]
  last_query = np.minimum(np.arange(bq, lq + bq, bq), lq)[:, None] - 1
  return int(np.sum((first_key < prefix_len) | (first_key <= last_query)))


def _padded(length: int) -> tuple[int, int]:
  """(the length rounded up to a multiple of LANES, the kernel's block along it)."""
  padded = -(-length // LANES) * LANES
  return padded, next(b for b in BLOCK_SIZES if padded % b == 0)


def splash_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, interpret: bool = False
) -> jax.Array:
  """The splash kernel over head-major [b, h, L, kv] blocks with a structured mask."""
  b, _, lq, _ = q.shape
  lk = k.shape[2]
  (pq, bq), (pk, bk) = _padded(lq), _padded(lk)
  if mask.segment_ids is None:
    q_ids = jnp.zeros((b, lq), jnp.int32)
    k_ids = jnp.zeros((b, lk), jnp.int32)
  elif lq == lk:
    q_ids = k_ids = mask.segment_ids.astype(jnp.int32)
  else:
    raise ValueError("segment ids (packing) are for self-attention; this mask is a cross one")
  k_ids = jnp.where(mask.key_valid, k_ids, PAD_KEY_ID)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, pq - lq), (0, 0)))
  k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pk - lk), (0, 0))) for x in (k, v))
  q_ids = jnp.pad(q_ids, ((0, 0), (0, pq - lq)))
  k_ids = jnp.pad(k_ids, ((0, 0), (0, pk - lk)), constant_values=PAD_KEY_ID)
  sizes = splash.BlockSizes(
    block_q=bq,
    block_kv=bk,
    block_kv_compute=bk,
    block_q_dkv=bq,
    block_kv_dkv=bk,
    block_kv_dkv_compute=bk,
    block_q_dq=bq,
    block_kv_dq=bk,
  )

  def per_shard(q, k, v, q_ids, k_ids):
    heads = q.shape[1]
    static = PrefixLmMask((pq, pk), mask.prefix_len)
    kernel = splash.make_splash_mha(
      splash_mask.MultiHeadMask((static,) * heads),
      block_sizes=sizes,
      head_shards=1,
      q_seq_shards=1,
      residual_checkpoint_name=ATTENTION_OUT,
      interpret=interpret,
    )
    return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q_ids, k_ids))

  heads = ("batch", "heads", None, None)
  ids = ("batch", None)
  run = partitioning.logical_shard_map(per_shard, (heads, heads, heads, ids, ids), heads)
  # XLA's cost analysis counts no FLOPs or bytes for a kernel; the AOT report adds them
  # analytically and reads the block grid and the blocks visited from this scope's name.
  visited = visited_blocks((pq, pk), (bq, bk), mask.prefix_len)
  with jax.named_scope(KERNEL_SCOPE.format(pq // bq, pk // bk, visited)):
    return run(q, k, v, q_ids, k_ids)[:, :, :lq]
