"""The task registry and the per-task feature functions."""

import ml_collections
import numpy as np
import pytest

from m6_jax.data import span_corruption
from m6_jax.data import synthetic as S
from m6_jax.data import tasks as K

VOCAB = 1000  # the data tests' model vocabulary: image code c is token id VOCAB + c
CODE_GRID = (3, 4)
# The default lengths: every synthetic caption fits whole (Chinese: one piece per character).
CFG = K.TaskConfig(
  src_len=48, tgt_len=48, noise_density=0.15, mean_noise_span_length=3.0, code_offset=VOCAB
)


def with_codes(example, seed=0):
  """The example with stand-in image codes (a VQGAN's would come from its pixels)."""
  rng = np.random.default_rng([seed, int(example["index"])])
  return dict(example, image_codes=rng.integers(0, 16, CODE_GRID).astype(np.int32))


def _check_contract(f, cfg, image_shape=(48, 48, 3)):
  src_len, tgt_len = cfg.src_len, cfg.tgt_len
  expected = {
    "image": (image_shape, np.float32),
    "has_image": ((), np.int32),
    "src_tokens": ((src_len,), np.int32),
    "tgt_input": ((tgt_len,), np.int32),
    "tgt_target": ((tgt_len,), np.int32),
    "tgt_weights": ((tgt_len,), np.float32),
    "task_id": ((), np.int32),
  }
  assert set(f) == set(expected)
  for k, (shape, dtype) in expected.items():
    assert np.shape(f[k]) == shape and np.asarray(f[k]).dtype == dtype, k
  n = int(f["tgt_weights"].sum())  # target tokens incl. EOS
  assert 1 <= n <= tgt_len
  assert np.array_equal(f["tgt_weights"], (np.arange(tgt_len) < n).astype(np.float32))
  assert f["tgt_target"][n - 1] == 1 and np.all(f["tgt_target"][n:] == 0)
  assert f["tgt_input"][0] == 2 and np.array_equal(f["tgt_input"][1:n], f["tgt_target"][: n - 1])
  assert np.all(f["tgt_input"][n:] == 0)
  assert 1 not in f["tgt_target"][: n - 1].tolist()  # EOS only at the end
  src = f["src_tokens"]
  m = int((src != 0).sum())
  assert np.all(src[:m] != 0) and np.all(src[m:] == 0), "source must be right-padded"
  assert 0.0 <= f["image"].min() and f["image"].max() <= 1.0
  if f["has_image"] == 0:
    assert not f["image"].any()
  return n - 1, m


def _caption_ids(tokenizer, ex):
  return [tokenizer.encode(ex["caption_en"]), tokenizer.encode(ex["caption_zh"])]


def test_text_to_text(tokenizer):
  for i in range(40):
    ex = S.make_example(0, i)
    f = K.text_to_text(ex, tokenizer, np.random.default_rng(i), CFG)
    _check_contract(f, CFG)
    assert f["has_image"] == 0 and f["task_id"] == K.task_id("text_to_text")
    assert tokenizer.sentinel_id(0) in f["src_tokens"]
    assert span_corruption.reconstruct_from_spans(
      f["src_tokens"], f["tgt_target"], tokenizer
    ) in _caption_ids(tokenizer, ex)


def test_text_to_text_truncates_to_fit(tokenizer):
  cfg = K.TaskConfig(src_len=12, tgt_len=5, noise_density=0.3, mean_noise_span_length=2.0)
  for i in range(20):
    ex = S.make_example(0, i)
    f = K.text_to_text(ex, tokenizer, np.random.default_rng(i), cfg)
    _check_contract(f, cfg)
    original = span_corruption.reconstruct_from_spans(f["src_tokens"], f["tgt_target"], tokenizer)
    assert any(ids[: len(original)] == original for ids in _caption_ids(tokenizer, ex))
    assert len(original) >= 4  # truncated, but not more than needed


def test_image_to_text(tokenizer):
  ex = S.make_example(0, 3)
  langs = set()
  for seed in range(10):
    f = K.image_to_text(ex, tokenizer, np.random.default_rng(seed), CFG)
    n, m = _check_contract(f, CFG)
    assert m == 0 and f["has_image"] == 1
    np.testing.assert_allclose(f["image"], ex["image"] / 255.0, atol=1e-6)
    caption = tokenizer.decode(f["tgt_target"])
    assert caption in (ex["caption_en"], ex["caption_zh"])
    langs.add(caption == ex["caption_en"])
  assert langs == {True, False}, "both languages must be used"


def test_multimodal_to_text(tokenizer):
  for i in range(20):
    ex = S.make_example(0, i)
    f = K.multimodal_to_text(ex, tokenizer, np.random.default_rng(i), CFG)
    n, m = _check_contract(f, CFG)
    assert f["has_image"] == 1 and f["task_id"] == 2
    target = f["tgt_target"][:n].tolist()
    assert target in _caption_ids(tokenizer, ex)
    src = f["src_tokens"][:m].tolist()
    assert tokenizer.mask_id in src
    # the kept tokens are the target's tokens in order
    kept = [t for t in src if t != tokenizer.mask_id]
    it = iter(target)
    assert all(t in it for t in kept)


def test_vqa(tokenizer):
  ex = S.make_example(0, 5)
  for seed in range(10):
    f = K.vqa(ex, tokenizer, np.random.default_rng(seed), CFG)
    _check_contract(f, CFG)
    q, a = tokenizer.decode(f["src_tokens"]), tokenizer.decode(f["tgt_target"])
    assert {"question": q, "answer": a} in [
      {"question": x["question"], "answer": x["answer"]} for x in ex["qa"]
    ]
    assert f["task_id"] == 3 and f["has_image"] == 1


def test_text_lm_continues_a_caption(tokenizer):
  cuts = set()
  for i in range(30):
    ex = S.make_example(0, i)
    f = K.text_lm(ex, tokenizer, np.random.default_rng(i), CFG)
    n, m = _check_contract(f, CFG)
    assert f["has_image"] == 0 and f["task_id"] == K.task_id("text_lm")
    assert m >= 1 and n >= 1  # a prompt and a continuation
    whole = f["src_tokens"][:m].tolist() + f["tgt_target"][:n].tolist()
    assert whole in _caption_ids(tokenizer, ex)
    cuts.add(m)
  assert len(cuts) > 5  # the prompt length varies


def test_tasks_accept_config_dict_and_truncate(tokenizer):
  cfg = ml_collections.ConfigDict(
    dict(
      src_len=6,
      tgt_len=4,
      noise_density=0.15,
      mean_noise_span_length=3.0,
      code_offset=VOCAB,
      unrelated=1,
    )
  )
  ex = S.make_example(0, 0, image_size=30)
  ex["image_codes"] = np.array([[5, 0, 7]], np.int32)  # 3 codes + EOS fill tgt_len=4
  for name in K.names():
    f = K.get(name).build(ex, tokenizer, np.random.default_rng(0), cfg)
    _check_contract(f, cfg, image_shape=(30, 30, 3))
    assert f["task_id"] == K.task_id(name)


def test_same_rng_same_features(tokenizer):
  ex = with_codes(S.make_example(0, 9))
  for name in K.names():
    a = K.get(name).build(ex, tokenizer, np.random.default_rng(42), CFG)
    b = K.get(name).build(ex, tokenizer, np.random.default_rng(42), CFG)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_empty_features_have_zero_weight():
  f = K.empty_features((48, 48, 3), CFG)
  assert f["tgt_weights"].sum() == 0 and f["has_image"] == 0
  assert f["src_tokens"].shape == (48,) and f["image"].shape == (48, 48, 3)


def test_text_to_image_features(tokenizer):
  cfg = K.TaskConfig(src_len=48, tgt_len=16, code_offset=VOCAB, guidance_drop_rate=0.0)
  languages = set()
  for i in range(30):
    ex = with_codes(S.make_example(0, i))
    f = K.text_to_image(ex, tokenizer, np.random.default_rng(i), cfg)
    n, m = _check_contract(f, cfg)
    assert f["has_image"] == 0 and f["task_id"] == K.task_id("text_to_image")
    codes = ex["image_codes"].reshape(-1)
    assert n == codes.size == 12  # the whole grid, row-major, then EOS
    assert np.array_equal(f["tgt_target"][:n], VOCAB + codes)
    assert np.array_equal(f["tgt_input"][1 : n + 1], VOCAB + codes)
    assert f["tgt_weights"].sum() == n + 1
    captions = _caption_ids(tokenizer, ex)
    assert f["src_tokens"][:m].tolist() in captions
    languages.add(captions.index(f["src_tokens"][:m].tolist()))
  assert languages == {0, 1}  # English and Chinese captions, picked like the other tasks


def test_text_to_image_drops_captions_at_the_configured_rate(tokenizer):
  ex = with_codes(S.make_example(0, 3))
  for rate in (0.0, 0.1, 0.3):
    cfg = K.TaskConfig(src_len=48, tgt_len=16, code_offset=VOCAB, guidance_drop_rate=rate)
    feats = [K.text_to_image(ex, tokenizer, np.random.default_rng(s), cfg) for s in range(2000)]
    dropped = np.mean([not f["src_tokens"].any() for f in feats])
    assert abs(dropped - rate) < 0.03, (rate, dropped)  # 3 binomial std at 0.3 is 0.031
    # A dropped caption changes the source only: the target is the same codes.
    assert all(np.array_equal(f["tgt_target"], feats[0]["tgt_target"]) for f in feats)


def test_text_to_image_needs_codes(tokenizer):
  assert K.get("text_to_image").needs_codes and K.get("text_to_image").default_weight == 0
  assert not any(K.get(n).needs_codes for n in K.names() if n != "text_to_image")
  with pytest.raises(ValueError, match="data.image_codes_dir"):
    K.text_to_image(S.make_example(0, 0), tokenizer, np.random.default_rng(0), CFG)
