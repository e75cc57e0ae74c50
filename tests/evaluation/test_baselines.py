"""The most-frequent answer / caption baseline on hand-made data."""

import pytest

from m6_jax.evaluation import baselines, eval_kinds


def test_most_frequent_and_ties():
  assert baselines.most_frequent(["a", "b", "b", "c"]) == "b"
  assert baselines.most_frequent(["x", "y", "y", "x"]) == "x"  # tie: first seen
  with pytest.raises(ValueError, match="no texts"):
    baselines.most_frequent([])


def test_fit_the_kinds_pairs_and_predict():
  examples = [
    {
      "caption_en": "a red circle.",
      "caption_zh": "红色圆形。",
      "qa": [
        {"question": "q1", "answer": "red", "qtype": "color", "lang": "en"},
        {"question": "q2", "answer": "one", "qtype": "count", "lang": "en"},
      ],
    },
    {
      "caption_en": "a blue square.",
      "caption_zh": "蓝色正方形。",
      "qa": [
        {"question": "q1", "answer": "blue", "qtype": "color", "lang": "en"},
        {"question": "q3", "answer": "blue", "qtype": "color", "lang": "en"},
        {"question": "q4", "answer": "两个", "qtype": "count", "lang": "zh"},
      ],
    },
  ]

  def fit(kind):
    pairs = eval_kinds.get(kind).baseline.example_pairs
    return baselines.fit(p for ex in examples for p in pairs(ex))

  answers, captions = fit("vqa"), fit("caption")
  assert answers == {("en", "color"): "blue", ("en", "count"): "one", ("zh", "count"): "两个"}
  assert captions == {"en": "a red circle.", "zh": "红色圆形。"}
  # An unseen key falls back to the overall most frequent text.
  assert baselines.predict(answers, [("en", "color"), ("zh", "shape")]) == ["blue", "blue"]
