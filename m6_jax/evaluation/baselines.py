"""The "most frequent answer / caption" baseline.

VQA: for each (language, question type) the answer seen most often in the training scenes
(the question type is readable from the question's wording, so this is the usual "prior"
baseline of VQA papers). Captioning: the caption seen most often per language. Ties go to
the text seen first.
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


def fit_synthetic(examples: Iterable[dict]) -> tuple[dict, dict]:
  """(answer table keyed by (lang, qtype), caption table keyed by lang) from train examples
  of the synthetic world (dicts with caption_en / caption_zh / qa)."""
  answers, captions = [], []
  for ex in examples:
    for lang in ("en", "zh"):
      captions.append((lang, ex[f"caption_{lang}"]))
    answers += [((qa["lang"], qa["qtype"]), qa["answer"]) for qa in ex["qa"]]
  return fit(answers), fit(captions)
