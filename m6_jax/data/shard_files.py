"""Shard lists: the files a ``data.shards`` pattern names, their format, and this process's;
the sources (patterns with weights) of a mixture.

A pattern is a path with brace ranges and lists (``data/shard-{00000..00999}.tar``,
``data/{train,extra}/*.tar``) and glob wildcards (``*``, ``?``, ``[...]``), expanded in that
order; paths go through ``etils.epath``, so ``gs://`` and other file systems work where their
file system package is installed. The files are sorted and must all be of one format, told
by the extension (``FORMATS``); ``data.shard_format`` may name it instead of ``auto``.

``data.shards`` may name several sources mixed by weight, MaxText's ``grain_train_files``
syntax: ``/data/laion/{00000..00999}.tar,0.7;/data/coyo/*.parquet,0.3`` (``;`` between sources,
the weight after the last ``,`` outside braces; relative, each > 0; a single pattern needs none).

Every mistake here (a bad weight, no file, files of several formats or of no known one, fewer
shards than processes) is one ``ConfigError`` line, raised before anything compiles.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import re

from m6_jax.errors import ConfigError

# format -> the extensions of its files
FORMATS = {"webdataset": (".tar",), "parquet": (".parquet",)}

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_WILDCARD = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
  """``a{00..02}b{x,y}`` -> the 6 patterns, ranges keeping the width of their first bound."""
  match = _BRACES.search(pattern)
  if match is None:
    return [pattern]
  body = match.group(1)
  if m := _RANGE.match(body):
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
      raise ConfigError(f"brace range {{{body}}} in {pattern!r} counts down; write {{{hi}..{lo}}}")
    width = len(lo) if lo.startswith("0") else 0
    choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  else:
    choices = body.split(",")
  head, tail = pattern[: match.start()], pattern[match.end() :]
  return [p for c in choices for p in expand_braces(head + c + tail)]


def _glob(pattern: str) -> list[str]:
  """The files matching one brace-free pattern (the path itself when it has no wildcard)."""
  from etils import epath

  if not _WILDCARD.search(pattern):
    return [pattern] if epath.Path(pattern).is_file() else []
  # The longest leading part without a wildcard is the folder to glob from.
  parts = pattern.split("/")
  fixed = list(itertools.takewhile(lambda p: not _WILDCARD.search(p), parts))
  root = "/".join(fixed) or ("/" if pattern.startswith("/") else ".")
  rest = "/".join(parts[len(fixed) :])
  base = epath.Path(root)
  if not base.is_dir():
    return []
  return [str(p) for p in base.glob(rest) if p.is_file()]


def format_of(path: str) -> str | None:
  """The format a file's extension says, or None."""
  for name, extensions in FORMATS.items():
    if path.lower().endswith(extensions):
      return name
  return None


@dataclasses.dataclass(frozen=True)
class ShardList:
  paths: tuple[str, ...]  # sorted
  format: str  # a key of FORMATS

  def for_process(self, process_index: int, process_count: int, key: str) -> ShardList:
    """The shards process ``process_index`` of ``process_count`` reads: every n-th one."""
    if len(self.paths) < process_count:
      raise ConfigError(
        f"{key} names {len(self.paths)} shard(s) but the job has {process_count} processes; "
        "each process reads its own shards, so give at least one per process (split the "
        "shards into smaller ones, e.g. with --mode=prepare_data --output_format=...)."
      )
    return ShardList(self.paths[process_index::process_count], self.format)


def resolve(pattern: str, shard_format: str = "auto", key: str = "data.shards") -> ShardList:
  """The shards ``pattern`` names (see the module docstring), checked; ``key`` is the config
  key that holds it, for the messages."""
  if not pattern.strip():
    raise ConfigError(f"{key} is empty; give a shard pattern, e.g. /data/wds/{{00000..00099}}.tar")
  paths = sorted({p for part in expand_braces(pattern.strip()) for p in _glob(part)})
  if not paths:
    raise ConfigError(f"{key}={pattern!r} matches no file; check the path and the pattern.")
  by_format: dict[str | None, list[str]] = collections.defaultdict(list)
  for p in paths:
    by_format[format_of(p)].append(p)
  if shard_format != "auto":
    if shard_format not in FORMATS:
      raise ConfigError(f"data.shard_format={shard_format!r} is not one of {['auto', *FORMATS]}.")
    others = [p for f, ps in by_format.items() if f != shard_format for p in ps]
    if others:
      raise ConfigError(
        f"{key}={pattern!r} matches {len(others)} file(s) that are not {shard_format} shards "
        f"(e.g. {others[0]}); narrow the pattern to *{FORMATS[shard_format][0]} files."
      )
    return ShardList(tuple(paths), shard_format)
  if None in by_format or len(by_format) > 1:
    counts = ", ".join(
      f"{len(ps)} {f or 'other'} ({'e.g. ' + ps[0]})"
      for f, ps in sorted(by_format.items(), key=str)
    )
    known = ", ".join(f"{e} ({f})" for f, es in FORMATS.items() for e in es)
    raise ConfigError(
      f"{key}={pattern!r} matches files of more than one format or of an unknown one: "
      f"{counts}; shards must all be {known}. Narrow the pattern, e.g. to *.tar."
    )
  (fmt,) = by_format
  return ShardList(tuple(paths), fmt)


@dataclasses.dataclass(frozen=True)
class Source:
  """One pattern of ``data.shards`` and its weight (relative; 1 for a lone pattern)."""

  pattern: str
  weight: float
  label: str  # how messages name it: "data.shards" or "data.shards source 2"


def _split_weight(part: str) -> tuple[str, str | None]:
  """``pattern,weight`` -> (pattern, weight text); a comma inside braces is the pattern's."""
  depth, last = 0, -1
  for i, c in enumerate(part):
    depth += {"{": 1, "}": -1}.get(c, 0)
    if c == "," and depth == 0:
      last = i
  if last < 0:
    return part, None
  return part[:last].strip(), part[last + 1 :].strip()


def parse_sources(text: str, key: str = "data.shards") -> list[Source]:
  """The sources of ``text`` (see the module docstring); checks the syntax, not the files."""
  example = "/data/a/{00000..00099}.tar,0.7;/data/b/*.parquet,0.3"
  parts = [p.strip() for p in str(text).split(";")]
  if not any(parts):
    raise ConfigError(f"{key} is empty; give a shard pattern, e.g. /data/wds/{{00000..00099}}.tar")
  if not all(parts):
    raise ConfigError(
      f"{key}={text!r} has an empty source (two ';' in a row, or one at an end); write "
      f"pattern,weight;pattern,weight, e.g. {example}."
    )
  sources = []
  for i, part in enumerate(parts):
    label = key if len(parts) == 1 else f"{key} source {i + 1}"
    pattern, weight_text = _split_weight(part)
    if weight_text is None:
      if len(parts) > 1:
        raise ConfigError(
          f"{label} ({pattern!r}) has no weight; with several sources give each one after a "
          f"comma, e.g. {example}."
        )
      weight = 1.0
    else:
      try:
        weight = float(weight_text)
      except ValueError:
        weight = math.nan
      if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(
          f"{label} ({pattern!r}) has weight {weight_text!r}; a weight is a number > 0 after "
          f"the pattern's last comma outside braces, e.g. {example}."
        )
    if not pattern:
      raise ConfigError(f"{label} has a weight but no pattern; e.g. {example}.")
    sources.append(Source(pattern, weight, label))
  patterns = [s.pattern for s in sources]
  twice = sorted({p for p in patterns if patterns.count(p) > 1})
  if twice:
    raise ConfigError(f"{key} names {twice[0]!r} twice; give each pattern once, with one weight.")
  return sources


def resolve_sources(text: str, shard_format: str = "auto", key: str = "data.shards"):
  """[(Source, ShardList)] of every source of ``text``, each resolved and checked."""
  return [(s, resolve(s.pattern, shard_format, s.label)) for s in parse_sources(text, key)]
