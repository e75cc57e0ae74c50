"""Tests for user data -> TFDS (array_record): formats, bad records, atomicity."""

import base64
import collections
import os
import subprocess
import sys

import numpy as np
import pytest
from user_data import MAX_CHARS, encode, small_folder, write_jsonl

from m6_jax.data import image_files, readers
from m6_jax.data import prepare as PREP
from m6_jax.data import sources as SRC
from m6_jax.data import synthetic as S


def test_image_folder_counts_every_kind_of_bad_record(folder):
  s = folder["summary"]
  assert s.written == {"train": 14, "validation": 4}
  assert s.splits["train"].rejected == collections.Counter(
    corrupt_image=2, missing_image=1, empty_text=2, text_too_long=1, bad_encoding=1,
    malformed_line=2, duplicate_id=1, duplicate_record=1,
  )  # fmt: skip
  assert s.splits["validation"].rejected == collections.Counter(malformed_line=1)
  assert s.splits["train"].read == 14 + 11 and s.splits["validation"].read == 5
  # Per registered task, the records that have what it needs (13 captions, 1 question).
  assert s.task_records["image_to_text"] == {"train": 13, "validation": 4}
  assert s.task_records["vqa"] == {"train": 1, "validation": 0}
  text = s.format()
  assert "corrupt_image" in text and "duplicate_id" in text and "user_caps" in text
  assert "records each task can use" in text and "vqa" in text
  assert "tensorflow" not in sys.modules  # prepared (and read below) without TensorFlow


def _urlsafe_png(k):
  """Image k as MUGE stores it: URL-safe base64 ('-', '_'), here without '=' padding."""
  return base64.urlsafe_b64encode(encode(S.make_example(1, k)["image"], "PNG")).decode().rstrip("=")


def _muge(root, image_ids, extra_tsv=()):
  tsv = [f"{k}\t{_urlsafe_png(k)}" for k in image_ids]
  assert any("-" in t or "_" in t for t in tsv)  # the URL-safe alphabet is exercised
  (root / "IC_train.tsv").write_text("\n".join(tsv + list(extra_tsv)) + "\n")


def test_muge_text_to_image_tsv_pairs(tmp_path):
  """MUGE's text-to-image layout: T2I_<split>.text.tsv (<image id>\\t<text>) beside
  T2I_<split>.img.tsv (URL-safe base64), found by split in a folder."""
  for split, ids in (("train", range(12)), ("val", range(12, 16))):
    texts = [f"{k:032x}\t男女童纯棉短裤{k}号" for k in ids]  # MUGE ids are hex digests
    (tmp_path / f"T2I_{split}.img.tsv").write_text(
      "".join(f"{k:032x}\t{_urlsafe_png(k)}\n" for k in ids)
    )
    (tmp_path / f"T2I_{split}.text.tsv").write_text("\n".join(texts) + "\n")
  out = str(tmp_path / "tfds")
  summary = PREP.prepare_data("muge_tsv", str(tmp_path), out, "muge_t2i", print_fn=None)
  assert summary.written == {"train": 12, "validation": 4} and not summary.rejected
  src = SRC.PreparedSource(out, "muge_t2i", "validation", image_size=48)
  r = src.raw(1)
  assert (r["image_key"].decode(), r["caption"].decode()) == (f"{13:032x}", "男女童纯棉短裤13号")
  np.testing.assert_array_equal(src[1]["image"], S.make_example(1, 13)["image"])


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
  write_jsonl(tmp_path / "IC_train.jsonl", lines)
  out = str(tmp_path / "tfds")
  summary = PREP.prepare_data(
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
      want = "validation" if readers.validation_share(key) < 0.3 else "train"
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
  found = readers.resolve_inputs("muge_tsv", str(tmp_path))
  assert found == {
    "train": readers.Input(str(tmp_path / "IC_train.jsonl"), str(tmp_path / "IC_train.tsv")),
    "validation": readers.Input(str(tmp_path / "IC_valid.jsonl"), str(tmp_path / "IC_valid.tsv")),
  }
  paired = readers.resolve_inputs(
    "muge_tsv", f"dev={tmp_path / 'IC_train.jsonl'}+{tmp_path / 'x.txt'}"
  )
  assert paired == {
    "validation": readers.Input(str(tmp_path / "IC_train.jsonl"), str(tmp_path / "x.txt"))
  }
  (tmp_path / "more_train.jsonl").write_text("")
  with pytest.raises(PREP.DataPreparationError, match="several train files"):
    readers.resolve_inputs("image_folder_jsonl", str(tmp_path))
  with pytest.raises(PREP.DataPreparationError, match="unknown split 'tran'"):
    readers.resolve_inputs("image_folder_jsonl", f"tran={tmp_path / 'IC_train.jsonl'}")
  with pytest.raises(PREP.DataPreparationError, match="does not exist"):
    readers.resolve_inputs("image_folder_jsonl", str(tmp_path / "nope.jsonl"))
  with pytest.raises(PREP.DataPreparationError, match="unknown input_format"):
    readers.resolve_inputs("coco", str(tmp_path))


def _leftovers(out, name):
  root = os.path.join(out, name)
  return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_too_many_rejections_stop_with_a_clear_error_and_leave_nothing(tmp_path, caplog):
  path = small_folder(tmp_path, n=10, bad=3)  # 3 of 13 = 23% rejected
  out = str(tmp_path / "tfds")
  with pytest.raises(PREP.DataPreparationError) as e:
    PREP.prepare_data("image_folder_jsonl", path, out, "strict", log_limit=2, print_fn=None)
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
  summary = PREP.prepare_data(
    "image_folder_jsonl", path, out, "strict", max_rejected_fraction=0.25, print_fn=None
  )
  assert summary.written == {"train": 10}


def test_interrupted_preparation_leaves_no_complete_dataset(tmp_path, monkeypatch):
  path = small_folder(tmp_path, n=10)
  out = str(tmp_path / "tfds")
  real, calls = PREP.process_image, []

  def interrupting(data, max_size):
    calls.append(1)
    if len(calls) == 6:
      raise KeyboardInterrupt
    return real(data, max_size)

  monkeypatch.setattr(PREP, "process_image", interrupting)
  with pytest.raises(KeyboardInterrupt):
    PREP.prepare_data("image_folder_jsonl", path, out, "interrupted", print_fn=None)
  assert _leftovers(out, "interrupted") == []
  # a run killed outright leaves its temporary folder behind: never read, removed on rerun
  stale = os.path.join(out, "interrupted", "incomplete.ABC123_1.0.0")
  os.makedirs(stale)
  open(os.path.join(stale, "dataset_info.json"), "w").close()
  with pytest.raises(FileNotFoundError, match="'interrupted' .* is not complete: a conversion was"):
    SRC.open_builder(out, "interrupted")
  with pytest.raises(FileNotFoundError, match=r"complete datasets there: none\)"):
    SRC.open_builder(out, "other")  # the interrupted one is not listed as a dataset
  monkeypatch.setattr(PREP, "process_image", real)
  assert (
    PREP.prepare_data("image_folder_jsonl", path, out, "interrupted", print_fn=None).written[
      "train"
    ]
    == 10
  )
  assert _leftovers(out, "interrupted") == ["1.0.0"]
  # an existing dataset is only replaced on request
  with pytest.raises(PREP.DataPreparationError, match="already exists; pass overwrite=True"):
    PREP.prepare_data("image_folder_jsonl", path, out, "interrupted", print_fn=None)
  path = small_folder(tmp_path, n=7)
  summary = PREP.prepare_data(
    "image_folder_jsonl", path, out, "interrupted", overwrite=True, print_fn=None
  )
  assert summary.written == {"train": 7}
  assert len(SRC.PreparedSource(out, "interrupted", "train", 48)) == 7
  # a failed rebuild puts the previous dataset back
  path = small_folder(tmp_path, n=3, bad=3)
  with pytest.raises(PREP.DataPreparationError, match="max_rejected_fraction"):
    PREP.prepare_data("image_folder_jsonl", path, out, "interrupted", overwrite=True, print_fn=None)
  assert _leftovers(out, "interrupted") == ["1.0.0"]
  assert len(SRC.PreparedSource(out, "interrupted", "train", 48)) == 7


def test_bad_arguments(tmp_path):
  path = small_folder(tmp_path, n=3)
  with pytest.raises(PREP.DataPreparationError, match="lower_snake_case"):
    PREP.prepare_data("image_folder_jsonl", path, str(tmp_path), "My-Data")
  with pytest.raises(PREP.DataPreparationError, match="TFDS catalogue dataset"):
    PREP.prepare_data("image_folder_jsonl", path, str(tmp_path), "mnist")
  with pytest.raises(PREP.DataPreparationError, match="one or the other"):
    PREP.prepare_data(
      "image_folder_jsonl",
      f"train={path},validation={path}",
      str(tmp_path),
      "x",
      validation_fraction=0.1,
    )
  with pytest.raises(PREP.DataPreparationError, match="'validation' has no valid record"):
    PREP.prepare_data(
      "image_folder_jsonl", path, str(tmp_path), "x", validation_fraction=1e-9, print_fn=None
    )


def test_works_without_tensorflow(tmp_path):
  """Prepare and read in a fresh process where `import tensorflow` fails."""
  path = small_folder(tmp_path, n=4)
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
from m6_jax.data import prepare, sources
s = prepare.prepare_data("image_folder_jsonl", {path!r}, {str(tmp_path / "o")!r}, "no_tf",
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


def test_same_dataset_for_any_number_of_workers(folder, tmp_path):
  out = str(tmp_path / "one_worker")
  summary = PREP.prepare_data(
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


def test_reference_answers_and_line_errors(tmp_path):
  """Several answers per question (VQA-style) give one record per answer, sharing the
  question; a malformed JSON line's reason reads well."""
  write_jsonl(
    tmp_path / "train.jsonl",
    [
      {"image": "a.png", "question": "color?", "answers": [{"answer": "red"}, {"answer": "red"}]},
      {"image": "b.png", "caption": ["c1", "c2", "c3"], "question": "shape?", "answer": ["x", "y"]},
      b'{"image": "c.png", "caption": "unterminated}',
    ],
  )
  out = list(
    readers.iter_candidates(readers.Input(str(tmp_path / "train.jsonl")), "image_folder_jsonl")
  )
  rows = [(c.record_id, *(c.texts[k] for k in ("caption", "question", "answer"))) for c in out[:5]]
  assert rows == [
    ("train.jsonl:1#0", None, "color?", "red"),
    ("train.jsonl:1#1", None, "color?", "red"),
    ("train.jsonl:2#0", "c1", "shape?", "x"),
    ("train.jsonl:2#1", "c2", "shape?", "y"),
    ("train.jsonl:2#2", "c3", None, None),
  ]
  assert len({c.content_key for c in out[:5]}) == 5
  assert out[5].reason == "malformed_line"
  assert out[5].detail == "invalid JSON: Unterminated string starting at column 31"
  assert image_files.decode_base64(b"-_8") == base64.b64decode(b"+/8=")


def test_the_exported_world_converts_whole(tmp_path):
  """The user-data recipe (docs/your_data.md) starts from --mode=export_world's files."""
  from m6_jax.data import export_world

  paths = export_world.export(str(tmp_path / "files"), 6, 2, image_size=32)
  assert sorted(paths) == ["train", "validation"]
  out = str(tmp_path / "tfds")
  summary = PREP.prepare_data(
    "image_folder_jsonl", str(tmp_path / "files"), out, "world", print_fn=None
  )
  assert summary.written == {"train": 6, "validation": 2} and not summary.rejected
  record = SRC.PreparedSource(out, "world", "validation", image_size=32).raw(1)
  ex = S.make_example(0, S.split_index("validation", 1), 32)
  assert record["caption"].decode() == ex["caption_zh"]
  zh = {(q["question"], q["answer"]) for q in ex["qa"] if q["lang"] == "zh"}
  assert (record["question"].decode(), record["answer"].decode()) in zh
  again = export_world.export(str(tmp_path / "again"), 6, 2, image_size=32)
  assert open(again["train"]).read() == open(paths["train"]).read()  # deterministic
