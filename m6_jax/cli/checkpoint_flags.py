"""The flags of the modes that read a checkpoint of --workdir (generate, eval, export,
encode_images): which step."""

from absl import flags

CHECKPOINT_STEP = flags.DEFINE_integer(
  "checkpoint_step",
  None,
  "The checkpoint step to load (default: the newest intact one; a damaged step named here is "
  "an error).",
)
BEST = flags.DEFINE_bool(
  "best", False, "Load the best checkpoint kept in <workdir>/best instead of the latest."
)
