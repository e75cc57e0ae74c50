"""Tests for the sentencepiece tokenizer wrapper."""

import os
import pickle
import re

import numpy as np
import pytest

from m6_jax.data import synthetic as S
from m6_jax.data import tasks
from m6_jax.data import tokenizer as T


def test_special_ids(tokenizer):
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
  assert tokenizer.id_to_piece(tokenizer.mask_id) == "<mask>"
  assert tokenizer.num_sentinels == 32
  ids = [tokenizer.sentinel_id(i) for i in range(32)]
  assert [tokenizer.id_to_piece(i) for i in ids] == [f"<extra_id_{i}>" for i in range(32)]
  assert len(set(ids + [0, 1, 2, 3, tokenizer.mask_id])) == 37
  assert tokenizer.is_sentinel(ids[5]) and not tokenizer.is_sentinel(tokenizer.mask_id)
  assert tokenizer.sentinel_index(ids[7]) == 7
  with pytest.raises(IndexError):
    tokenizer.sentinel_id(32)


def test_vocab_size_fits_base_config(tokenizer):
  # vocab_size is a soft limit; the tokenizer reports the real piece count
  assert 300 < tokenizer.vocab_size <= 1000
  assert tokenizer.id_to_piece(tokenizer.vocab_size - 1) != ""


def test_round_trips_unseen_captions_and_questions(tokenizer):
  # validation scenes were not in the training corpus
  src = S.SyntheticWorldSource(0, "validation", 40)
  for i in range(len(src)):
    ex = src[i]
    texts = [ex["caption_en"], ex["caption_zh"]]
    texts += [q[k] for q in ex["qa"] for k in ("question", "answer")]
    for text in texts:
      ids = tokenizer.encode(text)
      assert tokenizer.unk_id not in ids
      assert tokenizer.decode(ids) == text
  # Chinese is one piece per character; English keeps its words
  pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("左上角有一个小的红色圆形。")]
  assert "".join(pieces).lstrip("▁") == "左上角有一个小的红色圆形。"
  assert max(len(p.lstrip("▁")) for p in pieces) == 1
  assert "▁circle" in [tokenizer.id_to_piece(i) for i in tokenizer.encode("a red circle")]


def test_byte_fallback_round_trips_anything(tokenizer):
  for text in ["Hello, 世界! ü ß 🙂", "完全没见过的字：龘", "a\ttab"]:
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text
  # the one normalization left: sentencepiece collapses runs of spaces
  assert tokenizer.decode(tokenizer.encode("two  spaces ")) == "two spaces"


def test_decode_stops_at_eos_and_ignores_padding(tokenizer):
  ids = tokenizer.encode("a red circle.")
  assert tokenizer.encode("a red circle.")[0] != tokenizer.bos_id  # no BOS added
  assert (
    tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id] + ids + [0, 0])
    == "a red circle."
  )
  assert tokenizer.decode(ids[:2] + [0] + ids[2:]) == "a red circle."


def test_pickle_round_trip(tokenizer):
  clone = pickle.loads(pickle.dumps(tokenizer))
  text = "右上角有一个大的蓝色星形。"
  assert clone.encode(text) == tokenizer.encode(text)
  assert clone.vocab_size == tokenizer.vocab_size
  assert clone.mask_id == tokenizer.mask_id
  assert clone.sentinel_id(3) == tokenizer.sentinel_id(3)
  assert clone.model_proto == tokenizer.model_proto


def test_training_is_deterministic_and_atomic(tmp_path):
  corpus = list(S.iter_corpus_text(5, 200))
  a = T.train_tokenizer(corpus, str(tmp_path / "a" / "spm.model"), vocab_size=600)
  b = T.train_tokenizer(corpus, str(tmp_path / "b" / "spm.model"), vocab_size=600)
  assert open(a, "rb").read() == open(b, "rb").read()
  # only the model is left behind: no temporary files
  assert os.listdir(tmp_path / "a") == ["spm.model"]
  with pytest.raises(ValueError, match="too small"):
    T.train_tokenizer(corpus, str(tmp_path / "c.model"), vocab_size=100)
  assert not (tmp_path / "c.model").exists()


def test_get_or_train_reuses_the_workdir_model(tokenizer, tokenizer_workdir):
  path = os.path.join(tokenizer_workdir, "tokenizer", "spm.model")
  mtime = os.stat(path).st_mtime_ns
  again = T.get_or_train_tokenizer(
    tokenizer_workdir, vocab_size=1000, seed=0, num_corpus_examples=2000
  )
  assert os.stat(path).st_mtime_ns == mtime
  assert again.model_proto == tokenizer.model_proto
  explicit = T.get_or_train_tokenizer("/nonexistent", 1000, 0, 10, model_path=path)
  assert explicit.model_proto == tokenizer.model_proto
  with pytest.raises(ValueError, match="vocab_size"):
    T.get_or_train_tokenizer(
      tokenizer_workdir, vocab_size=tokenizer.vocab_size - 1, seed=0, num_corpus_examples=2000
    )


def test_missing_model_path_is_a_clear_error(tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    T.get_or_train_tokenizer(str(tmp_path), 1000, 0, 10, model_path=missing)


DIGITS_ZH = "零一二三四五六七八九"
STYLES_ZH = ("手写的", "打印的", "模糊的")


def _digit_captions(n):
  """Templated Chinese captions like a user's handwritten-digit set ("一个手写的数字七")."""
  return [f"一个{STYLES_ZH[i % 3]}数字{DIGITS_ZH[i % 10]}" for i in range(n)]


def _han_pieces(tokenizer, text):
  han = re.compile(f"[{T.HAN_CHARACTERS}]")
  return [len(han.findall(tokenizer.id_to_piece(i))) for i in tokenizer.encode(text)]


def test_templated_chinese_captions_stay_character_level(tmp_path):
  captions = _digit_captions(300)
  tok = T.get_or_train_tokenizer(str(tmp_path / "char"), 512, 0, 0, corpus=iter(captions))
  for caption in captions[:30] + ["七个打印的数字一"]:  # the last: a new combination of words
    counts = _han_pieces(tok, caption)
    assert max(counts) == 1, caption  # no piece spans two Han characters
    assert sum(counts) == len(re.findall(f"[{T.HAN_CHARACTERS}]", caption))  # none lost
    assert tok.decode(tok.encode(caption)) == caption
  # every Han character of the corpus is a piece of its own (none falls back to bytes)
  for char in set("".join(captions)):
    assert tok.id_to_piece(tok.encode(char)[-1]) == char
  # What the fence prevents: the same corpus, pieces allowed across characters, is learned
  # as whole captions.
  merged = T.get_or_train_tokenizer(
    str(tmp_path / "free"), 512, 0, 0, corpus=iter(captions), split_han=False
  )
  assert max(_han_pieces(merged, captions[7])) > 4


def test_span_corruption_masks_templated_chinese_captions(tmp_path):
  tok = T.get_or_train_tokenizer(str(tmp_path), 512, 0, 0, corpus=iter(_digit_captions(300)))
  example = {"image": np.zeros((8, 8, 3), np.uint8), "caption_en": "", "qa": []}
  example["caption_zh"] = example["caption_en"] = "一个手写的数字七"
  cfg = tasks.TaskConfig(src_len=16, tgt_len=16, noise_density=0.3)
  masked = 0
  for seed in range(8):
    f = tasks.multimodal_to_text(example, tok, np.random.default_rng(seed), cfg)
    target = f["tgt_target"][f["tgt_weights"] > 0][:-1]  # the caption, EOS dropped
    assert tok.decode(target) == "一个手写的数字七"
    masked += int((f["src_tokens"] == tok.mask_id).sum())
    corrupted = tasks.text_to_text(example, tok, np.random.default_rng(seed), cfg)
    assert any(tok.is_sentinel(i) for i in corrupted["src_tokens"])
  assert masked >= 8  # spans of the caption are masked in every example, not copied


def test_language_masks_classify_pieces_by_script(tokenizer):
  """A piece with a Han character is Chinese, one with a Latin letter English, one with
  neither (punctuation, digits, EOS, special tokens) both; a byte of a multi-byte character
  could spell either, so it is neither. The same for a WordPiece vocabulary."""
  from m6_jax.data import scripts, wordpiece

  vocab = tokenizer.vocab_size + 8  # embedding rows past the pieces: no text
  masks = tokenizer.language_token_masks(vocab)
  assert set(masks) == {"en", "zh"} and masks["en"].shape == (vocab,)
  piece = tokenizer._sp.piece_to_id
  expect = {  # piece -> (en, zh)
    "▁triangle": (True, False),
    "红": (False, True),
    "。": (True, True),
    ".": (True, True),
    "</s>": (True, True),
    "<0x41>": (True, False),  # "A"
    "<0x2E>": (True, True),  # "."
    "<0xE4>": (False, False),  # the first byte of 红 and of many other characters
  }
  for p, (en, zh) in expect.items():
    i = piece(p)
    assert i != tokenizer.unk_id and tokenizer.id_to_piece(i) == p, p
    assert (masks["en"][i], masks["zh"][i]) == (en, zh), p
  assert masks["en"][tokenizer.vocab_size :].all() and masks["zh"][tokenizer.vocab_size :].all()
  # A text piece in both languages decodes to no letter.
  text = tokenizer.text_token_mask(tokenizer.vocab_size)
  both = np.flatnonzero((masks["en"] & masks["zh"])[: tokenizer.vocab_size] & text)
  assert len(both) > 10 and not any(scripts.text_scripts(tokenizer.decode([i])) for i in both)

  lines = ["<pad>", "</s>", "<s>", "<unk>", "<mask>", "猫", "red", "##s", "，", "1", "<code_0>"]
  wp = wordpiece.WordPieceTokenizer("\n".join(lines).encode())
  wp_masks = wp.language_token_masks(len(lines))
  got = {p: (bool(wp_masks["en"][i]), bool(wp_masks["zh"][i])) for i, p in enumerate(lines)}
  assert got["猫"] == (False, True) and got["red"] == got["##s"] == (True, False)
  assert got["，"] == got["1"] == got["</s>"] == got["<mask>"] == got["<code_0>"] == (True, True)

  mixed = "triangle角有一个大的蓝色三角形"
  assert scripts.mixes_languages(mixed) and scripts.first_language(mixed) == "en"
  assert not any(map(scripts.mixes_languages, ["左侧有一个小的橙色圆形。3", "a 1.", "ü Ω"]))
  assert scripts.first_language("3，红 red") == "zh" and scripts.first_language("1 。") is None
