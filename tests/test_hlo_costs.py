"""Per-iteration accounting of a compiled step: a scanned stack's FLOPs and HBM bytes, read
from its HLO with each loop body counted per iteration, agree with XLA's own count of the
same config compiled with the layers unrolled (which has no loop to miscount)."""

import jax
import pytest

from m6_jax.aot import hlo_costs
from m6_jax.aot import report as aot


def _step_costs(config):
  # XLA:CPU's default emitters, which the suite turns off for compile speed (without them a
  # scatter compiles to a loop, which a TPU compile does not have).
  compiled = aot.compile_train_step(
    config, jax.devices(), compiler_options={"xla_cpu_use_fusion_emitters": True}
  )
  return hlo_costs.per_step_costs(compiled.as_text())


@pytest.mark.slow
def test_scanned_step_costs_match_the_unrolled_compile(tiny_config):
  # Two scanned layers on the 8 test devices (FSDP: the weights are gathered per layer); at
  # this size the compiles take most of the test's time.
  c = tiny_config
  c.model.d_model, c.model.head_dim, c.model.mlp_dim, c.model.num_layers = 128, 32, 512, 2
  c.data.batch_size, c.data.src_len, c.data.tgt_len = 8, 8, 8
  c.model.remat_policy = "dots_with_no_batch_dims_saveable"
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.model.scan_layers = True
  scanned = _step_costs(c)
  c.model.scan_layers = False
  unrolled = _step_costs(c)

  assert unrolled["loops"] == [] and unrolled["per_step"] == unrolled["once"]
  bodies = {loop["runs"] for loop in scanned["loops"]}
  assert bodies == {2}, scanned["loops"]  # the forward and the backward scan, 2 layers each
  for key in ("flops", "bytes"):
    assert scanned["per_step"][key] == pytest.approx(unrolled["per_step"][key], rel=0.10), key
  # Counted once, as XLA's cost_analysis does, the scanned step misses a layer of two.
  assert scanned["once"]["flops"] < 0.7 * unrolled["per_step"]["flops"]


def test_nested_loops_multiply():
  # An outer loop of 2 iterations around an inner loop of 3: the inner body runs 6 times.
  def f(x):
    def outer(x, _):
      return jax.lax.fori_loop(0, 3, lambda i, y: jax.numpy.tanh(y @ y), x), None

    return jax.lax.scan(outer, x, None, length=2)[0]

  x = jax.ShapeDtypeStruct((64, 64), jax.numpy.float32)
  hlo = jax.jit(f).lower(x).compile().as_text()
  module = hlo_costs.parse(hlo)
  runs = hlo_costs.runs_per_step(module)
  assert 6 in runs.values(), runs  # the inner body: 2 x 3
  costs = hlo_costs.per_step_costs(hlo)
  matmul = 2 * 64**3
  assert costs["per_step"]["flops"] == pytest.approx(6 * matmul, rel=0.05)
  assert costs["once"]["flops"] == pytest.approx(matmul, rel=0.05)


def test_trip_count_from_an_unsigned_loop_condition():
  # libtpu's windowed (collective) matmul loops count with u32: `i < 4` runs the body 4 times.
  condition = [
    "  %c = u32[]{:T(128)} constant(4)",
    "  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT",
  ]
  assert hlo_costs._while_trip_count("%w = (u32[]) while(%t)", condition) == 4


@pytest.mark.slow
def test_analytic_model_flops_match_xla_on_an_unrolled_compile(tiny_config):
  """The one analytic FLOP count (param_count.train_flops: MFU of the progress line, the AOT
  report and the benchmarks) against XLA's count of the same step, layers unrolled (no loop
  for XLA to miscount), XLA attention, FSDP over the 8 test devices (so the optimizer, which
  the analytic count leaves out, runs once and not once per device). At a width where the
  matmuls dominate, what is left is the element-wise work the convention leaves out (norms,
  softmax, GELU, Adam): 1.3-1.6% for the unified stack (2.3% for the encoder-decoder, with
  an extra norm and softmax per decoder layer: docs/performance.md)."""
  from m6_jax.model import param_count

  c = tiny_config
  c.model.d_model, c.model.num_heads, c.model.head_dim, c.model.mlp_dim = 512, 8, 64, 2048
  c.data.batch_size, c.data.src_len, c.data.tgt_len = 16, 16, 16
  c.mesh.data, c.mesh.fsdp = 1, -1
  compiled = aot.compile_train_step(c, jax.devices())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_total = cost["flops"] * jax.device_count()
  analytic = param_count.train_flops(c, param_count.count_params(c))
  assert analytic <= xla_total <= 1.02 * analytic


def _splash_call(kind: str, operands: str, results: str) -> str:
  return (
    f'%{kind}.1 = ({results}) custom-call(%a), custom_call_target="tpu_custom_call", '
    f"operand_layout_constraints={{s8[1,1,1]{{2,1,0}}, {operands}}}, "
    'metadata={op_name="jit(step)/layer/splash_blocks_2x4_visited_6/pallas_call"}'
  )


def test_splash_kernel_costs_count_visited_blocks_and_reread_the_inner_arrays():
  """A 256-query x 512-key kernel in 2 x 4 blocks of which 6 are visited, 2 sequences x 4
  heads x head_dim 64: the matmuls of the visited pairs; operands and results once, and the
  inner loop's arrays once per visited block (keys and values in the forward kernel, which
  loops over query blocks outside; queries and output gradients in dkv, over key blocks)."""
  q, kv = "bf16[2,4,256,64]{3,2,1,0}", "bf16[2,4,512,64]{3,2,1,0}"
  q_bytes, kv_bytes = 2 * 4 * 256 * 64 * 2, 2 * 4 * 512 * 64 * 2
  pairs = 256 * 512 * 6 / 8  # per (sequence, head)
  scratch = "f32[2,128,128]{2,1,0}"  # rank 3: the kernel's VMEM scratch, not HBM traffic
  fwd = hlo_costs.splash_call_costs(
    "splash_mha_fwd.1", _splash_call("splash_mha_fwd", f"{q}, {kv}, {kv}", f"{scratch}, {q}")
  )
  assert fwd["kind"] == "splash_mha_fwd"
  assert fwd["flops"] == 2 * 2 * (2 * 4) * pairs * 64
  # s8 mask info, q, k, v, the output, and k and v re-read: 6 visited of 4 key blocks.
  assert fwd["bytes"] == 1 + q_bytes + 2 * kv_bytes + q_bytes + 2 * kv_bytes * (6 / 4 - 1)
  dkv = hlo_costs.splash_call_costs(
    "splash_mha_dkv.1", _splash_call("splash_mha_dkv", f"{q}, {kv}, {kv}, {q}", f"{kv}, {kv}")
  )
  assert dkv["flops"] == 2 * 4 * (2 * 4) * pairs * 64
  # q and the output gradient re-read: 6 visited of 2 query blocks.
  assert dkv["bytes"] == 1 + 2 * q_bytes + 2 * kv_bytes + 2 * kv_bytes + 2 * q_bytes * (6 / 2 - 1)
  assert hlo_costs.splash_call_costs("fusion.3", "%fusion.3 = f32[2] fusion(%x)") is None
