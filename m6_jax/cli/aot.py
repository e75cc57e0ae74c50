"""`--mode=aot`: compile the train step of --config for a TPU slice on this CPU and report
per-chip memory, FLOPs, collectives and an MFU estimate (m6_jax/aot/report.py).

    python -m m6_jax.main --mode=aot --config=configs/m6_10b.py --topology=v5p:4x4x4 \\
      --aot_output=/tmp/m6_10b_aot.json
"""

from __future__ import annotations

from absl import flags

from m6_jax.cli import common
from m6_jax.errors import exit_with

TOPOLOGY = flags.DEFINE_string(
  "topology", None, "TPU topology, e.g. v5p:4x4x4 (default: the config file's TOPOLOGY)."
)
AOT_OUTPUT = flags.DEFINE_string(
  "aot_output", None, "Where to write the JSON report (default: <workdir>/aot.json, or none)."
)


def run() -> None:
  from m6_jax.aot import report

  config = common.load_config("aot")
  topology = TOPOLOGY.value or common.config_file_constant("TOPOLOGY")
  if not topology:
    exit_with("--mode=aot needs --topology, e.g. --topology=v5p:4x4x4")
  output = AOT_OUTPUT.value
  if output is None and common.WORKDIR.value:
    output = f"{common.WORKDIR.value}/aot.json"
  report.run(config, topology, output)
