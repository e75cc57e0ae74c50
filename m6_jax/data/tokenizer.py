"""SentencePiece tokenizer for Chinese + English text: training, loading, special tokens.

Special ids (fixed, the model and the data pipeline rely on them):
    0 <pad>   1 </s> (EOS)   2 <s> (BOS)   3 <unk>
followed by the user-defined symbols ``<mask>`` and the sentinels ``<extra_id_0>`` ...
``<extra_id_{n-1}>`` (T5-style span corruption). The ``Tokenizer`` looks them up by piece,
so it also works with models trained elsewhere as long as the pieces exist.

The model is BPE with byte fallback: any text round-trips (unseen characters become UTF-8
byte pieces instead of ``<unk>``), and the normalizer is the identity so that full-width
Chinese punctuation (，) is not folded to ASCII by NFKC and decode(encode(x)) == x.

Chinese is character-level by default (as M6's vocabulary was): at training time every Han
character is fenced off by sentencepiece's ``pretokenization_delimiter``, so each Han
character of the corpus becomes a piece of its own and no learned piece spans two of them
(``split_han=False``, config key ``data.tokenizer_split_han``, allows word pieces).
Without this, a small corpus of templated Chinese captions is learned as whole-caption
pieces (``▁一个手写的数字七``): such a caption cannot be span-masked, a new combination of its
words has no pieces, and most embedding rows go unused.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging

from m6_jax.data import scripts, synthetic, wordpiece
from m6_jax.data.scripts import HAN_CHARACTERS
from m6_jax.data.special_ids import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ids_to_decode

MASK_PIECE = "<mask>"
DEFAULT_NUM_SENTINELS = 32
# Put around pieces that must stay apart (Han characters; words of the synthetic corpus when
# split_han is off) at training time only; sentencepiece then never learns a piece across it.
_DELIMITER = "\t"
_HAN_RE = re.compile(f"([{HAN_CHARACTERS}])")


def fence_han(text: str, delimiter: str = _DELIMITER) -> str:
  """``text`` with ``delimiter`` on both sides of every Han character (and tabs, the
  delimiter, turned into spaces first so that only the fences remain)."""
  return _HAN_RE.sub(delimiter + r"\1" + delimiter, text.replace(delimiter, " "))


def sentinel_piece(i: int) -> str:
  return f"<extra_id_{i}>"


def train_tokenizer(
  sentences: Iterable[str],
  model_path: str,
  vocab_size: int,
  num_sentinels: int = DEFAULT_NUM_SENTINELS,
  *,
  character_coverage: float = 0.9995,
  pretokenization_delimiter: str = "",
  seed: int = 0,
) -> str:
  """Trains a BPE sentencepiece model on ``sentences`` and writes it to ``model_path``.

  ``vocab_size`` is a soft limit (``hard_vocab_limit=False``): on a small corpus BPE runs
  out of merges earlier and the model is smaller; ``Tokenizer.vocab_size`` reports the real
  size. ``character_coverage`` 0.9995 is the usual choice for Chinese (rare characters fall
  back to bytes). ``pretokenization_delimiter``, if non-empty, marks word boundaries in the
  training sentences that pieces must not cross (it is removed before training).

  Training is single-threaded with a fixed sentencepiece seed, so the same sentences give
  the same model bytes. The file appears atomically: the model is trained in memory,
  written to a temporary file next to ``model_path`` and moved in place with
  ``os.replace``, so an interrupted run never leaves a half-written model (and concurrent
  writers of the same deterministic model are harmless). Returns ``model_path``.
  """
  num_meta = 4 + 1 + num_sentinels
  if vocab_size <= num_meta + 256:
    raise ValueError(
      f"vocab_size={vocab_size} is too small: it must exceed the {num_meta} special "
      f"pieces plus 256 byte-fallback pieces plus the corpus characters."
    )
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      character_coverage=character_coverage,
      byte_fallback=True,
      normalization_rule_name="identity",
      pretokenization_delimiter=pretokenization_delimiter,
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      bos_id=BOS_ID,
      unk_id=UNK_ID,
      pad_piece="<pad>",
      eos_piece="</s>",
      bos_piece="<s>",
      unk_piece="<unk>",
      user_defined_symbols=[MASK_PIECE] + [sentinel_piece(i) for i in range(num_sentinels)],
      num_threads=1,  # multithreaded training is not bit-reproducible
      minloglevel=2,
    )
  except RuntimeError as e:
    raise RuntimeError(
      f"sentencepiece training for {model_path!r} failed (vocab_size={vocab_size}, "
      f"character_coverage={character_coverage}): {e}"
    ) from e

  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".spm-", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(model.getvalue())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, model_path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  return model_path


class Tokenizer:
  """A thin, picklable wrapper around ``sentencepiece.SentencePieceProcessor``.

  ``encode`` adds no BOS/EOS (the task code decides where they go); ``decode`` stops at
  the first EOS and drops PAD and BOS. Pickling ships the serialized model proto, so grain
  transforms holding a tokenizer can be sent to worker processes.
  """

  def __init__(self, model_proto: bytes):
    self._load(model_proto)

  @classmethod
  def from_file(cls, model_path: str) -> "Tokenizer":
    if not os.path.exists(model_path):
      raise FileNotFoundError(
        f"sentencepiece model not found at {model_path!r}; pass an existing "
        "model path, or none to train one from the synthetic corpus in the workdir."
      )
    with open(model_path, "rb") as f:
      return cls(f.read())

  def _load(self, model_proto: bytes) -> None:
    self._model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
    for name, want in (("pad", PAD_ID), ("eos", EOS_ID), ("bos", BOS_ID), ("unk", UNK_ID)):
      got = getattr(self._sp, f"{name}_id")()
      if got != want:
        raise ValueError(
          f"sentencepiece model has {name}_id={got}, expected {want}; "
          "train it with m6_jax.data.tokenizer.train_tokenizer."
        )
    self._mask_id = self._piece_id(MASK_PIECE)
    sentinels = []
    while True:
      i = self._sp.piece_to_id(sentinel_piece(len(sentinels)))
      if i == UNK_ID:
        break
      sentinels.append(i)
    self._sentinel_ids = tuple(sentinels)
    self._language_masks: dict[int, dict[str, np.ndarray]] = {}  # by vocab_size

  def _piece_id(self, piece: str) -> int:
    i = self._sp.piece_to_id(piece)
    if i == UNK_ID:
      raise ValueError(
        f"sentencepiece model has no {piece!r} piece; train it with "
        "m6_jax.data.tokenizer.train_tokenizer."
      )
    return i

  # Pickling: the SentencePieceProcessor itself is not picklable, its proto bytes are.
  def __getstate__(self) -> dict:
    return {"model_proto": self._model_proto}

  def __setstate__(self, state: dict) -> None:
    self._load(state["model_proto"])

  @property
  def model_proto(self) -> bytes:
    return self._model_proto

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_source(self, text: str) -> list[int]:
    """A source text's ids (M6 feeds the pieces alone; wordpiece.py's OFA-CN wraps them)."""
    return self.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode(ids_to_decode(ids))

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  @property
  def vocab_size(self) -> int:
    """The real number of pieces (may be below the vocab_size asked for at training)."""
    return self._sp.get_piece_size()

  pad_id = property(lambda self: PAD_ID)
  eos_id = property(lambda self: EOS_ID)
  bos_id = property(lambda self: BOS_ID)
  unk_id = property(lambda self: UNK_ID)
  mask_id = property(lambda self: self._mask_id)

  @property
  def num_sentinels(self) -> int:
    return len(self._sentinel_ids)

  def sentinel_id(self, i: int) -> int:
    if not 0 <= i < len(self._sentinel_ids):
      raise IndexError(f"sentinel {i} out of range: the model has {self.num_sentinels}")
    return self._sentinel_ids[i]

  def is_sentinel(self, i: int) -> bool:
    return int(i) in self._sentinel_ids

  def text_token_mask(self, vocab_size: int) -> np.ndarray:
    """bool [vocab_size]: the ids generated text may hold, i.e. the pieces and EOS, without
    PAD, BOS, <unk>, <mask>, the sentinels, or embedding rows past the tokenizer's pieces."""
    mask = np.zeros(vocab_size, bool)
    mask[: min(self.vocab_size, vocab_size)] = True
    for i in (PAD_ID, BOS_ID, UNK_ID, self._mask_id, *self._sentinel_ids):
      if i < vocab_size:
        mask[i] = False
    return mask

  def language_token_masks(self, vocab_size: int) -> dict[str, np.ndarray]:
    """bool [vocab_size] per language ("en", "zh"): the ids of text in that language
    (scripts.language_masks); special tokens hold no text, so they are in both; a byte
    piece is judged by its character when it is ASCII, and a byte of a multi-byte character
    may spell any script, so it is in neither."""
    if vocab_size not in self._language_masks:
      specials = {PAD_ID, EOS_ID, BOS_ID, UNK_ID, self._mask_id, *self._sentinel_ids}
      texts = ["" if i in specials else self._piece_text(i) for i in range(self.vocab_size)]
      self._language_masks[vocab_size] = scripts.language_masks(texts, vocab_size)
    return self._language_masks[vocab_size]

  def _piece_text(self, i: int) -> str | None:
    """The text of piece i (▁ for a space; "" for a control piece, which decodes to nothing;
    None for a byte of a multi-byte character)."""
    piece = self._sp.id_to_piece(i)
    if self._sp.is_control(i):
      return ""
    if not self._sp.is_byte(i):
      return piece
    byte = int(piece[1:-1], 16)  # <0x41>
    return chr(byte) if byte < 0x80 else None

  def sentinel_index(self, i: int) -> int:
    """The k with sentinel_id(k) == i (ValueError if i is not a sentinel)."""
    return self._sentinel_ids.index(int(i))


def load_tokenizer(
  path: str, clean_up_spaces: bool = True
) -> "Tokenizer | wordpiece.WordPieceTokenizer":
  """The tokenizer saved at `path`: a WordPiece vocab.txt (data.tokenizer_kind="wordpiece";
  `clean_up_spaces`: data.clean_up_tokenization_spaces, how it decodes) or a sentencepiece
  model."""
  if path.endswith(".txt"):
    if not os.path.exists(path):
      raise FileNotFoundError(f"wordpiece vocabulary not found at {path!r}.")
    return wordpiece.WordPieceTokenizer.from_file(path, clean_up_spaces)
  return Tokenizer.from_file(path)


def get_or_train_tokenizer(
  workdir: str,
  vocab_size: int,
  seed: int,
  num_corpus_examples: int,
  model_path: str | None = None,
  corpus: Iterable[str] | None = None,
  split_han: bool = True,
) -> Tokenizer:
  """Loads ``model_path`` if given; else loads or trains ``<workdir>/tokenizer/spm.model``.

  The default model is trained on ``corpus`` (e.g. a prepared dataset's texts) or, when it
  is None, on the texts of the first ``num_corpus_examples`` train scenes of the synthetic
  world with ``seed``, and reused on later runs. ``split_han``: every Han character of the
  corpus is a piece of its own and no piece spans two (character coverage 1.0, so none of
  them falls back to bytes); off, pieces may span Han characters (the synthetic corpus then
  keeps them within its Chinese words). Raises ValueError if the tokenizer has more pieces
  than ``vocab_size`` (the model's embedding table).
  """
  if model_path is not None:
    tok = load_tokenizer(model_path)
    logging.info("Loaded the tokenizer %s (%d pieces).", model_path, tok.vocab_size)
  else:
    path = os.path.join(workdir, "tokenizer", "spm.model")
    if os.path.exists(path):
      tok = Tokenizer.from_file(path)
      logging.info("Reusing sentencepiece model %s (%d pieces).", path, tok.vocab_size)
    else:
      # Where pieces must stop: Han characters, or (split_han off) the synthetic corpus's
      # Chinese words; nothing for a user corpus with split_han off.
      delimit, options = split_han, {}
      if corpus is not None:
        logging.info("Training sentencepiece model %s on the dataset's texts.", path)
      else:
        logging.info(
          "Training sentencepiece model %s on %d synthetic scenes (seed %d).",
          path,
          num_corpus_examples,
          seed,
        )
        words = "" if split_han else _DELIMITER
        corpus = synthetic.iter_corpus_text(seed, num_corpus_examples, words)
        delimit = True
      if split_han:
        corpus = (fence_han(text) for text in corpus)
        options["character_coverage"] = 1.0
      if delimit:
        options["pretokenization_delimiter"] = _DELIMITER
      train_tokenizer(corpus, path, vocab_size, seed=seed, **options)
      tok = Tokenizer.from_file(path)
      logging.info(
        "Trained sentencepiece model %s (%d pieces, asked for at most %d).",
        path,
        tok.vocab_size,
        vocab_size,
      )
    model_path = path
  if tok.vocab_size > vocab_size:
    raise ValueError(
      f"tokenizer {model_path} has {tok.vocab_size} pieces but vocab_size is {vocab_size}; "
      f"raise the config's vocab_size to at least {tok.vocab_size}."
    )
  return tok
