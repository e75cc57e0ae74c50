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


def test_tiny_moe_compiles_for_v5p(tiny_config, tmp_path):
  c = tiny_config
  c.model.moe_num_experts, c.model.moe_num_groups, c.model.moe_every = 4, 2, 2
  c.model.scan_layers, c.model.remat_policy, c.model.dtype = True, "full", "bfloat16"
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 2, 2
  report = aot.run(c, "v5p:2x2x1", str(tmp_path / "aot.json"))
  assert report["chips"] == 4 and report["memory_per_chip_gib"]["fits"]
  assert report["flops_per_step"]["compiled_per_chip"] > 0
  assert report["collectives"]["all-to-all"] > 0  # tokens travel to the expert shards
  assert (tmp_path / "aot.json").exists() and (tmp_path / "aot.hlo.txt").exists()
