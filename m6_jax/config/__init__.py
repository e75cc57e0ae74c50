"""The config: its schema with every default (`defaults.py`) and its validation
(`validation.py`), with one `ConfigError` line naming the key and the fix.

    config = default_config()            # or a configs/<name>.py get_config()
    validate(config, jax.device_count())
"""

from m6_jax.config.defaults import (
  FAMILIES,
  MOE_DISPATCH_MODES,
  REMAT_POLICIES,
  as_trained,
  default_config,
  merged_with_defaults,
)
from m6_jax.config.validation import (
  moe_layer_indices,
  parse_positions,
  stack_depths,
  validate,
  validate_for_counting,
)
from m6_jax.errors import ConfigError

__all__ = [
  "FAMILIES",
  "MOE_DISPATCH_MODES",
  "REMAT_POLICIES",
  "ConfigError",
  "as_trained",
  "default_config",
  "merged_with_defaults",
  "moe_layer_indices",
  "parse_positions",
  "stack_depths",
  "validate",
  "validate_for_counting",
]
