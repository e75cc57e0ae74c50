"""AOT compilation for a TPU topology on this CPU (libtpu comes with requirements-test.txt)."""

import pytest

from m6_jax.aot import hlo_costs
from m6_jax.aot import report as aot


def test_count_collectives():
  hlo = "\n".join(
    [
      "%all-gather-start.1 = (f32[2], f32[4]) all-gather-start(f32[2] %p), dimensions={0}",
      "%all-gather-done.1 = f32[4] all-gather-done(%all-gather-start.1)",
      "%ar = f32[4] all-reduce(f32[4] %z), to_apply=%add",
      "%rs = f32[2] reduce-scatter(f32[4] %q), dimensions={0}",
      "%a2a = f32[4,2] all-to-all(f32[4,2] %e), dimensions={0}",
    ]
  )
  assert hlo_costs.count_collectives(hlo) == {
    "all-reduce": 1,
    "all-gather": 1,
    "reduce-scatter": 1,
    "all-to-all": 1,
    "collective-permute": 0,
  }


def test_collective_traffic_counts_loop_bodies_per_iteration():
  # A scanned body (3 iterations, bound found in its condition) all-gathers 1 KiB from a
  # 4-way group; the entry all-reduces 1 KiB over all 8 devices, reduce-scatters 1 KiB over 4
  # (libtpu's form: an all-reduce-scatter fusion) and all-to-alls 2 KiB in pairs.
  hlo = "\n".join(
    [
      "%cond.1 (p: (s32[], f32[256])) -> pred[] {",
      "  %c = s32[]{:T(128)} constant(3)",
      "  %i = s32[]{:T(128)} get-tuple-element(%p), index=0",
      "  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT",
      "}",
      "%body.2 (p: (s32[], f32[256])) -> (s32[], f32[256]) {",
      "  %ag = (f32[64]{0}, f32[256]{0:T(256)}) all-gather-start(f32[64] %x), "
      "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}",
      "}",
      "%all-reduce-scatter.4 (input: f32[256]) -> f32[64] {",
      "  %ar.5 = f32[256]{0} all-reduce(%input), replica_groups={{0,1,2,3}}, to_apply=%add",
      "  ROOT %ds = f32[64]{0} dynamic-slice(%ar.5, %o), dynamic_slice_sizes={64}",
      "}",
      "ENTRY %main.3 (a: f32[256]) -> f32[256] {",
      "  %rs = f32[64]{0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.4",
      "  %w = (s32[], f32[256]) while(%t), condition=%cond.1, body=%body.2",
      "  %ar = f32[256]{0} all-reduce(f32[256] %z), replica_groups={}, to_apply=%add",
      "  ROOT %a2a = bf16[4,256]{1,0} all-to-all(bf16[4,256] %e), replica_groups=[4,2]<=[8]",
      "}",
    ]
  )
  traffic = hlo_costs.collective_traffic(hlo, num_devices=8)
  assert traffic["all-gather"] == 3 * 1024 * 3 / 4  # 3 iterations, ring: (n-1)/n of the result
  assert traffic["all-reduce"] == 2 * 1024 * 7 / 8  # reduce-scatter + all-gather
  assert traffic["all-to-all"] == 2048 * 1 / 2
  assert traffic["reduce-scatter"] == 1024 * 3 / 4  # libtpu's all-reduce-scatter fusion
  assert traffic["collective-permute"] == 0


@pytest.mark.slow
def test_tiny_moe_compiles_for_v5p(tiny_config, tmp_path):
  c = tiny_config
  c.model.moe_num_experts, c.model.moe_num_groups, c.model.moe_every = 4, 2, 2
  c.model.scan_layers, c.model.remat_policy, c.model.dtype = True, "full", "bfloat16"
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 2, 2
  report = aot.run(c, "v5p:2x2x1", str(tmp_path / "aot.json"))
  assert report["chips"] == 4 and report["memory_per_chip_gib"]["fits"]
  assert report["flops_per_step"]["compiled_per_chip"] > 0
  assert report["collectives"]["all-to-all"] > 0  # tokens travel to the expert shards
  assert report["collective_bytes_per_chip"]["all-to-all"] > 0
  rl = report["roofline"]
  assert 0 < rl["mfu_estimate"] <= rl["mfu_upper_bound"] <= 1
  assert rl["bound"] in ("compute", "memory", "communication")
  # The per-step figures count each loop body per iteration: never below XLA's once-counted.
  f = report["flops_per_step"]
  assert f["compiled_per_chip"] >= f["compiled_per_chip_loop_bodies_once"] > 0
  assert (tmp_path / "aot.json").exists() and (tmp_path / "aot.hlo.txt").exists()


@pytest.mark.slow
def test_splash_attention_compiles_for_v5p_and_its_flops_are_counted(tiny_config):
  """model.attention_impl=splash lowers through Mosaic for a TPU, batch and heads split over
  the mesh: the encoder's bidirectional, the decoder's causal and the cross-attention each
  run as a forward and two backward (dq, dkv) kernels. XLA's cost analysis sees no FLOPs in
  a Pallas kernel; the report adds the kernels' analytic FLOPs, so the step's FLOPs are not
  XLA's without the attention, and its MFU is not raised by work nobody counted."""
  c = tiny_config
  c.model.architecture, c.model.dtype = "encoder_decoder", "bfloat16"
  c.model.attention_impl = "splash"
  c.model.num_encoder_layers = c.model.num_decoder_layers = 1
  c.data.src_len, c.data.tgt_len = 60, 64  # 4 patches + 60: one 128-long block each side
  c.mesh.data, c.mesh.tensor = 2, 2
  report = aot.analyse(c, "v5p:2x2x1")
  assert report["config"]["attention"] == "splash"
  calls = {"splash_mha_fwd": 3, "splash_mha_dq": 3, "splash_mha_dkv": 3}
  assert report["kernel_calls_per_step"] == calls
  # Per chip: 8 of the 16 sequences, 2 of the 4 heads, one 128 x 128 block per attention:
  # [q, k] x head_dim matmuls forward 2, dq 3, dkv 4, for each of the three attentions.
  f = report["flops_per_step"]
  assert f["kernels_per_chip"] == 3 * 2 * (2 + 3 + 4) * (8 * 2) * 128 * 128 * 16
  assert f["compiled_per_chip"] == f["xla_per_chip"] + f["kernels_per_chip"]
  # Without the kernels the step would count less work than the model does.
  assert f["xla_per_chip"] < f["model_analytic_per_chip"] <= f["compiled_per_chip"]
  assert report["bytes_accessed_per_chip_kernels"] > 0
  assert report["roofline"]["mfu_upper_bound"] <= 1


@pytest.mark.parametrize(
  "terms, bound",
  [((1e12, 1e12, 1e9, 1e8), "compute"), ((1e9, 1e9, 1e12, 1e8), "memory"),
   ((1e9, 1e9, 1e9, 1e12), "communication")],
)  # fmt: skip
def test_roofline_names_the_largest_term(terms, bound):
  flops, model_flops, hbm_bytes, sent = terms
  rl = aot.roofline(flops, model_flops, hbm_bytes, sent, "v5p")
  assert rl["bound"] == bound
  assert rl["step_s_lower_bound"] == rl[f"{bound}_step_s"]
  assert (
    rl["step_s_no_overlap"]
    == max(rl["compute_step_s"], rl["memory_step_s"]) + rl["communication_step_s"]
  )
  assert rl["mfu_estimate"] <= rl["mfu_upper_bound"] <= 1.0
  # Remat's recomputation costs time but is no model work: MFU falls with the extra FLOPs.
  more = aot.roofline(2 * flops, model_flops, hbm_bytes, sent, "v5p")
  assert more["compute_step_s"] >= rl["compute_step_s"]
  assert more["mfu_upper_bound"] <= rl["mfu_upper_bound"]
