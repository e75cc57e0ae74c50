"""`--mode=export`: the parameters of a checkpoint of --workdir (latest, --checkpoint_step or
--best), with its config and tokenizer, into --export_dir, without the optimizer state.
generate, eval and config.init_from read an export like a workdir."""

from __future__ import annotations

from absl import flags

from m6_jax.cli import checkpoint_flags, common
from m6_jax.errors import exit_with

EXPORT_DIR = flags.DEFINE_string(
  "export_dir", None, "A new directory for the parameters, config and tokenizer."
)


def run() -> None:
  from m6_jax.infer import export, generate

  config = common.load_config("export", required=False, workdir_hint="a trained workdir")
  if not EXPORT_DIR.value:
    exit_with("--mode=export needs --export_dir, a new directory for the exported parameters.")
  workdir = common.WORKDIR.value
  step, best = checkpoint_flags.CHECKPOINT_STEP.value, checkpoint_flags.BEST.value
  model = generate.load_model(workdir, step, config, best=best)
  sizes = export.export(
    model.params,
    model.step,
    model.checkpoint_dir,
    model.config,
    model.tokenizer,
    generate.tokenizer_path(workdir, model.config),
    EXPORT_DIR.value,
  )
  mb = 1024**2
  print(
    f"exported step {sizes['step']} ({sizes['num_params']:,} parameters) to "
    f"{EXPORT_DIR.value}: {sizes['export_bytes'] / mb:.1f} MiB, against "
    f"{sizes['source_bytes'] / mb:.1f} MiB for the checkpoint it came from"
  )
