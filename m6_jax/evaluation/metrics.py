"""Metrics reported for captioning, VQA and text generation.

All functions take plain Python strings: ``predictions[i]`` is the model output for example
``i`` and ``references[i]`` the list of reference strings for it (a bare string is accepted
as a single reference). Inputs are checked up front; mismatched lengths, empty inputs or
examples without references raise ``ValueError`` saying which example is wrong.

* :func:`bleu4` -- corpus BLEU-4 from ``sacrebleu`` (0-100). ``lang="zh"`` uses sacrebleu's
  ``zh`` tokenizer (every Chinese character is a token, the rest as ``13a``); ``lang="en"``
  uses ``13a``. Any number of references per prediction (ragged is fine).
* :func:`cider` -- CIDEr-D as computed by ``pycocoevalcap.cider.cider.Cider`` (the scorer
  behind the "CIDEr" column of the COCO caption leaderboard and most captioning papers),
  fed with our own Java-free tokenization. Reported on pycocoevalcap's scale (papers
  usually print it x100, e.g. 1.17 -> "117"). See :func:`cider` for the exact variant.
* :func:`vqa_accuracy` -- the official VQA accuracy (answer normalisation of the official
  ``vqaEval.py`` and ``min(#humans / 3, 1)`` averaged over leave-one-out subsets), with a
  per-question-type breakdown; Chinese answers get a whitespace/punctuation normalisation.
* :func:`exact_match` -- share of predictions equal to any reference after
  :func:`normalize_answer` (0-100).
"""

from __future__ import annotations

import re
import string
import unicodedata
import warnings
from collections import defaultdict
from typing import Sequence, Union

import sacrebleu
from pycocoevalcap.cider.cider import Cider

from m6_jax.data.scripts import HAN_CHARACTERS, LANGUAGES
from m6_jax.evaluation import vqa_tables

__all__ = [
  "bleu4",
  "cider",
  "vqa_accuracy",
  "exact_match",
  "normalize_answer",
  "normalize_vqa_answer",
  "normalize_zh_answer",
  "caption_tokens",
]

References = Sequence[Union[str, Sequence[str]]]

_BLEU_TOKENIZERS = {"en": "13a", "zh": "zh"}
_LANGS = LANGUAGES

_CJK = HAN_CHARACTERS  # Chinese (Han) characters
_CJK_RE = re.compile(f"[{_CJK}]")
# English caption tokens: runs of letters/digits, keeping in-word apostrophes ("don't").
_EN_TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
# Chinese caption tokens: one token per Han character, other letter/digit runs kept whole.
_ZH_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


# --------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------


def _check_inputs(predictions, references, name: str) -> list[list[str]]:
  """Validates ``predictions``/``references``; returns references as lists of strings."""
  if isinstance(predictions, str) or not isinstance(predictions, Sequence):
    raise ValueError(
      f"{name}: predictions must be a list of strings, got {type(predictions).__name__}."
    )
  if isinstance(references, str) or not isinstance(references, Sequence):
    raise ValueError(
      f"{name}: references must be a list (one entry per prediction) of lists of "
      f"reference strings, got {type(references).__name__}."
    )
  if len(predictions) == 0:
    raise ValueError(f"{name}: predictions is empty; pass at least one example.")
  if len(predictions) != len(references):
    raise ValueError(
      f"{name}: got {len(predictions)} predictions but {len(references)} reference "
      "lists; references[i] must hold the references of predictions[i]."
    )
  refs_out = []
  for i, (pred, refs) in enumerate(zip(predictions, references)):
    if not isinstance(pred, str):
      raise ValueError(f"{name}: predictions[{i}] is {type(pred).__name__}, not a str.")
    if isinstance(refs, str):
      refs = [refs]
    refs = list(refs)
    if not refs:
      raise ValueError(
        f"{name}: references[{i}] is empty; every prediction needs at least one "
        "reference (drop the example or supply a reference)."
      )
    for j, ref in enumerate(refs):
      if not isinstance(ref, str):
        raise ValueError(f"{name}: references[{i}][{j}] is {type(ref).__name__}, not a str.")
    refs_out.append(refs)
  return refs_out


def _check_lang(lang: str, allowed: Sequence[str], name: str) -> None:
  if lang not in allowed:
    raise ValueError(f"{name}: lang={lang!r} is not supported; use one of {list(allowed)}.")


# --------------------------------------------------------------------------------------
# BLEU
# --------------------------------------------------------------------------------------


def bleu4(
  predictions: Sequence[str],
  references: References,
  lang: str = "en",
  lowercase: bool = False,
) -> float:
  """Corpus BLEU-4 (0-100) computed by ``sacrebleu.corpus_bleu``.

  Args:
    predictions: one detokenized hypothesis per example.
    references: ``references[i]`` is the list of references of ``predictions[i]``; the
      lists may have different lengths (sacrebleu's variable-reference mode: the
      transposed reference streams are padded with ``None``, which sacrebleu ignores).
    lang: ``"en"`` -> sacrebleu tokenizer ``13a``; ``"zh"`` -> ``zh`` (each Chinese
      character is a token). Pass raw text; do not pre-tokenize.
    lowercase: sacrebleu's ``lowercase`` flag (default: case-sensitive, sacrebleu's default).
  """
  refs = _check_inputs(predictions, references, "bleu4")
  _check_lang(lang, _LANGS, "bleu4")
  num_streams = max(len(r) for r in refs)
  streams = [[r[k] if k < len(r) else None for r in refs] for k in range(num_streams)]
  result = sacrebleu.corpus_bleu(
    list(predictions), streams, tokenize=_BLEU_TOKENIZERS[lang], lowercase=lowercase
  )
  return float(result.score)


# --------------------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------------------


def caption_tokens(text: str, lang: str = "en") -> list[str]:
  """Tokens used for CIDEr (a Java-free stand-in for the COCO PTB tokenizer).

  ``en``: NFKC, lowercase, runs of letters/digits (apostrophes inside a word kept:
  ``"don't"``); all punctuation dropped, as the COCO tokenizer drops it.
  ``zh``: NFKC (full-width -> ASCII), lowercase, one token per Chinese character, runs of
  other letters/digits kept whole; punctuation and whitespace dropped.
  """
  _check_lang(lang, _LANGS, "caption_tokens")
  text = unicodedata.normalize("NFKC", text).lower()
  pattern = _EN_TOKEN_RE if lang == "en" else _ZH_TOKEN_RE
  return pattern.findall(text)


def cider(predictions: Sequence[str], references: References, lang: str = "en") -> float:
  """Corpus CIDEr-D, the value ``pycocoevalcap.cider.cider.Cider().compute_score`` gives.

  Which variant: pycocoevalcap's ``Cider`` (n = 1..4, sigma = 6) is CIDEr-D of Vedantam et
  al. 2015 as used by the COCO caption server: tf-idf n-gram vectors with document
  frequency counted over the reference sets of the evaluated corpus, the candidate's
  tf-idf *clipped* to the reference's (``min(h, r) * r``), a Gaussian length penalty
  ``exp(-(l_h - l_r)^2 / (2 * 6^2))``, cosine similarity averaged over references and over
  n = 1..4, times 10. No stemming. The score is on pycocoevalcap's scale (identical
  candidate and references give 10 at most; papers print it x100). We report exactly what
  that scorer returns, quirks included:

  * the length in the penalty is counted as the number of bigrams (``words - 1``), so it
    equals the word-length difference except when a sentence is empty;
  * idf is ``log(#examples) - log(max(1, df))``: n-grams present in every example's
    references weigh nothing, and a corpus of one example always scores 0 (warned).

  Tokenization is :func:`caption_tokens` (the PTB tokenizer pycocoevalcap ships needs Java);
  tokens are joined with spaces because the scorer splits on whitespace.
  """
  refs = _check_inputs(predictions, references, "cider")
  _check_lang(lang, _LANGS, "cider")
  if len(predictions) == 1:
    warnings.warn(
      "cider: a corpus of one example always scores 0 (idf = log(1) - log(1)); "
      "CIDEr is meant for a whole evaluation set.",
      stacklevel=2,
    )
  res = {i: [" ".join(caption_tokens(p, lang))] for i, p in enumerate(predictions)}
  gts = {i: [" ".join(caption_tokens(r, lang)) for r in rs] for i, rs in enumerate(refs)}
  if not any(ref for rs in gts.values() for ref in rs):
    # pycocoevalcap asserts on an empty document-frequency table; nothing can match.
    return 0.0
  score, _ = Cider(n=4, sigma=6.0).compute_score(gts, res)
  return float(score)


# --------------------------------------------------------------------------------------
# VQA accuracy
# --------------------------------------------------------------------------------------


def _vqa_process_punctuation(text: str) -> str:
  """Official ``processPunctuation``."""
  out = text
  has_digit_comma = vqa_tables.COMMA_STRIP.search(text) is not None
  for p in vqa_tables.PUNCT:
    if (p + " " in text or " " + p in text) or has_digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  # The official call is ``sub("", out, re.UNICODE)``, i.e. count=re.UNICODE (32).
  return vqa_tables.PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _vqa_process_digit_article(text: str) -> str:
  """Official ``processDigitArticle``: lowercase, number words -> digits, drop articles,
  restore contractions."""
  words = []
  for word in text.lower().split():
    word = vqa_tables.NUMBERS.get(word, word)
    if word not in vqa_tables.ARTICLES:
      words.append(word)
  return " ".join(vqa_tables.CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
  """The official VQA answer normalisation (what ``vqaEval.py`` applies to predictions):
  newlines/tabs -> spaces, strip, ``processPunctuation``, ``processDigitArticle``.

  >>> normalize_vqa_answer("Two dogs.")
  '2 dogs'
  """
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _vqa_process_digit_article(_vqa_process_punctuation(text))


_ASCII_PUNCT = frozenset(string.punctuation)


def normalize_zh_answer(text: str) -> str:
  """Normalisation for Chinese answers.

  NFKC (full-width letters, digits and punctuation -> ASCII), lowercase, then every
  whitespace character and every punctuation character (Unicode category ``P*``: Chinese
  ``。，、；：？！“”‘’（）《》【】…`` etc., plus all ASCII punctuation) is removed -- except a
  ``.`` between two digits, so ``"3.5"`` stays a decimal. No number-word conversion.

  >>> normalize_zh_answer("两只 狗。")
  '两只狗'
  """
  text = unicodedata.normalize("NFKC", text).lower()
  out = []
  for i, ch in enumerate(text):
    if ch.isspace():
      continue
    if ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P"):
      if ch == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
        out.append(ch)
      continue
    out.append(ch)
  return "".join(out)


def _has_cjk(text: str) -> bool:
  return _CJK_RE.search(text) is not None


def _answer_lang(pred: str, refs: Sequence[str], lang: str) -> str:
  if lang != "auto":
    return lang
  return "zh" if _has_cjk(pred) or any(_has_cjk(r) for r in refs) else "en"


def normalize_answer(text: str, lang: str = "auto") -> str:
  """:func:`normalize_vqa_answer` for English, :func:`normalize_zh_answer` for Chinese;
  ``lang="auto"`` picks Chinese when the text contains a Chinese character."""
  _check_lang(lang, _LANGS + ("auto",), "normalize_answer")
  lang = _answer_lang(text, (), lang)
  return normalize_zh_answer(text) if lang == "zh" else normalize_vqa_answer(text)


def _vqa_score(pred: str, refs: Sequence[str]) -> float:
  """Accuracy in [0, 1] of one normalised prediction against normalised references."""
  if len(refs) == 1:
    return float(pred == refs[0])
  # Official: for each human answer, min(1, #matches among the *other* answers / 3),
  # averaged over all leave-one-out subsets (10 choose 9 for VQA's 10 answers).
  matches = [r == pred for r in refs]
  total = sum(matches)
  return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(refs)


def vqa_accuracy(
  predictions: Sequence[str],
  references: References,
  question_types: Sequence[str] | None = None,
  lang: str = "auto",
) -> dict:
  """VQA accuracy (0-100), overall and per question type.

  Each prediction and each reference answer is normalised with :func:`normalize_answer`
  (official VQA normalisation for English; whitespace/punctuation stripping for Chinese;
  ``lang="auto"`` decides per question: Chinese if the prediction or any reference has a
  Chinese character). Then, with one reference the score is exact match; with several
  (VQA: 10 human answers) it is the official ``min(#humans that gave the answer / 3, 1)``
  averaged over the leave-one-out subsets of the humans. (With fewer than 4 references the
  leave-one-out formula cannot reach 1; that is the official formula, not a bug here.)

  Difference from ``vqaEval.py``: the official script normalises the prediction fully but
  the human answers only with ``processPunctuation`` and only when they disagree, relying
  on the released annotations being normalised already; we normalise every reference
  fully, which gives the same numbers on such annotations and sane ones on raw answers.
  Scores are not rounded (the official script rounds to 2 decimals).

  Returns:
    ``{"overall": float, "per_type": {question_type: float}}``; ``per_type`` is empty when
    ``question_types`` is None.
  """
  refs = _check_inputs(predictions, references, "vqa_accuracy")
  _check_lang(lang, _LANGS + ("auto",), "vqa_accuracy")
  if question_types is not None:
    if isinstance(question_types, str) or len(question_types) != len(predictions):
      n = "a str" if isinstance(question_types, str) else len(question_types)
      raise ValueError(
        f"vqa_accuracy: question_types must be a list with one type per prediction "
        f"({len(predictions)}), got {n}."
      )
  scores = []
  for pred, rs in zip(predictions, refs):
    q_lang = _answer_lang(pred, rs, lang)
    norm = normalize_zh_answer if q_lang == "zh" else normalize_vqa_answer
    scores.append(_vqa_score(norm(pred), [norm(r) for r in rs]))
  per_type: dict[str, float] = {}
  if question_types is not None:
    by_type: dict[str, list[float]] = defaultdict(list)
    for qtype, s in zip(question_types, scores):
      by_type[str(qtype)].append(s)
    per_type = {t: 100.0 * sum(v) / len(v) for t, v in by_type.items()}
  return {"overall": 100.0 * sum(scores) / len(scores), "per_type": per_type}


def exact_match(
  predictions: Sequence[str],
  references: References,
  normalize: bool = True,
  lang: str = "auto",
) -> float:
  """Percentage (0-100) of predictions equal to at least one of their references, after
  :func:`normalize_answer` (``normalize=False``: compared after ``strip()`` only)."""
  refs = _check_inputs(predictions, references, "exact_match")
  _check_lang(lang, _LANGS + ("auto",), "exact_match")
  hits = 0
  for pred, rs in zip(predictions, refs):
    if normalize:
      q_lang = _answer_lang(pred, rs, lang)
      norm = normalize_zh_answer if q_lang == "zh" else normalize_vqa_answer
    else:
      norm = str.strip
    p = norm(pred)
    hits += any(p == norm(r) for r in rs)
  return 100.0 * hits / len(predictions)
