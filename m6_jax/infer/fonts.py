"""Fonts for drawing prompts and captions: a system font that fontconfig says has every glyph
of the text, else the CJK subset shipped in cjk_font/ (the synthetic world's Chinese,
punctuation and ASCII; its README says how it was made), so that Chinese draws on a machine
without a CJK font installed (a plain Linux box, Colab)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from typing import Callable

CJK_SUBSET = os.path.join(os.path.dirname(__file__), "cjk_font", "M6CJKSubset-Regular.otf")
CJK_SUBSET_FAMILY = "M6 CJK Subset"  # its family name, as matplotlib's font manager knows it
_CJK_CHARACTERS = os.path.join(os.path.dirname(__file__), "cjk_font", "characters.txt")
_CJK = "\u2e80-\u9fff\uff00-\uffef"  # CJK characters and punctuation, full-width forms
# A line may break before a CJK character (Chinese has no spaces), a word, or spaces.
_TOKENS = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+|\s+")


@functools.cache
def subset_characters() -> frozenset[str]:
  """The characters the shipped subset draws (the subsetter's input)."""
  with open(_CJK_CHARACTERS, encoding="utf-8") as f:
    return frozenset(f.read())


def system_font(text: str) -> str | None:
  """A font file fontconfig says covers every character of `text`, regular styles first."""
  if not shutil.which("fc-list"):
    return None
  charset = " ".join(f"{ord(ch):x}" for ch in sorted(set(text)) if not ch.isspace())
  try:
    out = subprocess.run(
      ["fc-list", "--format=%{file}\\n", f":charset={charset}"],
      capture_output=True,
      text=True,
      timeout=20,
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  files = sorted({f for f in out.splitlines() if f.endswith((".ttf", ".otf", ".ttc"))})
  styled = lambda f: any(s in os.path.basename(f) for s in ("Bold", "Italic", "Oblique", "Light"))
  files.sort(key=styled)
  return files[0] if files else None


def font_file(text: str) -> str | None:
  """A font file that draws every character of `text`: a system one, else the shipped
  subset when it covers them, else None."""
  path = system_font(text)
  if path:
    return path
  if set(text) - {" ", "\t", "\n"} <= subset_characters():
    return CJK_SUBSET
  return None


def wrap(text: str, fits: Callable[[str], bool]) -> list[str]:
  """`text` cut into lines that `fits` accepts, at spaces or between CJK characters (a word
  too long for a line gets a line of its own); its own newlines are kept."""
  lines = []
  for paragraph in text.split("\n"):
    current = ""
    for token in _TOKENS.findall(paragraph):
      if current.strip() and not token.isspace() and not fits((current + token).rstrip()):
        lines.append(current.rstrip())
        current = token
      elif current or not token.isspace():
        current += token
    lines.append(current.rstrip())
  return lines
