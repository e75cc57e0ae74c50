"""Tests for reading prepared user data: records, task indices, the grain pipeline on them."""

import collections
import io

import numpy as np
import pytest
from PIL import Image
from user_data import encode, small_folder, write_jsonl

from m6_jax.data import fields, readers
from m6_jax.data import pipeline as P
from m6_jax.data import prepare as PREP
from m6_jax.data import sources as SRC
from m6_jax.data import synthetic as S
from m6_jax.data import tasks as K


def _decoded(source, i):
  return SRC.decode_image(bytes(source.raw(i)["image"]), source.image_size)


def test_image_folder_records_round_trip(folder):
  train = SRC.PreparedSource(folder["out"], "user_caps", "train", image_size=48)
  assert len(train) == 14
  ids = [train.raw(i)["id"].decode() for i in range(14)]
  assert ids == [f"r{i}" for i in range(12)] + ["train.jsonl:13", "big"]  # input order
  for i, line in enumerate(folder["lines"]):
    rec = train.raw(i)
    assert rec["caption"].decode() == line.get("caption", "")
    assert rec["question"].decode() == line.get("question", "")
    assert rec["image_key"].decode() == line["image"]
  for i in range(12):
    original, path = folder["originals"][f"r{i}"]
    assert bytes(train.raw(i)["image"]) == path.read_bytes()  # small JPEG/PNG kept as is
    if path.suffix == ".png":
      np.testing.assert_array_equal(train[i]["image"], original)
    else:  # JPEG is lossy, but close
      assert np.abs(train[i]["image"].astype(int) - original).mean() < 8
  # the example format the tasks read: one caption under both languages
  ex = train[1]
  assert ex["caption_en"] == ex["caption_zh"] == folder["lines"][1]["caption"]
  assert ex["qa"] == [] and ex["image"].shape == (48, 48, 3) and ex["image"].dtype == np.uint8
  assert [q["lang"] for q in train[12]["qa"]] == ["en", "zh"]
  # the large PNG was shrunk to 64 px on its longer side, still lossless PNG
  with Image.open(io.BytesIO(bytes(train.raw(13)["image"]))) as big:
    assert big.format == "PNG" and big.size == (64, 48)
  val = SRC.PreparedSource(folder["out"], "user_caps", "validation", image_size=48)
  assert [val.raw(i)["id"].decode() for i in range(len(val))] == [f"v{i}" for i in range(100, 104)]
  np.testing.assert_array_equal(val[2]["image"], folder["originals"]["v102"][0])


@pytest.fixture
def region_field():
  """A record field registered after the `folder` dataset was prepared."""
  field = fields.register(fields.Field("region", ("region_name",)))
  yield field
  fields.unregister("region")


def test_a_field_registered_later(folder, region_field, tmp_path):
  """A dataset prepared before a field was registered has none of its records; a JSONL
  line gives a registered field's columns as plain strings."""
  train = SRC.PreparedSource(folder["out"], "user_caps", "train", image_size=48)
  assert train.field_count("region") == 0 and train.field_count("caption") == 13
  assert train[0]["region_name"] == "" and train[0]["caption_en"]
  write_jsonl(
    tmp_path / "t.jsonl",
    [
      {"image": "a.png", "region_name": "top", "caption": ["c1", "c2"]},
      {"image": "b.png", "region_name": ["top"]},
      {"image": "c.png", "caption": " "},
      {"image": "d.png"},
    ],
  )
  out = list(
    readers.iter_candidates(readers.Input(str(tmp_path / "t.jsonl")), "image_folder_jsonl")
  )
  first = readers.check_texts(out[0], 100)
  assert first == {"caption": "c1", "question": "", "answer": "", "region_name": "top"}
  assert readers.check_texts(out[1], 100)["region_name"] == ""  # stored once per image
  assert out[2].reason == "malformed_line" and "'region_name' must be a string" in out[2].detail
  with pytest.raises(readers.Reject, match="caption is empty"):
    readers.check_texts(out[3], 100)
  with pytest.raises(readers.Reject, match="no caption and no question/answer and no region_name"):
    readers.check_texts(out[4], 100)
  with pytest.raises(ValueError, match="clash"):
    fields.register(fields.Field("other_region", ("region_name",)))
  with pytest.raises(ValueError, match="unknown record fields \\['regions'\\]"):
    K.register(K.Task("by_region", K.image_to_text, needs=("regions",)))


def test_task_indices_follow_the_fields(folder):
  train = SRC.PreparedSource(folder["out"], "user_caps", "train", image_size=48)
  assert train.task_indices("vqa").tolist() == [12]
  assert train.task_indices("image_to_text").tolist() == [*range(12), 13]
  # images are resized to image_size (the 64 x 48 one is squashed to a square)
  small = SRC.PreparedSource(folder["out"], "user_caps", "train", image_size=32)
  assert small[0]["image"].shape == small[13]["image"].shape == (32, 32, 3)


def test_readable_with_plain_tfds(folder):
  import tensorflow_datasets as tfds

  builder = tfds.builder("user_caps", data_dir=folder["out"])
  assert builder.info.splits["train"].num_examples == 14
  assert builder.as_data_source("validation")[0]["id"] == b"v100"


# --------------------------------------------------------------------------------------
# The grain pipeline on a prepared dataset
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qa_dataset(tmp_path_factory):
  """24 synthetic scenes: a caption record each, and a QA record for every third one."""
  root = tmp_path_factory.mktemp("qa")
  (root / "img").mkdir()
  lines = []
  for i in range(24):
    ex = S.make_example(0, i)
    (root / f"img/{i}.png").write_bytes(encode(ex["image"], "PNG"))
    lines.append({"image": f"img/{i}.png", "caption": ex["caption_en"], "id": f"c{i}"})
    if i % 3 == 0:
      qa = ex["qa"][0]
      lines.append({"image": f"img/{i}.png", "question": qa["question"], "answer": qa["answer"]})
  write_jsonl(root / "train.jsonl", lines)
  out = str(tmp_path_factory.mktemp("qa_tfds"))
  PREP.prepare_data(
    "image_folder_jsonl", str(root / "train.jsonl"), out, "qa_caps", validation_fraction=0.25,
    print_fn=None,
  )  # fmt: skip
  return out


def _tfds_config(make_config, out, **kw):
  kw.setdefault("task_weights", {"image_to_text": 1.0, "multimodal_to_text": 1.0, "vqa": 1.0})
  kw.setdefault("tfds_name", "qa_caps")
  return make_config(source="tfds", data_dir=out, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_tfds_pipeline_batches(tokenizer, make_config, qa_dataset):
  config = _tfds_config(make_config, qa_dataset)
  it = P.make_iterator(config, tokenizer, process_index=0, process_count=1)
  batches = _take(it, 6)
  b = batches[0]
  assert b["image"].shape == (4, 48, 48, 3) and b["image"].dtype == np.float32
  for k in ("src_tokens", "tgt_input", "tgt_target"):
    assert b[k].shape == (4, 32) and b[k].dtype == np.int32
  assert b["tgt_weights"].shape == (4, 32) and b["tgt_weights"].dtype == np.float32
  assert b["task_id"].shape == (4,) and b["has_image"].shape == (4,)
  # deterministic for one seed, different for another
  again = _take(P.make_iterator(config, tokenizer, process_index=0, process_count=1), 6)
  other = _take(
    P.make_iterator(_tfds_config(make_config, qa_dataset, seed=1), tokenizer, "train", 0, 1), 6
  )
  assert _same(batches, again) and not _same(batches, other)
  # every row uses a real record: images are the dataset's, VQA rows ask its questions
  train = SRC.PreparedSource(qa_dataset, "qa_caps", "train", 48)
  images = {train[i]["image"].tobytes() for i in range(len(train))}
  questions = {train.raw(i)["question"].decode() for i in train.task_indices("vqa")}
  captions = {train.raw(i)["caption"].decode() for i in train.task_indices("image_to_text")}
  seen = collections.Counter()
  for batch in batches:
    for r in range(4):
      task = K.names()[batch["task_id"][r]]
      seen[task] += 1
      img = np.round(batch["image"][r] * 255).astype(np.uint8)
      assert img.tobytes() in images
      if task == "vqa":
        assert tokenizer.decode(batch["src_tokens"][r]) in questions
      elif task == "image_to_text":  # the caption, possibly truncated to tgt_len
        target = tokenizer.decode(batch["tgt_target"][r])
        assert any(c.startswith(target) for c in captions) and len(target) > 10
  assert set(seen) == {"image_to_text", "multimodal_to_text", "vqa"}


def test_tfds_eval_pass_covers_each_tasks_records(tokenizer, make_config, qa_dataset):
  names = ("image_to_text", "multimodal_to_text", "vqa")
  for num_eval, max_records in ((0, None), (5, 5)):  # 0: the whole split; else its head
    config = _tfds_config(make_config, qa_dataset, num_eval_examples=num_eval)
    val = SRC.PreparedSource(qa_dataset, "qa_caps", "validation", 48, max_records)
    rows = []
    for batch in P.make_iterator(config, tokenizer, "validation", 0, 1):
      rows += [int(t) for t, w in zip(batch["task_id"], batch["tgt_weights"].sum(1)) if w > 0]
    expected = {K.task_id(t): len(val.task_indices(t)) for t in names}
    assert collections.Counter(rows) == expected and all(expected.values())
  assert len(val) == 5 < len(SRC.PreparedSource(qa_dataset, "qa_caps", "validation", 48))
  with pytest.raises(ValueError, match="has no 'test' split"):
    P.make_dataset(config, tokenizer, "test", 0, 1)


def test_tfds_pipeline_errors(tokenizer, make_config, qa_dataset, tmp_path):
  path = small_folder(tmp_path, n=4)
  PREP.prepare_data("image_folder_jsonl", path, str(tmp_path / "o"), "captions_only", print_fn=None)
  config = make_config(
    source="tfds", data_dir=str(tmp_path / "o"), tfds_name="captions_only",
    task_weights={"image_to_text": 1.0, "vqa": 1.0},
  )  # fmt: skip
  with pytest.raises(ValueError, match="task 'vqa' has a positive weight but no record"):
    P.make_dataset(config, tokenizer, process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match="no prepared dataset 'nope'"):
    P.make_dataset(
      _tfds_config(make_config, qa_dataset, tfds_name="nope"), tokenizer, "train", 0, 1
    )
  with pytest.raises(ValueError, match="not one of"):
    P.make_dataset(make_config(source="parquet"), tokenizer, "train", 0, 1)


def test_iter_dataset_text(make_config, qa_dataset):
  config = _tfds_config(make_config, qa_dataset, tokenizer_corpus_examples=1000)
  texts = list(SRC.iter_dataset_text(config))
  train = SRC.PreparedSource(qa_dataset, "qa_caps", "train", 48)
  expected = [
    t
    for i in range(len(train))
    for t in (train.raw(i)[f].decode() for f in ("caption", "question", "answer"))
    if t
  ]
  assert texts == expected
  few = list(
    SRC.iter_dataset_text(_tfds_config(make_config, qa_dataset, tokenizer_corpus_examples=3))
  )
  assert 3 <= len(few) <= 9 and set(few) <= set(texts)


def test_caption_user_data_config():
  from configs import caption_user_data
  from m6_jax.config import validate

  config = caption_user_data.get_config("/data/tfds/my_caps")
  assert (config.data.source, config.data.data_dir, config.data.tfds_name) == (
    "tfds",
    "/data/tfds",
    "my_caps",
  )
  assert {k for k, w in config.data.task_weights.items() if w > 0} == {
    "image_to_text",
    "multimodal_to_text",
  }
  validate(config, num_devices=1)
  local = caption_user_data.get_config("my_caps/1.0.0,runlocal")
  assert local.data.tfds_name == "my_caps:1.0.0" and local.train.steps == 20
  validate(local, num_devices=8)
  assert caption_user_data.get_config("my_caps").data.data_dir == ""
  with pytest.raises(ValueError, match="needs the prepared dataset"):
    caption_user_data.get_config()
