"""Bad configs fail before anything is built, with one line naming the key and the fix."""

import os
import sys

import pytest

from m6_jax.config import ConfigError, default_config, merged_with_defaults, validate
from m6_jax.parallel.axes import mesh_shape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_and_base_configs_are_valid():
  sys.path.insert(0, REPO)
  from configs import base

  validate(default_config(), num_devices=8)
  validate(base.get_config(), num_devices=1)
  validate(base.get_config("runlocal"), num_devices=8)


def test_mesh_minus_one_fills_the_devices():
  c = default_config()
  c.mesh.tensor = 2
  assert mesh_shape(c.mesh, 8) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}


@pytest.mark.parametrize(
  "mutate, pattern",
  [
    (
      lambda c: setattr(c.train, "lrr", 1.0),
      r"Unknown config key 'train.lrr'\. Did you mean 'train.lr'\?",
    ),
    (
      lambda c: setattr(c.model, "num_heads", 6) or setattr(c.mesh, "tensor", 4),
      r"model.num_heads=6 is not divisible by mesh.tensor=4",
    ),
    (lambda c: setattr(c.mesh, "data", 16), r"needs 16 devices but only 8 devices are available"),
    (lambda c: setattr(c.mesh, "fsdp", 3), r"mesh.data=-1 cannot fill 8 devices"),
    (lambda c: setattr(c.data, "batch_size", 12), r"data.batch_size=12 is not divisible by"),
    (lambda c: setattr(c.model, "patch_size", 7), r"not divisible by model.patch_size=7"),
    (lambda c: setattr(c.train, "schedule", "cosne"), r"train.schedule='cosne' is not one of"),
    (
      lambda c: setattr(c.data.task_weights, "captioning", 1.0),
      r"Unknown config key 'data.task_weights.captioning'",
    ),
    (
      lambda c: [setattr(c.data.task_weights, k, 0.0) for k in c.data.task_weights],
      r"gives no task a positive weight",
    ),
    (
      lambda c: setattr(c.data, "task_modules", "os, no_such_task_module"),
      r"data.task_modules names 'no_such_task_module', which cannot be imported",
    ),
    (lambda c: setattr(c.train, "grad_accum_steps", 3), r"micro-batches"),
    (lambda c: setattr(c.train, "eps", 0.0), r"train.eps=0.0 must be positive: Adam divides"),
    (lambda c: setattr(c.train, "lr", 1e39), r"below float32's largest value"),
    (lambda c: setattr(c.train, "spike_factor", 0.5), r"train.spike_factor=0.5 must be 0"),
    (lambda c: setattr(c.train, "debug_nonfinite_batches", "3,x"), r"comma-separated"),
    (
      lambda c: setattr(c.model, "attention_impl", "flash"),
      r"model.attention_impl='flash' is not one of \('xla', 'splash', 'cudnn', 'auto'\)",
    ),
    (
      lambda c: setattr(c.model, "attention_interpret", True),
      r"model.attention_interpret=True .* needs model.attention_impl='splash' \(got 'xla'\)",
    ),
    (
      lambda c: setattr(c.model, "moe_num_experts", 4) or setattr(c.model, "moe_dispatch", "sort"),
      r"model.moe_dispatch='sort' is not one of \('einsum', 'sorted'\)",
    ),
    (
      lambda c: setattr(c.model, "moe_num_experts", 4) or setattr(c.model, "moe_group_rows", 5),
      r"model.moe_group_rows=5 must be >= 1 and divide the 32 rows",
    ),
    (
      lambda c: setattr(c.model, "moe_num_experts", 4) or setattr(c.model, "moe_group_rows", 8),
      r"model.moe_group_rows=8 does not divide the 4 rows each device holds",
    ),
  ],
)
def test_bad_config_raises_one_clear_error(mutate, pattern):
  c = default_config()
  mutate(c)
  with pytest.raises(ConfigError, match=pattern) as raised:
    validate(c, num_devices=8)
  assert "\n" not in str(raised.value)  # the command line's one `error:` line


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.train.lrr=3"], "unknown key 'lrr'. Did you mean \"lr\""),
    # validate()'s errors: one launch (each starts JAX); the others are checked in-process,
    # one line each, by test_bad_config_raises_one_clear_error.
    (["--config.mesh.data=16"], "needs 16 devices but only 8 devices are available"),
    (["--config.train.lr=abc"], "could not convert string to float"),
    (["--config.data.task_modules=no_such_task_module"], "names 'no_such_task_module', which"),
  ],
)
@pytest.mark.slow
def test_cli_prints_one_error_line_and_exits_2(args, message, tmp_path, run_main):
  proc = run_main("--config=configs/base.py", f"--workdir={tmp_path}", *args, devices=8)
  assert proc.returncode == 2, proc.stderr
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(error_lines) == 1 and message in error_lines[0], proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_missing_config_file(tmp_path, run_main):
  proc = run_main("--config=configs/no_such_file.py", f"--workdir={tmp_path}", devices=8)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors and errors[0].startswith("error: no such config file: configs/no_such_file.py")
  assert "configs/{base.py," in errors[0]  # it lists the shipped configs
  assert "Traceback" not in proc.stderr


def test_a_saved_config_imports_its_task_modules_first(tmp_path, monkeypatch):
  (tmp_path / "m6_saved_task_module.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  merged = merged_with_defaults({"data": {"task_modules": "m6_saved_task_module"}})
  assert merged.data.task_modules == "m6_saved_task_module"
  assert sys.modules.pop("m6_saved_task_module")  # imported
  with pytest.raises(ConfigError, match="names 'no_such_task_module'"):
    merged_with_defaults({"data": {"task_modules": "no_such_task_module"}})
