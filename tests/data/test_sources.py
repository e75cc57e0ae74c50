"""Tests for user data -> TFDS (array_record) -> grain: formats, bad records, atomicity."""

import base64
import collections
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from m6_jax.data import pipeline as P
from m6_jax.data import sources as SRC
from m6_jax.data import synthetic as S
from m6_jax.data import tasks as K

MAX_CHARS = 200


def _encode(array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def _write_jsonl(path, lines):
  """``lines``: dicts (written as JSON) or raw bytes (written as they are)."""
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode())
      f.write(b"\n")


def _decoded(source, i):
  return SRC.decode_image(bytes(source.raw(i)["image"]), source.image_size)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """An image folder + JSONL with 14 good records (8 PNG, 4 JPEG, 1 QA-only, 1 large PNG)
  followed by one record of each kind of bad input."""
  root = tmp_path_factory.mktemp("folder")
  (root / "img").mkdir()
  good, lines, originals = [], [], {}
  for i in range(12):
    ex = S.make_example(0, i)
    fmt = "PNG" if i % 3 else "JPEG"
    rel = f"img/{i}.{fmt.lower()}"
    (root / rel).write_bytes(_encode(ex["image"], fmt))
    originals[f"r{i}"] = (ex["image"], root / rel)
    lines.append({"image": rel, "caption": ex["caption_en"] if i % 2 else ex["caption_zh"]})
    lines[-1]["id"] = f"r{i}"
    good.append(lines[-1])
  # QA only (no caption), reusing image 1; id defaults to "<file>:<line>"
  qa = S.make_example(0, 1)["qa"][0]
  lines.append({"image": "img/1.png", "question": qa["question"], "answer": qa["answer"]})
  # A large PNG (96 x 72): shrunk to max_image_size=64 and re-encoded as PNG
  big = np.asarray(Image.fromarray(S.make_example(0, 99, image_size=96)["image"]).resize((96, 72)))
  (root / "img/big.png").write_bytes(_encode(big, "PNG"))
  lines.append({"image": "img/big.png", "caption": "a big picture", "id": "big"})
  jpeg = (root / "img/0.jpeg").read_bytes()
  (root / "img/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
  # 80%: the header is whole, so verify() passes and only the full decode finds the cut
  (root / "img/truncated.jpeg").write_bytes(jpeg[: len(jpeg) * 4 // 5])
  bad = [
    {"image": "img/corrupt.png", "caption": "corrupt bytes", "id": "bad_corrupt"},
    {"image": "img/truncated.jpeg", "caption": "truncated file", "id": "bad_truncated"},
    {"image": "img/nope.png", "caption": "missing file", "id": "bad_missing"},
    {"image": "img/2.png", "caption": "   ", "id": "bad_empty"},
    {"image": "img/2.png", "caption": "x" * (MAX_CHARS + 1), "id": "bad_long"},
    b'{"image": "img/2.png", "caption": "caf\xe9 latin-1", "id": "bad_encoding"}',
    b'{"image": "img/2.png", "caption": "no closing brace"',
    {"image": "img/3.png", "caption": "same id as r3", "id": "r3"},
    {"image": "img/3.png", "question": "a question without answer?", "id": "bad_qa"},
    {"caption": "no image field", "id": "bad_noimage"},
  ]
  _write_jsonl(root / "train.jsonl", lines + bad)
  # a separate validation file (relative to the same folder)
  val = []
  for i in range(100, 104):
    ex = S.make_example(0, i)
    rel = f"img/{i}.png"
    (root / rel).write_bytes(_encode(ex["image"], "PNG"))
    val.append({"image": rel, "caption": ex["caption_en"], "id": f"v{i}"})
    originals[f"v{i}"] = (ex["image"], root / rel)
  _write_jsonl(root / "validation.jsonl", val + [b"not json at all"])
  out = tmp_path_factory.mktemp("tfds")
  summary = SRC.prepare_data(
    "image_folder_jsonl",
    f"train={root / 'train.jsonl'},validation={root / 'validation.jsonl'}",
    str(out),
    "user_caps",
    max_text_chars=MAX_CHARS,
    max_image_size=64,
    max_rejected_fraction=0.5,
    progress_every=5,
    print_fn=None,
  )
  return dict(root=root, out=str(out), summary=summary, lines=lines, originals=originals)


def test_image_folder_counts_every_kind_of_bad_record(folder):
  s = folder["summary"]
  assert s.written == {"train": 14, "validation": 4}
  assert s.splits["train"].rejected == collections.Counter(
    corrupt_image=2, missing_image=1, empty_text=2, text_too_long=1, bad_encoding=1,
    malformed_line=2, duplicate_id=1,
  )  # fmt: skip
  assert s.splits["validation"].rejected == collections.Counter(malformed_line=1)
  assert s.splits["train"].read == 14 + 10 and s.splits["validation"].read == 5
  text = s.format()
  assert "corrupt_image" in text and "duplicate_id" in text and "user_caps" in text
  assert "tensorflow" not in sys.modules  # prepared (and read below) without TensorFlow


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


def _muge(root, image_ids, extra_tsv=()):
  tsv = [f"{k}\t{base64.b64encode(_encode(S.make_example(1, k)['image'], 'PNG')).decode()}"
         for k in image_ids]  # fmt: skip
  (root / "IC_train.tsv").write_text("\n".join(tsv + list(extra_tsv)) + "\n")


def test_muge_tsv_with_hash_split(tmp_path):
  ids = list(range(40))
  _muge(
    tmp_path,
    ids,
    extra_tsv=[
      "900\t!!!not base64!!!",
      f"901\t{base64.b64encode(b'not an image').decode()}",
      "a line without a tab",
      f"5\t{base64.b64encode(b'duplicate image id').decode()}",
    ],
  )
  lines = [{"image_id": k, "text": [f"商品 {k} 标题", f"item {k} caption"]} for k in ids[:30]]
  lines += [{"text_id": 7000 + k, "text": f"query {k}", "image_ids": [k]} for k in ids[30:]]
  lines += [
    {"image_id": 900, "text": "bad base64"},
    {"image_id": 901, "text": "not an image"},
    {"image_id": 999, "text": "unknown image id"},
    {"id": 3, "caption": "by id", "question": "q?", "answer": "a"},
  ]
  _write_jsonl(tmp_path / "IC_train.jsonl", lines)
  out = str(tmp_path / "tfds")
  summary = SRC.prepare_data(
    "muge_tsv", str(tmp_path), out, "muge_caps", validation_fraction=0.3,
    max_rejected_fraction=0.3, print_fn=None,
  )  # fmt: skip
  rejected = summary.rejected
  assert rejected == collections.Counter(
    bad_base64=1, corrupt_image=1, missing_image=1, malformed_line=1, duplicate_id=1
  )
  # 30 images x 2 captions + 10 retrieval texts + 1 QA record
  assert sum(summary.written.values()) == 71
  records = {}
  for split in ("train", "validation"):
    src = SRC.PreparedSource(out, "muge_caps", split, image_size=48)
    for i in range(len(src)):
      r = src.raw(i)
      records[r["id"].decode()] = (split, r["image_key"].decode(), r["caption"].decode())
      key = r["image_key"].decode()
      want = "validation" if SRC.validation_share(key) < 0.3 else "train"
      assert split == want, f"{key} should be in {want}"
      np.testing.assert_array_equal(src[i]["image"], S.make_example(1, int(key))["image"])
  assert 0 < summary.written["validation"] < summary.written["train"]
  assert records["IC_train.jsonl:1#0"][2] == "商品 0 标题"
  assert records["IC_train.jsonl:1#1"][:2] == records["IC_train.jsonl:1#0"][:2]  # same split
  assert records["7031"] == (records["7031"][0], "31", "query 31")
  assert records["IC_train.jsonl:44"][1] == "3"  # "id" names the image when alone


def test_resolve_inputs(tmp_path):
  for name in ("IC_train.jsonl", "IC_valid.jsonl", "IC_train.tsv", "IC_valid.tsv", "x.txt"):
    (tmp_path / name).write_text("")
  found = SRC.resolve_inputs("muge_tsv", str(tmp_path))
  assert found == {
    "train": SRC._Input(str(tmp_path / "IC_train.jsonl"), str(tmp_path / "IC_train.tsv")),
    "validation": SRC._Input(str(tmp_path / "IC_valid.jsonl"), str(tmp_path / "IC_valid.tsv")),
  }
  paired = SRC.resolve_inputs("muge_tsv", f"dev={tmp_path / 'IC_train.jsonl'}+{tmp_path / 'x.txt'}")
  assert paired == {
    "validation": SRC._Input(str(tmp_path / "IC_train.jsonl"), str(tmp_path / "x.txt"))
  }
  (tmp_path / "more_train.jsonl").write_text("")
  with pytest.raises(SRC.DataPreparationError, match="several train files"):
    SRC.resolve_inputs("image_folder_jsonl", str(tmp_path))
  with pytest.raises(SRC.DataPreparationError, match="unknown split 'tran'"):
    SRC.resolve_inputs("image_folder_jsonl", f"tran={tmp_path / 'IC_train.jsonl'}")
  with pytest.raises(SRC.DataPreparationError, match="does not exist"):
    SRC.resolve_inputs("image_folder_jsonl", str(tmp_path / "nope.jsonl"))
  with pytest.raises(SRC.DataPreparationError, match="unknown input_format"):
    SRC.resolve_inputs("coco", str(tmp_path))


def _small_folder(root, n=10, bad=0):
  (root / "img").mkdir(exist_ok=True)
  lines = []
  for i in range(n):
    (root / f"img/{i}.png").write_bytes(_encode(S.make_example(2, i)["image"], "PNG"))
    lines.append({"image": f"img/{i}.png", "caption": f"caption {i}", "id": f"s{i}"})
  lines += [{"image": "img/missing.png", "caption": "gone", "id": f"m{k}"} for k in range(bad)]
  _write_jsonl(root / "data.jsonl", lines)
  return str(root / "data.jsonl")


def _leftovers(out, name):
  root = os.path.join(out, name)
  return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_too_many_rejections_stop_with_a_clear_error_and_leave_nothing(tmp_path, caplog):
  path = _small_folder(tmp_path, n=10, bad=3)  # 3 of 13 = 23% rejected
  out = str(tmp_path / "tfds")
  with pytest.raises(SRC.DataPreparationError) as e:
    SRC.prepare_data("image_folder_jsonl", path, out, "strict", log_limit=2, print_fn=None)
  skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped")]
  assert skipped[0].startswith(f"Skipped {path}:11 (id m0): missing_image: cannot read")
  assert len(skipped) == 2  # log_limit per reason; all 3 are counted
  assert any("counted but not logged" in r.getMessage() for r in caplog.records)
  message = str(e.value)
  assert "3 of 13 records rejected" in message and "max_rejected_fraction=0.1" in message
  assert "missing_image" in message
  assert _leftovers(out, "strict") == []  # no version folder, no incomplete folder
  with pytest.raises(FileNotFoundError, match="no prepared dataset 'strict'"):
    SRC.open_builder(out, "strict")
  summary = SRC.prepare_data(
    "image_folder_jsonl", path, out, "strict", max_rejected_fraction=0.25, print_fn=None
  )
  assert summary.written == {"train": 10}


def test_interrupted_preparation_leaves_no_complete_dataset(tmp_path, monkeypatch):
  path = _small_folder(tmp_path, n=10)
  out = str(tmp_path / "tfds")
  real, calls = SRC.process_image, []

  def interrupting(data, max_size):
    calls.append(1)
    if len(calls) == 6:
      raise KeyboardInterrupt
    return real(data, max_size)

  monkeypatch.setattr(SRC, "process_image", interrupting)
  with pytest.raises(KeyboardInterrupt):
    SRC.prepare_data("image_folder_jsonl", path, out, "interrupted", print_fn=None)
  assert _leftovers(out, "interrupted") == []
  # a run killed outright leaves its temporary folder behind: never read, removed on rerun
  stale = os.path.join(out, "interrupted", "incomplete.ABC123_1.0.0")
  os.makedirs(stale)
  open(os.path.join(stale, "dataset_info.json"), "w").close()
  with pytest.raises(FileNotFoundError):
    SRC.open_builder(out, "interrupted")
  monkeypatch.setattr(SRC, "process_image", real)
  assert (
    SRC.prepare_data("image_folder_jsonl", path, out, "interrupted", print_fn=None).written["train"]
    == 10
  )
  assert _leftovers(out, "interrupted") == ["1.0.0"]
  # an existing dataset is only replaced on request
  with pytest.raises(SRC.DataPreparationError, match="already exists; pass overwrite=True"):
    SRC.prepare_data("image_folder_jsonl", path, out, "interrupted", print_fn=None)
  path = _small_folder(tmp_path, n=7)
  summary = SRC.prepare_data(
    "image_folder_jsonl", path, out, "interrupted", overwrite=True, print_fn=None
  )
  assert summary.written == {"train": 7}
  assert len(SRC.PreparedSource(out, "interrupted", "train", 48)) == 7
  # a failed rebuild puts the previous dataset back
  path = _small_folder(tmp_path, n=3, bad=3)
  with pytest.raises(SRC.DataPreparationError, match="max_rejected_fraction"):
    SRC.prepare_data("image_folder_jsonl", path, out, "interrupted", overwrite=True, print_fn=None)
  assert _leftovers(out, "interrupted") == ["1.0.0"]
  assert len(SRC.PreparedSource(out, "interrupted", "train", 48)) == 7


def test_bad_arguments(tmp_path):
  path = _small_folder(tmp_path, n=3)
  with pytest.raises(SRC.DataPreparationError, match="lower_snake_case"):
    SRC.prepare_data("image_folder_jsonl", path, str(tmp_path), "My-Data")
  with pytest.raises(SRC.DataPreparationError, match="TFDS catalogue dataset"):
    SRC.prepare_data("image_folder_jsonl", path, str(tmp_path), "mnist")
  with pytest.raises(SRC.DataPreparationError, match="one or the other"):
    SRC.prepare_data(
      "image_folder_jsonl",
      f"train={path},validation={path}",
      str(tmp_path),
      "x",
      validation_fraction=0.1,
    )
  with pytest.raises(SRC.DataPreparationError, match="'validation' has no valid record"):
    SRC.prepare_data(
      "image_folder_jsonl", path, str(tmp_path), "x", validation_fraction=1e-9, print_fn=None
    )


def test_works_without_tensorflow(tmp_path):
  """Prepare and read in a fresh process where `import tensorflow` fails."""
  path = _small_folder(tmp_path, n=4)
  code = f"""
import sys

import importlib.machinery

class HideTensorFlow(importlib.machinery.PathFinder):  # as if tensorflow were not installed
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      return None
    return super().find_spec(name, path, target)

sys.meta_path = [
  HideTensorFlow if f is importlib.machinery.PathFinder else f for f in sys.meta_path
]
import importlib.util
assert importlib.util.find_spec("tensorflow") is None
from m6_jax.data import sources
s = sources.prepare_data("image_folder_jsonl", {path!r}, {str(tmp_path / "o")!r}, "no_tf",
                         print_fn=None)
src = sources.PreparedSource({str(tmp_path / "o")!r}, "no_tf", "train", 48)
print(s.written["train"], src[3]["caption_en"], src[3]["image"].shape)
print("tensorflow" in sys.modules)
"""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-2:] == ["4 caption 3 (48, 48, 3)", "False"]


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
    (root / f"img/{i}.png").write_bytes(_encode(ex["image"], "PNG"))
    lines.append({"image": f"img/{i}.png", "caption": ex["caption_en"], "id": f"c{i}"})
    if i % 3 == 0:
      qa = ex["qa"][0]
      lines.append({"image": f"img/{i}.png", "question": qa["question"], "answer": qa["answer"]})
  _write_jsonl(root / "train.jsonl", lines)
  out = str(tmp_path_factory.mktemp("qa_tfds"))
  SRC.prepare_data(
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
      task = K.TASK_NAMES[batch["task_id"][r]]
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
    expected = {K.TASK_NAMES.index(t): len(val.task_indices(t)) for t in names}
    assert collections.Counter(rows) == expected and all(expected.values())
  assert len(val) == 5 < len(SRC.PreparedSource(qa_dataset, "qa_caps", "validation", 48))
  with pytest.raises(ValueError, match="has no 'test' split"):
    P.make_dataset(config, tokenizer, "test", 0, 1)


def test_tfds_pipeline_errors(tokenizer, make_config, qa_dataset, tmp_path):
  path = _small_folder(tmp_path, n=4)
  SRC.prepare_data("image_folder_jsonl", path, str(tmp_path / "o"), "captions_only", print_fn=None)
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


def test_same_dataset_for_any_number_of_workers(folder, tmp_path):
  out = str(tmp_path / "one_worker")
  summary = SRC.prepare_data(
    "image_folder_jsonl",
    f"train={folder['root'] / 'train.jsonl'},validation={folder['root'] / 'validation.jsonl'}",
    out,
    "user_caps",
    max_text_chars=MAX_CHARS,
    max_image_size=64,
    max_rejected_fraction=0.5,
    num_workers=1,
    print_fn=None,
  )
  assert summary.splits == folder["summary"].splits
  for split in ("train", "validation"):
    a = SRC.PreparedSource(folder["out"], "user_caps", split, 48)
    b = SRC.PreparedSource(out, "user_caps", split, 48)
    assert len(a) == len(b) and all(a.raw(i) == b.raw(i) for i in range(len(a)))
