"""The special ids every tokenizer of the project shares (tokenizer.py's sentencepiece and
wordpiece.py's OFA-CN vocabulary): a model's embedding rows 0..3 mean the same in both."""

from __future__ import annotations

from typing import Iterable

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


def ids_to_decode(ids: Iterable[int]) -> list[int]:
  """The ids of a generated or stored sequence that are text: those before the first EOS,
  without PAD and BOS."""
  out = []
  for i in ids:
    i = int(i)
    if i == EOS_ID:
      break
    if i not in (PAD_ID, BOS_ID):
      out.append(i)
  return out
