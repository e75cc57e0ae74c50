"""Streamed shards: the writer's layout, shard lists and their errors, the WebDataset and
Parquet readers, bad records by reason, and the train stream (tasks, state)."""

import itertools
import json
import os
import pickle
import tarfile
import threading

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from user_data import IMAGE_SIZE, NUM_TRAIN, NUM_VALIDATION, encode, write_tar

from m6_jax import config as config_lib
from m6_jax.data import (
  bad_records,
  export_world,
  pipeline,
  prepare_shards,
  shard_files,
  shard_source,
  streams,
  webdataset,
)
from m6_jax.data import synthetic as S
from m6_jax.errors import BadDataError, ConfigError
from m6_jax.train import preflight


def _source(pattern, **kwargs):
  return shard_source.ShardSource(shard_files.resolve(pattern), IMAGE_SIZE, **kwargs)


# -- the writer ------------------------------------------------------------------------


def test_webdataset_layout_is_img2datasets(world):
  folder = world["root"] / "webdataset" / "train"
  assert sorted(os.listdir(folder)) == [
    f"{s:05d}{ext}" for s in range(3) for ext in (".parquet", ".tar", "_stats.json")
  ]
  with tarfile.open(folder / "00000.tar") as tar:
    names = tar.getnames()
    meta = json.loads(tar.extractfile("000000.json").read())
    caption = tar.extractfile("000000.txt").read().decode()
  assert names[:3] == ["000000.png", "000000.txt", "000000.json"] and len(names) == 15
  assert caption == S.make_example(0, S.split_index("train", 0))["caption_zh"]
  assert meta["image_key"] == "images/train/0.png" and meta["question"] and meta["answer"]
  assert json.loads((folder / "00002_stats.json").read_text())["count"] == 2
  assert pq.read_table(folder / "00000.parquet").column("key").to_pylist()[1] == "000001"
  assert world["webdataset"]["train"].endswith("train/{00000..00002}.tar")


def test_shards_hold_the_bytes_of_the_files_export_and_the_conversion_writes_them(world, tmp_path):
  png = (world["root"] / "files" / "images" / "train" / "3.png").read_bytes()
  with tarfile.open(world["root"] / "webdataset" / "train" / "00000.tar") as tar:
    assert tar.extractfile("000003.png").read() == png
  table = pq.read_table(world["root"] / "parquet" / "train" / "00000.parquet")
  assert table.column("png").to_pylist()[3] == png
  # The image folder + JSONL -> WebDataset conversion keeps the bytes and the texts.
  summary = prepare_shards.prepare_shards(
    "image_folder_jsonl", str(world["root"] / "files"), str(tmp_path), "conv", shard_size=5,
    print_fn=None,
  )  # fmt: skip
  assert summary.written == {"train": NUM_TRAIN, "validation": NUM_VALIDATION}
  converted = _source(str(tmp_path / "conv" / "train" / "*.tar"))
  exported = _source(world["webdataset"]["train"])
  for i in (0, 7):
    a, b = converted[i], exported[i]
    assert np.array_equal(a["image"], b["image"]) and a["caption_zh"] == b["caption_zh"]
    assert a["qa"] == b["qa"] and converted.raw(i)["image_key"] == f"images/train/{i}.png"
  with pytest.raises(ValueError, match="already exists"):
    prepare_shards.prepare_shards(
      "image_folder_jsonl", str(world["root"] / "files"), str(tmp_path), "conv", print_fn=None
    )


def test_jpeg_files_and_shards_hold_the_same_bytes(tmp_path):
  files = export_world.export(str(tmp_path / "f"), 3, 1, 32, "en", 0, "files", image_format="jpg")
  shards = export_world.export(
    str(tmp_path / "w"), 3, 1, 32, "en", 0, "webdataset", image_format="jpg"
  )
  line = json.loads(open(files["train"]).readline())
  jpeg = (tmp_path / "f" / line["image"]).read_bytes()
  assert line["image"] == "images/train/0.jpg" and jpeg[:2] == b"\xff\xd8"
  with tarfile.open(shard_files.resolve(shards["train"]).paths[0]) as tar:
    first = tar.getnames()[0]
    assert first.endswith(".jpg") and tar.extractfile(first).read() == jpeg


# -- shard lists -------------------------------------------------------------------------


def test_brace_ranges_and_lists():
  assert shard_files.expand_braces("d/{00008..00010}.tar") == [
    "d/00008.tar",
    "d/00009.tar",
    "d/00010.tar",
  ]
  assert shard_files.expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
  with pytest.raises(ConfigError, match="counts down"):
    shard_files.expand_braces("{3..1}")


def test_shard_lists_and_their_errors(world, tmp_path):
  wds = world["root"] / "webdataset" / "train"
  assert len(shard_files.resolve(str(wds / "0000{0..2}.tar")).paths) == 3
  assert shard_files.resolve(world["parquet"]["train"]).format == "parquet"
  with pytest.raises(ConfigError, match="matches no file"):
    shard_files.resolve(str(tmp_path / "nothing-*.tar"))
  with pytest.raises(ConfigError, match=r"3 parquet .* 3 webdataset"):
    shard_files.resolve(str(wds / "0000?.*"))
  with pytest.raises(ConfigError, match="other"):
    shard_files.resolve(str(wds / "*"))  # the _stats.json files
  with pytest.raises(ConfigError, match="not parquet shards"):
    shard_files.resolve(str(wds / "0000?.*"), "parquet")
  shards = shard_files.resolve(str(wds / "*.tar"))
  assert shards.for_process(1, 2, "data.shards").paths == shards.paths[1::2]
  with pytest.raises(ConfigError, match="3 shard.*4 processes"):
    shards.for_process(0, 4, "data.shards")


def test_preflight_and_config_checks(world, tmp_path):
  config = config_lib.default_config()
  config.data.source = "shards"
  with pytest.raises(ConfigError, match="needs data.shards"):
    config_lib.validate(config, 1)
  config.data.shards = world["webdataset"]["train"]
  config_lib.validate(config, 1)
  preflight.check_shards(config, 3)
  with pytest.raises(ConfigError, match="4 processes"):
    preflight.check_shards(config, 4)
  config.data.eval_shards = str(tmp_path / "*.tar")
  with pytest.raises(ConfigError, match="data.eval_shards=.* matches no file"):
    preflight.check_shards(config, 1)
  for key, value, words in (
    ("shard_format", "tar", "data.shard_format"),
    ("max_bad_fraction", 1.5, "data.max_bad_fraction"),
    ("bucket_window", 2, "data.bucket_window"),
  ):
    bad = config_lib.default_config()
    bad.data.update(source="shards", shards="x.tar", length_bucket=16, **{key: value})
    with pytest.raises(ConfigError, match=words):
      config_lib.validate(bad, 1)


# -- readers -----------------------------------------------------------------------------


def test_webdataset_and_parquet_records_are_the_worlds(world):
  wds, par = _source(world["webdataset"]["train"]), _source(world["parquet"]["train"])
  assert len(wds) == len(par) == NUM_TRAIN and list(wds.shard_sizes) == [5, 5, 2]
  for i in (0, 6, 11):
    a, b = wds[i], par[i]
    ex = S.make_example(0, S.split_index("train", i), IMAGE_SIZE)
    assert np.array_equal(a["image"], b["image"])
    assert np.abs(a["image"].astype(int) - ex["image"].astype(int)).mean() < 1  # PNG of 64 px
    assert a["caption_zh"] == b["caption_zh"] == ex["caption_zh"] == a["caption_en"]
    assert a["qa"] == b["qa"] and a["record_fields"] == ("caption", "qa")
  assert wds.field_count("qa") == NUM_TRAIN and len(par.task_indices("vqa")) == NUM_TRAIN
  assert wds.raw(6)["image_key"] == par.raw(6)["image_key"] == "images/train/6.png"


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
  png = encode(S.make_example(0, 1, IMAGE_SIZE)["image"], "PNG")
  jpeg = encode(S.make_example(0, 2, 64)["image"], "JPEG")
  big = encode(np.zeros((80, 80, 3), np.uint8), "PNG")
  txt = "a small red circle".encode()
  write_tar(
    tmp_path / "a.tar",
    [
      ("good", {"png": png, "txt": txt}),
      ("qa_only", {"png": png, "json": b'{"question": "what?", "answer": "red"}'}),
      ("corrupt", {"jpg": jpeg[: len(jpeg) // 2], "txt": txt}),
      ("nocaption", {"png": png, "json": b'{"status": "success"}'}),
      ("oversized", {"png": big, "txt": txt}),
      ("noimage", {"txt": txt}),
      ("badjson", {"png": png, "txt": txt, "json": b"{not json"}),
      ("latin1", {"png": png, "txt": "caf\xe9".encode("latin-1")}),
      ("cut", {"png": png, "txt": txt}),
    ],
    cut=1500,  # into the last sample's image
  )
  rows = {"key": ["p0", "p1"], "jpg": [png, None], "txt": ["a caption", "another"]}
  table = pa.table(
    rows, schema=pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("txt", pa.string())])
  )
  pq.write_table(table, tmp_path / "a.parquet")

  tars = _source(str(tmp_path / "a.tar"), max_image_pixels=70 * 70)
  got = [tars[i] for i in range(len(tars))]
  assert [g is not None for g in got] == [True, True] + [False] * 7
  assert got[1]["record_fields"] == ("qa",) and got[1]["caption_en"] == ""
  read, bad = tars.bad.snapshot()
  assert read == 9 and bad == {
    "corrupt_image": 1,
    "missing_caption": 1,
    "oversized_image": 1,
    "missing_image": 1,
    "bad_text": 2,
    "truncated_tar": 1,
  }
  assert "bad records 7/9 (bad_text 2, corrupt_image 1" in tars.bad.summary()
  assert tars.bad.metrics()["data_bad_bad_text"] == 2.0
  assert set(bad) <= set(bad_records.REASONS)

  par = _source(str(tmp_path / "a.parquet"))
  assert par[0] is not None and par[1] is None
  assert par.bad.snapshot() == (2, {"null_bytes": 1})
  # Shards of one pattern may differ in their optional columns (key, question, answer).
  qa = {"jpg": [png], "txt": [""], "question": ["what?"], "answer": ["red"]}
  pq.write_table(pa.table(qa), tmp_path / "b.parquet")
  both = _source(str(tmp_path / "*.parquet"))
  assert both[2]["qa"][0]["answer"] == "red" and both[2]["record_fields"] == ("qa",)
  assert both.raw(0)["id"] == "p0" and both.raw(2)["id"] == "0"
  with pytest.raises(ConfigError, match="no caption column .*'key', 'jpg'"):
    shard_source.ShardSource(
      shard_files.resolve(str(tmp_path / "a.parquet")), 32, text_column="caption"
    )


def test_more_bad_records_than_the_limit_stop_with_one_line():
  counts = bad_records.BadRecords()
  for i in range(bad_records.MIN_RECORDS - 1):
    counts.count(bad_records.Skip("corrupt_image", "x") if i % 2 else None, f"s.tar record {i}")
  counts.check(0.1)  # too few records read to judge
  counts.count(bad_records.Skip("corrupt_image", "cannot read"), "s.tar record 99")
  with pytest.raises(BadDataError) as e:
    counts.check(0.1)
  assert "50 of the 100 shard records read are bad (50.0%)" in str(e.value)
  assert "\n" not in str(e.value) and "s.tar record 1: x" in str(e.value)
  counts.check(0.5)


# -- the train stream --------------------------------------------------------------------


def _stream_config(make_config, world, fmt="webdataset", **data):
  config = make_config(source="shards", shards=world[fmt]["train"], image_size=IMAGE_SIZE, **data)
  config.data.update(shuffle_buffer=4, read_threads=2, prefetch_batches=2)
  return config


def test_stream_batches_resume_and_count(tokenizer, make_config, world):
  config = _stream_config(make_config, world)
  it = pipeline.make_iterator(config, tokenizer, process_index=0, process_count=1)
  first = [next(it) for _ in range(3)]
  assert first[0]["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
  state = it.get_state()
  after = [next(it) for _ in range(2)]
  again = pipeline.make_iterator(config, tokenizer, process_index=0, process_count=1)
  again.set_state(state)
  for a, b in zip(after, [next(again) for _ in range(2)]):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert it.bad_records.snapshot()[0] > 0 and it.bad_records.snapshot()[1] == {}
  # Process 1 of 2 reads the second shard alone.
  other = pipeline.make_iterator(config, tokenizer, process_index=1, process_count=2)
  assert next(other)["image"].shape[0] == 2


def test_a_task_takes_only_the_records_with_its_fields(tokenizer, make_config, tmp_path):
  png = encode(S.make_example(0, 1, IMAGE_SIZE)["image"], "PNG")
  qa = json.dumps({"question": "what colour?", "answer": "red"}).encode()
  write_tar(
    tmp_path / "mixed.tar",
    [(f"c{i}", {"png": png, "txt": b"a caption"}) for i in range(6)]
    + [(f"q{i}", {"png": png, "json": qa}) for i in range(2)],
  )
  weights = {"vqa": 1.0}
  config = make_config(source="shards", shards=str(tmp_path / "mixed.tar"), task_weights=weights)
  config.data.update(image_size=IMAGE_SIZE, shuffle_buffer=0)
  batch = next(pipeline.make_iterator(config, tokenizer, process_index=0, process_count=1))
  assert set(batch["task_id"]) == {pipeline.tasks.task_id("vqa")}
  targets = {tokenizer.decode([t for t in row if t > 3]) for row in batch["tgt_target"]}
  assert targets == {"red"}


def test_shard_order_visits_every_record_once_per_epoch_shard_by_shard():
  order = streams.ShardOrder(grain.MapDataset.range(8), [3, 1, 4], seed=5)
  epochs = [[order[e * 8 + i] for i in range(8)] for e in range(4)]
  shards = [[0, 1, 2], [3], [4, 5, 6, 7]]  # each shard's records in file order, shard by shard
  concatenations = [sum(p, []) for p in itertools.permutations(shards)]
  assert all(e in concatenations for e in epochs) and len({tuple(e) for e in epochs}) > 1


def test_eval_split_of_shards(tokenizer, make_config, world):
  config = _stream_config(make_config, world, "parquet", eval_shards=world["parquet"]["validation"])
  it = pipeline.make_iterator(config, tokenizer, "validation", process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape[0] == 4 and np.any(batch["tgt_weights"] > 0)


def _open_descriptors() -> int:
  return len(os.listdir("/proc/self/fd"))


def test_the_reader_keeps_a_bounded_number_of_files_open(tmp_path):
  paths = []
  for s in range(6):
    paths.append(str(tmp_path / f"{s}.tar"))
    with open(paths[-1], "wb") as f:
      f.write(bytes([s]) * 64 + bytes(range(64)))
  before = _open_descriptors()
  reader = webdataset.Reader(max_open=2)
  for s in itertools.chain(range(6), range(6)):
    assert reader.read(paths[s], 60, 8) == bytes([s]) * 4 + bytes(range(4))
    assert reader.open_files <= 2 and _open_descriptors() <= before + 2
  # A file evicted while a read is in progress stays open for that read, then closes.
  started, resume = threading.Event(), threading.Event()
  real_read = webdataset._Open.read

  def slow_read(entry, offset, size):
    if entry.readers and not started.is_set():
      started.set()
      resume.wait(10)
    return real_read(entry, offset, size)

  webdataset._Open.read = slow_read
  try:
    out = []
    slow = threading.Thread(target=lambda: out.append(reader.read(paths[0], 0, 4)))
    slow.start()
    assert started.wait(10)
    for s in range(1, 6):
      reader.read(paths[s], 0, 4)  # evicts the file the slow read holds
    assert _open_descriptors() <= before + 3
    resume.set()
    slow.join(10)
  finally:
    webdataset._Open.read = real_read
  assert out == [bytes([0]) * 4] and _open_descriptors() <= before + 2
  reader.close()
  assert reader.open_files == 0 and _open_descriptors() == before
  copy = pickle.loads(pickle.dumps(reader))
  assert copy.max_open == 2 and copy.read(paths[5], 64, 2) == bytes(range(2))
  copy.close()
