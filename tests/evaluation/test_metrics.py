"""Tests for m6_jax.evaluation.metrics: documented library values and hand computations."""

import math
import warnings

import pytest
from pycocoevalcap.cider.cider import Cider

from m6_jax.evaluation import metrics as M

# sacrebleu's README ("Using SacreBLEU from Python"), as streams: refs[k][i] is the k-th
# reference of sentence i.
README_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
README_REFS = [
  ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
  ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def _per_prediction(streams):
  return [list(refs) for refs in zip(*streams)]


# ----------------------------------------------------------------------------- BLEU


def test_bleu_reproduces_sacrebleu_readme_example():
  # README: "BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 ...)".
  score = M.bleu4(README_SYS, _per_prediction(README_REFS))
  assert round(score, 2) == 48.53


def test_bleu_ragged_references_reproduce_readme_variable_refs_example():
  # README "Variable Number of References": the first sentence loses its first reference
  # -> "BLEU = 29.44 82.4/42.9/27.3/12.5". Here sentence 0 simply has one reference.
  refs = _per_prediction(README_REFS)
  refs[0] = ["The dog had bit the man."]
  assert round(M.bleu4(README_SYS, refs), 2) == 29.44
  # Order of the references of a sentence does not matter.
  refs[1] = refs[1][::-1]
  assert round(M.bleu4(README_SYS, refs), 2) == 29.44


def test_bleu_single_reference_as_bare_string_and_perfect_match():
  assert M.bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
  assert M.bleu4(["The cat sat on the mat"], [["the cat sat on the mat"]]) < 100.0
  assert M.bleu4(
    ["The cat sat on the mat"], [["the cat sat on the mat"]], lowercase=True
  ) == pytest.approx(100.0)


def test_bleu_chinese_needs_zh_tokenizer():
  # zh: hyp 我/爱/北/京 (4 tokens), ref 我/爱/北/京/天/安/门 (7 tokens). Every n-gram
  # precision is 1 (4/4, 3/3, 2/2, 1/1); brevity penalty exp(1 - 7/4) = exp(-0.75).
  pred, ref = ["我爱北京"], [["我爱北京天安门"]]
  assert M.bleu4(pred, ref, lang="zh") == pytest.approx(100 * math.exp(-0.75), abs=1e-9)
  # 13a leaves each string as one token: "我爱北京" != "我爱北京天安门" -> 0.
  assert M.bleu4(pred, ref, lang="en") == 0.0


# ----------------------------------------------------------------------------- CIDEr-D


def test_caption_tokens():
  assert M.caption_tokens("A man's dog, running!") == ["a", "man's", "dog", "running"]
  assert M.caption_tokens("一只ＡＢ狗 在跑。abc", "zh") == [
    "一",
    "只",
    "ab",
    "狗",
    "在",
    "跑",
    "abc",
  ]


def test_cider_identical_gives_maximum_and_disjoint_gives_zero():
  preds = ["A man rides a horse.", "Two dogs play in the snow"]
  refs = [["a man rides a horse"] * 3, ["two dogs play in the snow"]]
  # Each candidate equals its references: cosine 1 for n = 1..4, no length penalty -> 10.
  assert M.cider(preds, refs) == pytest.approx(10.0)
  assert M.cider(["purple sky", "green sea"], refs) == 0.0


def test_cider_hand_computed_with_length_penalty():
  # Two images, L = idf = log(2) - log(1) for every n-gram (each occurs in one image's refs).
  # Image 0: hyp "cat" vs ref "cat sat": unigram cos = L*L / (L * L*sqrt(2)) = 1/sqrt(2);
  # no hyp bigrams/trigrams/4-grams -> 0. Length (bigram count) 0 vs 1 -> penalty
  # exp(-1 / (2 * 36)). Score = 10 * (1/sqrt(2)) * exp(-1/72) / 4.
  # Image 1: hyp "bird" shares nothing with "dog runs" -> 0. Corpus = mean of the two.
  expected = (10 * math.exp(-1 / 72) / math.sqrt(2) / 4 + 0.0) / 2
  score = M.cider(["cat", "bird"], [["cat sat"], ["dog runs"]])
  assert score == pytest.approx(expected, rel=1e-12)


def test_cider_clips_repeated_ngrams():
  # hyp "cat cat": tf-idf {cat: 2L}, |h| = 2L; ref "cat sat": {cat: L, sat: L}, |r| = L*sqrt(2).
  # Clipped dot = min(2L, L) * L = L^2 -> cos1 = 1 / (2 sqrt(2)) (unclipped would be 1/sqrt(2)).
  # Bigram "cat cat" is not in the ref -> 0; equal lengths -> no penalty.
  expected = (10 * (1 / (2 * math.sqrt(2))) / 4 + 0.0) / 2
  score = M.cider(["cat cat", "bird"], [["cat sat"], ["dog runs"]])
  assert score == pytest.approx(expected, rel=1e-12)


def test_cider_ngrams_in_every_image_weigh_nothing():
  # "a" is in both images' refs: idf = log 2 - log 2 = 0. Unigram vectors {a: 0, cat: L}
  # match exactly (cos 1), bigram "a cat" matches (cos 1), no 3/4-grams -> 10 * 2 / 4 = 5.
  assert M.cider(["a cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx(5.0)


def test_cider_matches_pycocoevalcap_on_pretokenized_corpus():
  preds = ["a man riding a brown horse", "two dogs are playing", "a plate of food", "x"]
  refs = [
    ["a man rides a horse", "a person on a horse in a field"],
    ["dogs playing in the snow", "two dogs play", "a pair of dogs running"],
    ["a plate with food on it"],
    ["a red bus on the street", "a bus"],
  ]
  ref_score, _ = Cider().compute_score(
    {i: r for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)}
  )
  assert 0.0 < ref_score < 10.0
  assert M.cider(preds, refs) == pytest.approx(float(ref_score), rel=1e-12)


def test_cider_chinese_is_per_character():
  preds = ["一只狗在草地上跑", "两个人在吃饭"]
  refs = [["一只狗在草地上奔跑。"], ["两个人在餐厅吃饭"]]
  zh = M.cider(preds, refs, lang="zh")
  # Whole-sentence "words" share nothing under the English tokenizer.
  assert M.cider(preds, refs, lang="en") == 0.0
  assert 0.0 < zh < 10.0


def test_cider_single_example_warns_and_scores_zero():
  with pytest.warns(UserWarning, match="one example"):
    assert M.cider(["a cat"], [["a cat"]]) == 0.0


# ----------------------------------------------------------------------------- VQA


def test_vqa_two_of_ten_humans_gives_sixty():
  # 10 leave-one-out subsets of 9 humans: dropping one of the 2 matching humans (2 subsets)
  # leaves 1 match -> 1/3; dropping a non-matching human (8 subsets) leaves 2 -> 2/3.
  # (2 * 1/3 + 8 * 2/3) / 10 = 0.6 -> 60.0.
  refs = [["2", "2", "3", "3", "3", "3", "3", "3", "4", "4"]]
  assert M.vqa_accuracy(["2"], refs)["overall"] == pytest.approx(60.0)
  # "Two" is normalised to "2" first.
  assert M.vqa_accuracy(["Two"], refs)["overall"] == pytest.approx(60.0)


def test_vqa_three_and_four_humans():
  # 3 matching: dropping a match (3 subsets) -> 2/3, else (7 subsets) -> 1; (2 + 7) / 10 = 0.9.
  refs = [["yes"] * 3 + ["no"] * 7]
  assert M.vqa_accuracy(["yes"], refs)["overall"] == pytest.approx(90.0)
  # 4 or more matching humans -> every subset has >= 3 -> 100; 0 matching -> 0.
  assert M.vqa_accuracy(["no"], refs)["overall"] == pytest.approx(100.0)
  assert M.vqa_accuracy(["maybe"], refs)["overall"] == 0.0


def test_vqa_single_reference_is_exact_match_after_normalisation():
  preds = ["Two", "a dog.", "dont", "The Cat!", "three"]
  refs = [["2"], ["dog"], ["don't"], ["cat"], ["4"]]
  assert M.vqa_accuracy(preds, refs)["overall"] == pytest.approx(80.0)


@pytest.mark.parametrize(
  "raw, normalised",
  [
    ("Two", "2"),
    ("none", "0"),
    ("a dog.", "dog"),
    ("An apple", "apple"),
    ("dont", "don't"),
    ("Don't", "don't"),
    ("isnt", "isn't"),
    ("1,000", "1000"),  # digit comma -> all punctuation deleted, not spaced
    ("3.5", "3.5"),  # period before a digit kept
    ("yes!", "yes"),
    ("black/white", "black white"),  # no space next to '/' -> replaced by a space
    ("  red\tand\nblue ", "red and blue"),
  ],
)
def test_vqa_normalisation(raw, normalised):
  assert M.normalize_vqa_answer(raw) == normalised
  assert M.normalize_answer(raw) == normalised


def test_zh_normalisation_and_accuracy():
  assert M.normalize_zh_answer(" 两只 狗。") == "两只狗"
  assert M.normalize_zh_answer("３.５米！") == "3.5米"  # full-width -> ASCII, decimal kept
  assert M.normalize_zh_answer("“红色”、蓝色") == "红色蓝色"
  out = M.vqa_accuracy(["红色。", "两只 狗", "猫"], [["红色"], ["两只狗"], ["狗"]])
  assert out["overall"] == pytest.approx(200.0 / 3)


def test_vqa_per_type_breakdown():
  preds = ["2", "yes", "red", "no"]
  refs = [
    ["2"] * 2 + ["3"] * 8,  # 60
    ["yes"] * 10,  # 100
    ["blue"] * 10,  # 0
    ["no"] * 3 + ["yes"] * 7,  # 90
  ]
  types = ["how many", "is this", "what color", "is this"]
  out = M.vqa_accuracy(preds, refs, question_types=types)
  assert out["overall"] == pytest.approx((60 + 100 + 0 + 90) / 4)
  assert out["per_type"] == pytest.approx({"how many": 60.0, "is this": 95.0, "what color": 0.0})
  assert M.vqa_accuracy(preds, refs)["per_type"] == {}


def test_exact_match():
  preds = ["A dog.", "two", "cat", "红色！"]
  refs = [["dog", "puppy"], ["2"], "cat ", ["红色"]]  # a bare string is one reference
  assert M.exact_match(preds, refs) == pytest.approx(100.0)
  # Without normalisation only "cat" == "cat ".strip() matches.
  assert M.exact_match(preds, refs, normalize=False) == pytest.approx(25.0)
  assert M.exact_match(["Cat"], ["cat "], normalize=False) == 0.0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [M.bleu4, M.cider, M.vqa_accuracy, M.exact_match])
def test_errors_on_bad_inputs(fn):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
      fn(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty"):
      fn([], [])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
      fn(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match=r"predictions\[0\]"):
      fn([None], [["a"]])
    with pytest.raises(ValueError, match="predictions must be a list"):
      fn("a", [["a"]])


def test_errors_on_bad_lang_and_question_types():
  with pytest.raises(ValueError, match="lang='de'"):
    M.bleu4(["a"], [["a"]], lang="de")
  with pytest.raises(ValueError, match="lang='fr'"):
    M.cider(["a", "b"], [["a"], ["b"]], lang="fr")
  with pytest.raises(ValueError, match="question_types"):
    M.vqa_accuracy(["a", "b"], [["a"], ["b"]], question_types=["t"])
