"""model.attention_impl: the splash kernel (Pallas interpret mode on CPU) and the cudnn path
(jax.nn.dot_product_attention, its XLA implementation on CPU) give the xla path's outputs and
gradients, float32, on M6's masks; a train step on configs/base.py:runlocal gives its losses.

Tolerance: float32, atol 2e-5 on outputs and gradients of unit-normal inputs (the kernels
sum in different orders; the largest difference measured was about 1e-5).

Query rows with no allowed key at all are padding positions (the mask always allows the
diagonal, so such a query is a masked key itself): the kernels put different finite averages
there (xla: of every key, or of the prefix keys when it splits off the prefix block; splash:
of the keys in the blocks it visits), and nothing reads them, since no query attends a
masked key and the loss weights padding 0. So outputs are compared on the other rows, and
the cotangent on those rows is 0, as the model's is.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6_jax.config import ConfigError
from m6_jax.model import attention
from m6_jax.model.attention import AttentionMask
from m6_jax.parallel import partitioning
from m6_jax.train import setup as setup_lib

TOL = 2e-5
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _valid(lengths, size, start=None):
  """[b, size] bool: row i real at positions start[i] <= p < lengths[i]."""
  pos = np.arange(size)[None]
  start = np.zeros(len(lengths), int) if start is None else np.asarray(start)
  return jnp.asarray((pos < np.asarray(lengths)[:, None]) & (pos >= start[:, None]))


def _segments(ends, size):
  """[b, size] int: segment s where ends[i][s-1] <= p < ends[i][s] (s from 1), 0 after."""
  ids = np.zeros((len(ends), size), np.int32)
  for row, row_ends in enumerate(ends):
    for segment, (lo, hi) in enumerate(zip([0, *row_ends[:-1]], row_ends), start=1):
      ids[row, lo:hi] = segment
  return jnp.asarray(ids)


# Three rows of prefix (9 image patches + 12 source) and 10 target positions: row 0 has an
# image, 7 source tokens and 6 target tokens; row 1 no image (its patches are padding), 12
# source and 10 target; row 2 no image and no source, so its prefix queries see no key.
PREFIX = _valid([16, 21, 0], 21, start=[0, 9, 0])
TARGET = _valid([6, 10, 4], 10)
PACKED = [[5, 11, 23], [23], [9, 17]]  # segment ends; row 0 three examples, row 2 padded
MASKS = {
  "prefix_lm": lambda: AttentionMask.prefix_lm(PREFIX, TARGET),
  "packed_prefix_full": lambda: AttentionMask.prefix_lm(
    _valid([23, 23, 17], 31), TARGET[:, :0], _segments(PACKED, 31)
  ),
  "packed_prefix_0": lambda: AttentionMask.prefix_lm(
    PREFIX[:, :0], _valid([23, 23, 17], 31), _segments(PACKED, 31)
  ),
  "cross": lambda: AttentionMask.cross(PREFIX, 10),
  # 300 positions: 3 x 3 kernel blocks of 128 (padded to 384), the prefix ending mid-block.
  "prefix_lm_3_blocks": lambda: AttentionMask.prefix_lm(
    _valid([150, 140, 0], 150, start=[0, 9, 0]), _valid([150, 20, 1], 150)
  ),
}


def _inputs(mask, seed=0, heads=2, head_dim=8):
  b, lq, lk = mask.allowed.shape
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, heads, lq, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, heads, lk, head_dim)), jnp.float32) for _ in "kv")
  seen = jnp.any(mask.allowed, axis=-1)[:, None, :, None]  # rows with at least one key
  d_out = jnp.where(seen, jnp.asarray(rng.standard_normal(q.shape), jnp.float32), 0.0)
  return (q, k, v), d_out, seen


def _run(impl, mask, inputs, d_out):
  fn = lambda *qkv: attention.attention(*qkv, mask, jnp.float32, None, impl, interpret=True)
  out, vjp = jax.vjp(jax.jit(fn), *inputs)
  return out, vjp(d_out)


def _max_diffs(got, want, seen):
  (out, grads), (ref_out, ref_grads) = got, want
  assert np.isfinite(np.asarray(out)).all()
  diffs = [float(jnp.max(jnp.abs(jnp.where(seen, out - ref_out, 0.0))))]
  return diffs + [float(jnp.max(jnp.abs(g - r))) for g, r in zip(grads, ref_grads)]


@pytest.mark.parametrize("case", sorted(MASKS))
def test_splash_and_cudnn_match_xla(case):
  mask = MASKS[case]()
  inputs, d_out, seen = _inputs(mask)
  if case == "prefix_lm":  # the case has its fully masked rows: row 2's prefix queries
    assert not np.asarray(seen)[2, 0, :21].any() and np.asarray(seen)[2, 0, 21:].all()
  reference = _run("xla", mask, inputs, d_out)
  assert float(jnp.max(jnp.abs(reference[1][0]))) > 0.1  # the gradients are not vacuous
  for impl in ("splash", "cudnn"):
    diffs = _max_diffs(_run(impl, mask, inputs, d_out), reference, seen)
    assert max(diffs) < TOL, (impl, dict(zip(["out", "d_q", "d_k", "d_v"], diffs)))


def test_segment_ids_and_padding_give_the_allowed_mask():
  """The splash mapping (static `k < prefix_len or k <= q`, queries' ids = segment ids, a
  padding key's id -1) reproduces `allowed` for every case, every query row included."""
  for case, make in MASKS.items():
    mask = make()
    b, lq, lk = mask.allowed.shape
    q_ids = np.zeros((b, lq), int) if mask.segment_ids is None else np.asarray(mask.segment_ids)
    k_ids = np.zeros((b, lk), int) if mask.segment_ids is None else np.asarray(mask.segment_ids)
    k_ids = np.where(np.asarray(mask.key_valid), k_ids, attention.PAD_KEY_ID)
    static = attention.PrefixLmMask((lq, lk), mask.prefix_len)[:, :]
    derived = static[None] & (q_ids[:, :, None] == k_ids[:, None, :])
    np.testing.assert_array_equal(derived, np.asarray(mask.allowed), err_msg=case)


def test_splash_under_a_mesh_splits_batch_and_heads(tiny_config):
  """Under a data 2 x fsdp 2 x tensor 2 mesh the kernel runs in a shard_map over the batch
  (4 rows, 4-way) and the heads (2-way), and gives the unsharded result."""
  tiny_config.mesh.data, tiny_config.mesh.fsdp, tiny_config.mesh.tensor = 2, 2, 2
  mesh = partitioning.make_mesh(tiny_config)
  rules = partitioning.logical_rules(tiny_config)
  prefix, target = jnp.concatenate([PREFIX, PREFIX[:1]]), jnp.concatenate([TARGET, TARGET[:1]])
  mask = AttentionMask.prefix_lm(prefix, target)
  inputs, d_out, seen = _inputs(mask, seed=1, heads=4)
  reference = _run("splash", mask, inputs, d_out)
  with partitioning.mesh_context(mesh, rules):
    fn = lambda *qkv: attention.attention(*qkv, mask, jnp.float32, None, "splash", True)
    jaxpr = str(jax.make_jaxpr(fn)(*inputs))
    sharded = _run("splash", mask, inputs, d_out)
  assert "shard_map" in jaxpr and "P(('data', 'fsdp', 'expert'), 'tensor', None, None)" in jaxpr
  assert max(_max_diffs(sharded, reference, seen)) < TOL


def test_auto_keeps_xla_on_cpu_and_unrunnable_choices_are_config_errors(tiny_config):
  tiny_config.mesh.data = 1
  mesh = partitioning.make_mesh(tiny_config, jax.devices()[:1])
  with partitioning.mesh_context(mesh, partitioning.logical_rules(tiny_config)):
    assert attention.resolve("auto", False, dropout=False) == "xla"  # a CPU mesh
    assert attention.resolve("splash", True, dropout=False) == "splash"
    assert attention.resolve("cudnn", False, dropout=False) == "cudnn"
    with pytest.raises(ConfigError, match=r"'splash' is a TPU kernel and this mesh runs on cpu"):
      attention.resolve("splash", False, dropout=False)
  # Without a mesh (the set-up's shape-only traces) an explicit choice is taken as it is.
  assert attention.resolve("splash", False, dropout=False) == "splash"
  assert attention.resolve("auto", False, dropout=True) == "xla"
  with pytest.raises(ConfigError, match=r"does not drop attention probabilities"):
    attention.resolve("cudnn", False, dropout=True)
  mask = MASKS["prefix_lm"]()
  inputs, _, _ = _inputs(mask)
  for impl, kernel in (("auto", False), ("xla", False), ("splash", True)):
    fn = lambda *qkv, impl=impl: attention.attention(*qkv, mask, jnp.float32, None, impl, True)
    assert ("pallas_call" in str(jax.make_jaxpr(fn)(*inputs))) == kernel, impl


def _runlocal_config():
  spec = importlib.util.spec_from_file_location("base", os.path.join(REPO, "configs/base.py"))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  return base.get_config("runlocal")


def _step(config, state, batch):
  """(loss, gradient norm) of one train step from `state`, and the parameters after it."""
  setup = setup_lib.build(config)
  with setup.mesh_context():
    state, metrics = setup.step(state, setup.put_batch(batch))
  terms = (float(metrics["loss"]), float(metrics["grad_norm"]))
  return terms, jax.tree.map(np.asarray, state.params)


def test_runlocal_train_step_matches(random_batch):
  """configs/base.py:runlocal on a data 4 x tensor 2 mesh: a train step with splash gives the
  xla step's loss, gradient norm and updated parameters (a random batch with missing images
  and padded text). Adam's first update is nearly the gradient's sign times the learning
  rate, so the gradient norm is what sees the gradients' differences."""
  config = _runlocal_config()
  config.mesh.data, config.mesh.tensor = 4, 2
  config.model.scan_layers = True  # its 4 layers compiled once: the kernel is the same in each
  batch = random_batch(config.data.batch_size, config, seed=0)
  init = setup_lib.build(config).init_state
  xla_terms, xla_params = _step(config, init(seed=0), batch)
  config.model.attention_impl, config.model.attention_interpret = "splash", True
  splash_terms, splash_params = _step(config, init(seed=0), batch)
  np.testing.assert_allclose(splash_terms, xla_terms, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(splash_params), jax.tree.leaves(xla_params)):
    np.testing.assert_allclose(got, want, atol=TOL)


@pytest.mark.parametrize(
  "shape, blocks, prefix_len",
  [((512, 512), (512, 512), 324), ((512, 512), (128, 128), 324), ((512, 512), (128, 128), 0),
   ((384, 256), (128, 128), 256), ((640, 640), (128, 128), 640)],
)  # fmt: skip
def test_visited_blocks_are_the_blocks_the_kernel_keeps(shape, blocks, prefix_len):
  """The blocks the AOT report's kernel FLOPs count are those splash's own mask processing
  keeps (the others hold no allowed pair and the kernel skips them)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info

  mask = sm.MultiHeadMask((attention.PrefixLmMask(shape, prefix_len),))
  kept, _ = info.process_mask(mask, blocks, shrink_grid=False)
  grid = (shape[0] // blocks[0]) * (shape[1] // blocks[1])
  expected = grid if kept.block_mask is None else int(np.count_nonzero(kept.block_mask))
  assert attention.visited_blocks(shape, blocks, prefix_len) == expected
