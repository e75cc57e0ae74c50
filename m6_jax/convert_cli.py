"""`--mode=convert`: checkpoints of other implementations -> m6-jax checkpoints.

    python -m m6_jax.main --mode=convert --from=ofa --input=OFA_DIR --output=OUT_DIR

--from=ofa reads an OFA / OFA-CN PyTorch checkpoint folder (m6_jax/infer/ofa_convert.py)
and writes an export-shaped folder that --mode=generate (--workdir=OUT_DIR), --mode=eval
and config.init_from read. Its flags live here so that main.py stays an index of modes.
"""

from __future__ import annotations

from absl import flags

from m6_jax.errors import CheckpointError

_FROM = flags.DEFINE_enum("from", None, ["ofa"], "convert: the format of the --input checkpoint.")
_INPUT = flags.DEFINE_string("input", None, "convert: the checkpoint folder to convert.")


def run(output: str | None) -> None:
  """The convert mode; `output` is main's --output flag (here: a new folder)."""
  if not _FROM.value or not _INPUT.value or not output:
    raise CheckpointError(
      "--mode=convert needs --from=ofa, --input=<checkpoint folder> and --output=<new folder>."
    )
  from m6_jax.infer import ofa_convert

  summary = ofa_convert.convert(_INPUT.value, output)
  m = summary["config"].model
  print(
    f"converted {summary['weights']} ({summary['num_params']:,} parameters; "
    f"{m.num_encoder_layers}+{m.num_decoder_layers} layers, d_model {m.d_model}) to "
    f"{summary['output']}; caption with: python -m m6_jax.main --mode=generate "
    f"--workdir={summary['output']} --image=<image>"
  )
