"""Tests for the grain pipeline: determinism, checkpointable state, sharding, mixing."""

import collections
import hashlib
import itertools

import numpy as np
import pytest

from m6_jax.data import pipeline as P
from m6_jax.data import synthetic as S
from m6_jax.data import tasks as K


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(batches_a, batches_b):
  return all(
    a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(batches_a, batches_b, strict=True)
  )


def _rows(batch):
  """Splits a batch into per-example dicts."""
  n = len(batch["task_id"])
  return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _row_hash(row):
  h = hashlib.sha1()
  for k in sorted(row):
    h.update(np.ascontiguousarray(row[k]).tobytes())
  return h.hexdigest()


def test_batch_shapes_and_dtypes(tokenizer, make_config):
  config = make_config()
  batch = next(P.make_iterator(config, tokenizer, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 48, 48, 3) and batch["image"].dtype == np.float32
  assert batch["src_tokens"].shape == (4, 32) and batch["src_tokens"].dtype == np.int32
  for k in ("tgt_input", "tgt_target"):
    assert batch[k].shape == (4, 32) and batch[k].dtype == np.int32
  assert batch["tgt_weights"].dtype == np.float32
  assert batch["task_id"].shape == (4,) and batch["has_image"].shape == (4,)


def test_defaults_to_jax_process_index(tokenizer, make_config):
  config = make_config()
  a = _take(P.make_iterator(config, tokenizer), 2)
  b = _take(P.make_iterator(config, tokenizer, process_index=0, process_count=1), 2)
  assert _equal(a, b)


def test_same_seed_same_batches_other_seed_other_batches(tokenizer, make_config):
  a = _take(P.make_iterator(make_config(seed=3), tokenizer, process_index=0, process_count=1), 4)
  b = _take(P.make_iterator(make_config(seed=3), tokenizer, process_index=0, process_count=1), 4)
  c = _take(P.make_iterator(make_config(seed=4), tokenizer, process_index=0, process_count=1), 4)
  assert _equal(a, b)
  assert not _equal(a, c)
  # later epochs are reshuffled and re-corrupted, not copies of the first
  it = P.make_iterator(make_config(seed=3), tokenizer, process_index=0, process_count=1)
  epoch = 24 * 3 // 4  # 3 tasks, each 24 examples per epoch, 4 per batch
  first = _take(it, epoch)
  second = _take(it, epoch)
  assert not _equal(first, second)


def test_get_state_set_state_replays_the_same_batches(tokenizer, make_config):
  config = make_config()
  it = P.make_iterator(config, tokenizer, process_index=0, process_count=1)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 4)
  # a fresh iterator (as after a restart) resumes exactly there ...
  fresh = P.make_iterator(config, tokenizer, process_index=0, process_count=1)
  fresh.set_state(state)
  assert _equal(_take(fresh, 4), expected)
  # ... and the same iterator can be rewound
  it.set_state(state)
  assert _equal(_take(it, 4), expected)


def test_processes_get_disjoint_slices_covering_each_epoch(tokenizer, make_config):
  n = 24
  config = make_config(num_train_examples=n, task_weights={"image_to_text": 1.0})
  all_images = {S.make_example(0, i)["image"].astype(np.float32).tobytes() for i in range(n)}
  assert len(all_images) == n

  def epoch_rows(process_index, epochs=1):
    it = P.make_iterator(config, tokenizer, process_index=process_index, process_count=2)
    # global batch 4 -> 2 rows per process; one epoch = n / 2 rows per process
    batches = _take(it, epochs * n // 4)
    assert batches[0]["image"].shape[0] == 2
    return [r for b in batches for r in _rows(b)]

  rows0, rows1 = epoch_rows(0), epoch_rows(1)
  images0 = {(r["image"] * 255).round().astype(np.float32).tobytes() for r in rows0}
  images1 = {(r["image"] * 255).round().astype(np.float32).tobytes() for r in rows1}
  assert len(images0) == len(images1) == n // 2, "no example twice within an epoch"
  assert not images0 & images1
  assert images0 | images1 == all_images
  # The global stream does not depend on the process count: process p of 2 holds the
  # global positions p, p + 2, ... of the single-process stream.
  single = [
    r
    for b in _take(P.make_iterator(config, tokenizer, process_index=0, process_count=1), n // 4)
    for r in _rows(b)
  ]
  interleaved = [r for pair in zip(rows0, rows1) for r in pair]
  assert [_row_hash(r) for r in single[:n]] == [_row_hash(r) for r in interleaved]


def test_task_mixture_follows_weights(tokenizer, make_config):
  config = make_config(
    task_weights={"text_to_text": 1.0, "image_to_text": 0.0, "multimodal_to_text": 2.0, "vqa": 1.0}
  )
  it = P.make_iterator(config, tokenizer, process_index=0, process_count=1)
  ids = np.concatenate([b["task_id"] for b in _take(it, 30)])
  counts = collections.Counter(K.names()[i] for i in ids)
  assert "image_to_text" not in counts
  assert counts["multimodal_to_text"] == 60 and counts["text_to_text"] == 30 and counts["vqa"] == 30


@pytest.mark.parametrize(
  "weights, match",
  [
    ({"captioning": 1.0}, "valid names are"),
    ({"text_to_text": 0.0}, "enables no task"),
    ({"text_to_text": -1.0}, ">= 0"),
  ],
)
def test_bad_task_weights(tokenizer, make_config, weights, match):
  with pytest.raises(ValueError, match=match):
    P.make_dataset(make_config(task_weights=weights), tokenizer, process_index=0, process_count=1)


def test_bad_batch_size_and_split(tokenizer, make_config):
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    P.make_dataset(make_config(batch_size=6), tokenizer, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="unknown split"):
    P.make_dataset(make_config(), tokenizer, split="dev", process_index=0, process_count=1)


def test_eval_split_is_one_padded_pass(tokenizer, make_config):
  config = make_config(num_eval_examples=7, batch_size=4)  # 3 tasks x 7 = 21 records

  def rows(split, p, count):
    return [r for b in P.make_iterator(config, tokenizer, split, p, count) for r in _rows(b)]

  single = rows("validation", 0, 1)
  assert len(single) == 24  # 21 real + 3 padding rows to fill the last batch
  real = [r for r in single if r["tgt_weights"].sum() > 0]
  assert len(real) == 21
  assert collections.Counter(int(r["task_id"]) for r in real) == {0: 7, 1: 7, 2: 7}
  # deterministic, identical across process counts, and every process gets equal batches
  assert [_row_hash(r) for r in rows("validation", 0, 1)] == [_row_hash(r) for r in single]
  r0, r1 = rows("validation", 0, 2), rows("validation", 1, 2)
  assert len(r0) == len(r1) == 12
  assert [_row_hash(r) for r in itertools.chain(*zip(r0, r1))][:21] == [
    _row_hash(r) for r in single
  ][:21]
  # validation and test differ from each other and from train
  test = rows("test", 0, 1)
  valid_images = {r["image"].tobytes() for r in real if r["has_image"]}
  test_images = {r["image"].tobytes() for r in test if r["has_image"]}
  train_batch = next(P.make_iterator(config, tokenizer, "train", 0, 1))
  train_images = {r["image"].tobytes() for r in _rows(train_batch) if r["has_image"]}
  assert valid_images and test_images and train_images
  assert not valid_images & test_images and not valid_images & train_images


def test_iterator_state_carries_over_to_another_process_count(tokenizer, make_config):
  """Batch k of every process covers global records [k*B, (k+1)*B), so a state saved with
  one process count resumes the same global stream with another (same global batch)."""
  config = make_config(batch_size=4)
  single = P.make_iterator(config, tokenizer, process_index=0, process_count=1)
  _take(single, 3)
  state = single.get_state()
  expected = [_row_hash(r) for b in _take(single, 2) for r in _rows(b)]
  halves = []
  for p in range(2):
    it = P.make_iterator(config, tokenizer, process_index=p, process_count=2)
    it.set_state(state)
    halves.append([r for b in _take(it, 2) for r in _rows(b)])
  assert [_row_hash(r) for r in itertools.chain(*zip(*halves))] == expected


def test_explicit_synthetic_source_is_the_default(tokenizer, make_config):
  a = _take(P.make_iterator(make_config(), tokenizer, process_index=0, process_count=1), 2)
  config = make_config(source="synthetic", tfds_name="ignored", data_dir="/nonexistent")
  b = _take(P.make_iterator(config, tokenizer, process_index=0, process_count=1), 2)
  assert _equal(a, b)
  with pytest.raises(ValueError, match="needs config.data.tfds_name"):
    P.make_dataset(make_config(source="tfds"), tokenizer, process_index=0, process_count=1)


# --------------------------------------------------------------------------------------
# Length bucketing and window sorting
# --------------------------------------------------------------------------------------


def _padded(batch, length=32):
  """A (possibly trimmed) batch padded back to the config's 32 / 32 text columns."""
  return P.pad_text(batch, length, length)


def _rows_padded(batches):
  return [_row_hash(r) for b in batches for r in _rows(_padded(b))]


def test_bucketed_batches_only_drop_padding_columns(tokenizer, make_config):
  plain = _take(P.make_iterator(make_config(), tokenizer, process_index=0, process_count=1), 12)
  config = make_config(length_bucket=8)
  bucketed = _take(P.make_iterator(config, tokenizer, process_index=0, process_count=1), 12)
  shapes = set()
  for full, cut in zip(plain, bucketed, strict=True):
    src, tgt = cut["src_tokens"].shape[1], cut["tgt_input"].shape[1]
    shapes.add((src, tgt))
    assert src % 8 == 0 and tgt % 8 == 0 and 8 <= src <= 32 and 8 <= tgt <= 32
    # Same records, same real content: the cut columns were padding in every row ...
    np.testing.assert_array_equal(cut["src_tokens"], full["src_tokens"][:, :src])
    assert not full["src_tokens"][:, src:].any()
    for k in P.TARGET_KEYS:
      assert cut[k].shape[1] == tgt
      np.testing.assert_array_equal(cut[k], full[k][:, :tgt])
      assert not full[k][:, tgt:].any()
    for k in ("image", "has_image", "task_id"):
      np.testing.assert_array_equal(cut[k], full[k])
    # ... and the smallest bucket that holds the longest real text.
    used_src, used_tgt = P.text_lengths(full)
    assert src == max(8, -(-used_src // 8) * 8) and tgt == max(8, -(-used_tgt // 8) * 8)
  assert any(s < 32 or t < 32 for s, t in shapes), "bucketing trimmed nothing"


def test_text_lengths_and_pad_text():
  batch = {
    "src_tokens": np.array([[5, 0, 7, 0, 0], [0, 0, 0, 0, 0]], np.int32),  # interior padding
    "tgt_input": np.array([[2, 9, 0, 0], [2, 0, 0, 0]], np.int32),
    "tgt_target": np.array([[9, 3, 0, 0], [3, 0, 0, 0]], np.int32),
    "tgt_weights": np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32),
  }
  assert P.text_lengths(batch) == (3, 2)
  assert P.text_lengths({k: v[1] for k, v in batch.items()}) == (0, 1)  # one example
  assert [P.bucketed_length(n, 4, 12) for n in (0, 1, 4, 5, 12)] == [4, 4, 4, 8, 12]
  cut = P.TrimBatch(2, 5, 4)(batch)
  assert cut["src_tokens"].shape == (2, 4) and cut["tgt_weights"].shape == (2, 2)
  back = P.pad_text(cut, 5, 4)
  for k in batch:
    np.testing.assert_array_equal(back[k], batch[k])
  with pytest.raises(ValueError, match="more than"):
    P.pad_text(batch, 4, 4)


def test_window_sort_keeps_each_window_and_makes_batches_tighter(tokenizer, make_config):
  n = 6 * 4  # 6 windows of 3 batches of 4
  plain = _take(
    P.make_iterator(make_config(length_bucket=8), tokenizer, process_index=0, process_count=1), n
  )
  config = make_config(length_bucket=8, bucket_window=3)
  it = P.make_iterator(config, tokenizer, process_index=0, process_count=1)
  sorted_ = _take(it, n)
  again = _take(P.make_iterator(config, tokenizer, process_index=0, process_count=1), n)
  assert _equal(sorted_, again), "same seed, same batches"
  other = _take(
    P.make_iterator(
      make_config(length_bucket=8, bucket_window=3, seed=1), tokenizer, "train", 0, 1
    ),
    n,
  )
  assert not _equal(sorted_, other)
  for w in range(n // 3):  # every window holds the same records, reordered
    window = slice(3 * w, 3 * w + 3)
    assert collections.Counter(_rows_padded(sorted_[window])) == collections.Counter(
      _rows_padded(plain[window])
    )
  assert _rows_padded(sorted_) != _rows_padded(plain)

  def positions(batches):
    return sum(b["src_tokens"].size + b["tgt_input"].size for b in batches)

  assert positions(sorted_) < positions(plain)


def test_window_sort_resumes_from_iterator_state(tokenizer, make_config):
  config = make_config(length_bucket=8, bucket_window=3)
  it = P.make_iterator(config, tokenizer, process_index=0, process_count=1)
  _take(it, 4)  # stop inside the second window
  state = it.get_state()
  expected = _take(it, 5)
  fresh = P.make_iterator(config, tokenizer, process_index=0, process_count=1)
  fresh.set_state(state)
  assert _equal(_take(fresh, 5), expected)


def test_window_sort_shards_are_disjoint_and_independent_of_process_count(tokenizer, make_config):
  """Sorting happens on the global stream before the per-process slice, so global batch k
  is the same records with 1 or 2 processes and the 2 processes never share a record."""
  config = make_config(length_bucket=8, bucket_window=3, num_train_examples=24)
  single = _take(P.make_iterator(config, tokenizer, process_index=0, process_count=1), 12)
  halves = [_take(P.make_iterator(config, tokenizer, "train", p, 2), 12) for p in range(2)]
  for k in range(12):
    a, b = halves[0][k], halves[1][k]
    assert a["image"].shape[0] == b["image"].shape[0] == 2
    rows0, rows1 = _rows_padded([a]), _rows_padded([b])
    assert not set(rows0) & set(rows1)
    # process p holds rows p, p + 2 of the global batch
    interleaved = [r for pair in zip(rows0, rows1) for r in pair]
    assert interleaved == _rows_padded([single[k]])
    # each process trims its own rows: never shorter than what its real text needs
    for half in (a, b):
      used = P.text_lengths(half)
      assert half["src_tokens"].shape[1] >= used[0] and half["tgt_input"].shape[1] >= used[1]


def test_pad_to_common_lengths_across_fake_processes(tokenizer, make_config):
  """Two 'processes' with differently trimmed local batches agree on the larger shapes."""
  config = make_config(length_bucket=8)
  halves = [
    next(P.make_iterator(config, tokenizer, process_index=p, process_count=2)) for p in range(2)
  ]
  halves[1] = P.pad_text(halves[1], 32, 32)  # so that the two local shapes surely differ
  lengths = [np.array([h["src_tokens"].shape[1], h["tgt_input"].shape[1]]) for h in halves]
  assert (lengths[0] < lengths[1]).any()

  def allgather_for(p):
    def allgather(local):
      np.testing.assert_array_equal(local, lengths[p])  # it sends its own lengths
      return np.stack(lengths)

    return allgather

  out = [P.pad_to_common_lengths(h, allgather_for(p)) for p, h in enumerate(halves)]
  want = np.max(lengths, axis=0)
  for p in range(2):
    assert out[p]["src_tokens"].shape[1] == want[0]
    for k in P.TARGET_KEYS:
      assert out[p][k].shape[1] == want[1]
    assert _rows_padded([out[p]]) == _rows_padded([halves[p]])  # content unchanged
