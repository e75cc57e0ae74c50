"""The "most frequent answer / caption" baseline: per key, the text seen most often in the
training data (ties: the text seen first).

Each eval kind says which (key, text) pairs it is fitted on (``eval_kinds.Baseline``). VQA:
for each (language, question type) the answer seen most often (the question type is
readable from the question's wording, so this is the usual "prior" baseline of VQA papers).
Captioning: the caption seen most often per language.
"""

from __future__ import annotations

import collections
from typing import Hashable, Iterable, Mapping, Sequence


def most_frequent(texts: Iterable[str]) -> str:
  """The most common text (ties: the first seen); ValueError on an empty input."""
  counts = collections.Counter(texts)
  if not counts:
    raise ValueError("most_frequent: no texts given.")
  return counts.most_common(1)[0][0]  # Counter keeps first-seen order among equal counts


def fit(pairs: Iterable[tuple[Hashable, str]]) -> dict[Hashable, str]:
  """{key: most frequent text among the pairs with that key}."""
  by_key: dict[Hashable, list[str]] = collections.defaultdict(list)
  for key, text in pairs:
    by_key[key].append(text)
  return {k: most_frequent(v) for k, v in by_key.items()}


def predict(table: Mapping[Hashable, str], keys: Sequence[Hashable]) -> list[str]:
  """The table's text for each key; a key never seen gets the overall most frequent text."""
  fallback = most_frequent(table.values()) if table else ""
  return [table.get(k, fallback) for k in keys]
