"""The language of text by its script: Chinese ("zh", Han characters) or English ("en",
Latin letters), for generation that keeps a text in one language.

A character is "zh" (a Han character), "en" (a Latin letter, accented or full-width ones
included), another script's letter, or none (punctuation, digits, spaces, symbols: they are
at home in both languages). A text mixes when it holds both a Han character and a Latin
letter. The tokenizers (tokenizer.py, wordpiece.py) give each id the text it stands for, and
`language_masks` makes of them one bool mask per language over the vocabulary: the ids whose
letters are all of that language's script, or which hold no letter.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import numpy as np

LANGUAGES = ("en", "zh")
# Han characters: CJK unified ideographs, extension A, compatibility ideographs and the
# supplementary-plane extensions.
HAN_CHARACTERS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_HAN_RE = re.compile(f"[{HAN_CHARACTERS}]")
OTHER = "other"  # a letter of neither script (Greek, Cyrillic, kana, ...)


def char_script(ch: str) -> str | None:
  """The script of `ch`: "zh" for a Han character, "en" for a Latin letter, OTHER for
  another letter, None for no script (punctuation, digits, spaces, symbols)."""
  if _HAN_RE.match(ch):
    return "zh"
  if not ch.isalpha():
    return None
  return "en" if "LATIN" in unicodedata.name(ch, "") else OTHER


def has_han(text: str) -> bool:
  """Whether `text` holds a Han character (what makes a text Chinese to evaluation)."""
  return _HAN_RE.search(text) is not None


def text_scripts(text: str) -> set[str]:
  """The scripts of `text`'s characters (None left out)."""
  return {s for s in map(char_script, text) if s is not None}


def mixes_languages(text: str) -> bool:
  """Whether `text` holds both a Han character and a Latin letter."""
  return set(LANGUAGES) <= text_scripts(text)


def first_language(text: str) -> str | None:
  """The language of `text`'s first Han character or Latin letter (None: it has neither)."""
  for ch in text:
    script = char_script(ch)
    if script in LANGUAGES:
      return script
  return None


def language_masks(piece_texts: Sequence[str | None], vocab_size: int) -> dict[str, np.ndarray]:
  """bool [vocab_size] per language: the ids generation in that language may choose.

  `piece_texts[i]` is the text id i stands for: "" for a special token (EOS and the like), None
  for a piece that may spell any script (a byte of a multi-byte character), allowed in
  neither language. An id whose letters are all of one language's script is in that
  language's mask; one with no letter is in both; ids past the pieces (image codes) hold no
  text and are in both (generation ANDs these masks with the text-token mask). The masks
  are read-only: the tokenizers keep them.
  """
  masks = {lang: np.ones(vocab_size, bool) for lang in LANGUAGES}
  for i, text in enumerate(piece_texts[:vocab_size]):
    scripts = {OTHER} if text is None else text_scripts(text)
    for lang in LANGUAGES:
      masks[lang][i] = scripts <= {lang}
  for mask in masks.values():
    mask.flags.writeable = False
  return masks
