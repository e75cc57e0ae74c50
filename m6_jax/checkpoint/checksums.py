"""Checksums of every array of a checkpoint: written with it (its `meta` item) and checked
when it is restored, so bytes changed on disk are found before they are trained on.

The checksum of an array is sum_i bits_i * (2 i + 1) mod 2^32 over its elements' bit
patterns, computed where the arrays live (jitted, on any mesh): integer sums do not depend
on the order of addition, so a checkpoint written on 8 devices and restored on 1 gets the
same value; a flipped bit changes one term by an odd multiple of a power of two below 2^32,
so it always changes the sum.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m6_jax.errors import DamagedCheckpoint


def _fingerprint(x: jax.Array) -> jax.Array:
  """The array's checksum (module docstring), as a uint32 scalar."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  else:
    bits = x.astype(jnp.uint32)
  index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
  return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree: Any) -> Any:
  return jax.tree.map(_fingerprint, tree)


def checksums(tree: Any) -> dict[str, int]:
  """{array path: checksum} of every array in `tree` (computed where the arrays live)."""
  tree = jax.tree.map(lambda x: jnp.asarray(x) if np.isscalar(x) else x, tree)
  sums = jax.device_get(_fingerprints(tree))
  return {
    jax.tree_util.keystr(k, simple=True, separator="/"): int(v)
    for k, v in jax.tree_util.tree_flatten_with_path(sums)[0]
  }


def verify_checksums(tree: Any, meta: dict | None, source: str, prefix: str = "") -> None:
  """DamagedCheckpoint unless every array of `tree` has the checksum saved in `meta` under
  its name with `prefix` (the parameters of a train state: 'state/'). A checkpoint without
  checksums is not checked (`unverifiable` names it)."""
  saved = (meta or {}).get("checksums")
  if not saved:
    return
  for name, value in checksums(tree).items():
    name = prefix + name
    if name in saved and saved[name] != value:
      raise DamagedCheckpoint(
        f"{source}: array '{name}' does not match its checksum (its bytes were changed on disk)"
      )


def unverifiable(meta: dict | None, tokenizer: bool) -> str | None:
  """What a checkpoint's `meta` lacks to be verified, in words ('no checksums', ...; the
  tokenizer fingerprint counts for a model with a `tokenizer`), or None."""
  meta = meta or {}
  missing = ["no checksums"] * (not meta.get("checksums"))
  missing += ["no tokenizer fingerprint"] * (tokenizer and "tokenizer_sha256" not in meta)
  return " and ".join(missing) or None
