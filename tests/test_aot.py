"""AOT compilation for a TPU topology on this CPU (libtpu comes with requirements-test.txt)."""

from m6_jax import aot


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
  assert aot.count_collectives(hlo) == {
    "all-reduce": 1,
    "all-gather": 1,
    "reduce-scatter": 1,
    "all-to-all": 1,
    "collective-permute": 0,
  }


def test_collective_traffic_counts_loop_bodies_per_iteration():
  # A scanned body (3 iterations, bound found in its condition) all-gathers 1 KiB from a
  # 4-way group; the entry all-reduces 1 KiB over all 8 devices and all-to-alls 2 KiB in pairs.
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
      "ENTRY %main.3 (a: f32[256]) -> f32[256] {",
      "  %w = (s32[], f32[256]) while(%t), condition=%cond.1, body=%body.2",
      "  %ar = f32[256]{0} all-reduce(f32[256] %z), replica_groups={}, to_apply=%add",
      "  ROOT %a2a = bf16[4,256]{1,0} all-to-all(bf16[4,256] %e), replica_groups=[4,2]<=[8]",
      "}",
    ]
  )
  traffic = aot.collective_traffic(hlo, num_devices=8)
  assert traffic["all-gather"] == 3 * 1024 * 3 / 4  # 3 iterations, ring: (n-1)/n of the result
  assert traffic["all-reduce"] == 2 * 1024 * 7 / 8  # reduce-scatter + all-gather
  assert traffic["all-to-all"] == 2048 * 1 / 2
  assert traffic["reduce-scatter"] == traffic["collective-permute"] == 0


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
  assert 0 < report["roofline"]["mfu_estimate"] <= report["roofline"]["mfu_upper_bound"] <= 1
  assert (tmp_path / "aot.json").exists() and (tmp_path / "aot.hlo.txt").exists()
