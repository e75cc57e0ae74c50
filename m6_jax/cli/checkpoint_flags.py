"""The flags of the modes that read a checkpoint of --workdir (generate, eval, export,
encode_images): which step."""

from absl import flags

CHECKPOINT_STEP = flags.DEFINE_integer(
  "checkpoint_step", None, "The checkpoint step to load (default: the latest)."
)
BEST = flags.DEFINE_bool(
  "best", False, "Load the best checkpoint kept in <workdir>/best instead of the latest."
)
