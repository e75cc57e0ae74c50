"""The BERT-style WordPiece tokenizer of OFA-CN checkpoints (data.tokenizer_kind="wordpiece").

The vocabulary is a `vocab.txt`, one piece per line, id = line number (lines split as
transformers' BERT tokenizer splits them), read by Hugging Face `tokenizers`: WordPiece with
BERT's normalizer and pre-tokenizer as OFA-CN's tokenizer runs them (lower case, accents
stripped, every Han character a word of its own; tests/test_ofa_convert.py compares them). It has the special ids of
m6_jax/data/tokenizer.py (0 <pad>, 1 </s>, 2 <s>, 3 <unk>): `--mode=convert --from=ofa`
writes OFA's vocabulary in that order (OFA's own is <s>, <pad>, </s>, <unk>) and permutes
the embedding rows to match. Pieces after the text vocabulary (OFA's <code_i> image codes
and <bin_i> location bins; <extra_i>: rows no piece names) are never generated as text.

Decoding is ModelScope's OFA-CN pipeline's: pieces joined as BERT joins them, BERT's clean-up
of the spaces before punctuation (`clean_up_spaces`: "1 , 1" -> "1, 1", as OFA's fairseq
evaluation and ModelScope under transformers < 4.45 decode; off, as ModelScope decodes under
later transformers), then its Chinese detokenizer: the spaces next to any character but ASCII
letters, digits and . , : ! ? go (一 只 猫 -> 一只猫). tests/test_ofa_convert.py compares both
with ModelScope's code.
"""

from __future__ import annotations

import io
import re
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from m6_jax.data import scripts
from m6_jax.data.special_ids import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ids_to_decode

SPECIAL_PIECES = ("<pad>", "</s>", "<s>", "<unk>")  # at ids 0..3
MASK_PIECE = "<mask>"
_NOT_TEXT = re.compile(r"^<(code|bin|extra)_\d+>$")
# ModelScope's OFA-CN detokenizer (OfaForAllTasks.detokenizer's pattern).
_DETOKENIZE = re.compile(r"((?<=[^ a-zA-Z0-9.,:!?]) +| +(?=[^ a-zA-Z0-9.,:!?]))")
# transformers' clean_up_tokenization, in its order.
_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")]
_CLEAN_UP += [(" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def read_vocab(path: str) -> list[str]:
  """The pieces of a vocab.txt in id order."""
  with open(path, "rb") as f:
    return _pieces(f.read())


def _pieces(data: bytes) -> list[str]:
  """Lines as a text-mode file reads them (universal newlines: \\n, \\r, \\r\\n), as
  transformers' load_vocab reads a vocab.txt; str.splitlines would also split at \\x1c,
  \\x85, \\u2028 and others, which would shift every later id."""
  return [line.rstrip("\n") for line in io.StringIO(data.decode("utf-8"), newline=None)]


class WordPieceTokenizer:
  """The interface of m6_jax.data.tokenizer.Tokenizer over a WordPiece vocabulary."""

  def __init__(self, vocab_bytes: bytes, clean_up_spaces: bool = True):
    self._load(vocab_bytes, clean_up_spaces)

  @classmethod
  def from_file(cls, path: str, clean_up_spaces: bool = True) -> "WordPieceTokenizer":
    with open(path, "rb") as f:
      return cls(f.read(), clean_up_spaces)

  def _load(self, vocab_bytes: bytes, clean_up_spaces: bool) -> None:
    self._bytes, self.clean_up_spaces = bytes(vocab_bytes), bool(clean_up_spaces)
    pieces = _pieces(self._bytes)
    if tuple(pieces[:4]) != SPECIAL_PIECES:
      raise ValueError(
        f"a wordpiece vocabulary must start with {', '.join(SPECIAL_PIECES)} (ids 0-3), not "
        f"{', '.join(pieces[:4])}; convert OFA checkpoints with --mode=convert --from=ofa."
      )
    vocab = {p: i for i, p in reversed(list(enumerate(pieces)))}  # first id of a duplicate
    self._pieces = pieces
    self._hf = HfTokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    self._hf.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    self._hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    self._hf.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # _CLEAN_UP's, or none
    specials = [p for p in pieces if p in SPECIAL_PIECES + (MASK_PIECE,) or _NOT_TEXT.match(p)]
    self._hf.add_special_tokens(specials)  # whole pieces, never split
    self._not_text = {i for i, p in enumerate(pieces) if _NOT_TEXT.match(p) or p == MASK_PIECE}
    self._mask_id = vocab.get(MASK_PIECE, UNK_ID)
    self._language_masks: dict[int, dict[str, np.ndarray]] = {}  # by vocab_size

  def __getstate__(self) -> dict:
    return {"vocab_bytes": self._bytes, "clean_up_spaces": self.clean_up_spaces}

  def __setstate__(self, state: dict) -> None:
    self._load(state["vocab_bytes"], state.get("clean_up_spaces", True))

  @property
  def model_proto(self) -> bytes:
    """The vocabulary file's bytes: what a checkpoint's tokenizer fingerprint hashes."""
    return self._bytes

  def encode(self, text: str) -> list[int]:
    return list(self._hf.encode(text, add_special_tokens=False).ids)

  def encode_source(self, text: str) -> list[int]:
    """A source text as OFA feeds its encoder: <s> pieces </s>."""
    return [BOS_ID, *self.encode(text), EOS_ID]

  def decode(self, ids: Sequence[int]) -> str:
    skipped = (UNK_ID, self._mask_id)  # what ModelScope's skip_special_tokens also drops
    out = [i for i in ids_to_decode(ids) if i < len(self._pieces) and i not in skipped]
    text = self._hf.decode(out, skip_special_tokens=False)
    if self.clean_up_spaces:
      for spaced, joined in _CLEAN_UP:
        text = text.replace(spaced, joined)
    return _DETOKENIZE.sub("", text.strip()).strip()

  def id_to_piece(self, i: int) -> str:
    return self._pieces[int(i)]

  @property
  def vocab_size(self) -> int:
    return len(self._pieces)

  pad_id = property(lambda self: PAD_ID)
  eos_id = property(lambda self: EOS_ID)
  bos_id = property(lambda self: BOS_ID)
  unk_id = property(lambda self: UNK_ID)
  mask_id = property(lambda self: self._mask_id)
  num_sentinels = property(lambda self: 0)

  def is_sentinel(self, i: int) -> bool:
    return False

  def text_token_mask(self, vocab_size: int) -> np.ndarray:
    """bool [vocab_size]: the ids generated text may hold (the text pieces and EOS)."""
    mask = np.zeros(vocab_size, bool)
    mask[: min(self.vocab_size, vocab_size)] = True
    for i in (PAD_ID, BOS_ID, UNK_ID, *self._not_text):
      if i < vocab_size:
        mask[i] = False
    return mask

  def language_token_masks(self, vocab_size: int) -> dict[str, np.ndarray]:
    """bool [vocab_size] per language ("en", "zh"): the ids of text in that language
    (scripts.language_masks); the special pieces and those that are not text hold no text,
    so they are in both; a continuation piece (##s) is judged by its text after ##."""
    if vocab_size not in self._language_masks:
      specials = {PAD_ID, EOS_ID, BOS_ID, UNK_ID, self._mask_id, *self._not_text}
      texts = ["" if i in specials else p.removeprefix("##") for i, p in enumerate(self._pieces)]
      self._language_masks[vocab_size] = scripts.language_masks(texts, vocab_size)
    return self._language_masks[vocab_size]
