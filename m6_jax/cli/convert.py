"""`--mode=convert`: checkpoints of other implementations -> m6-jax checkpoints.

    python -m m6_jax.main --mode=convert --from=ofa --input=OFA_DIR --output=OUT_DIR

--from=ofa reads an OFA / OFA-CN PyTorch checkpoint folder (m6_jax/infer/ofa_convert.py) and
writes an export-shaped folder that --mode=generate (--workdir=OUT_DIR), --mode=eval and
config.init_from read.
"""

from __future__ import annotations

from absl import flags

from m6_jax.errors import exit_with

FROM = flags.DEFINE_enum("from", None, ["ofa"], "The format of the --input checkpoint.")
INPUT = flags.DEFINE_string(
  "input", None, "The checkpoint folder to convert, or the weights file in it to convert."
)
OUTPUT = flags.DEFINE_string("output", None, "A new folder for the m6-jax checkpoint.")


def run() -> None:
  if not FROM.value or not INPUT.value or not OUTPUT.value:
    exit_with(
      "--mode=convert needs --from=ofa, --input=<checkpoint folder> and --output=<new folder>."
    )
  from m6_jax.infer import ofa_convert

  summary = ofa_convert.convert(INPUT.value, OUTPUT.value)
  m = summary["config"].model
  print(
    f"converted {summary['weights']} ({summary['num_params']:,} parameters; "
    f"{m.num_encoder_layers}+{m.num_decoder_layers} layers, d_model {m.d_model}) to "
    f"{summary['output']}; caption with: python -m m6_jax.main --mode=generate "
    f"--workdir={summary['output']} --image=<image>"
  )
