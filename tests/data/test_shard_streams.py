"""The train stream of streamed shards across processes and sources: the shards of each
process, weighted mixtures of several sources, the saved state (position, bad-record counts)
and a resume on the same or another number of processes."""

import json
import threading

import grain
import numpy as np
import pytest
from etils import epath
from user_data import IMAGE_SIZE, NUM_TRAIN, write_tar

from m6_jax import config as config_lib
from m6_jax.checkpoint import data_state
from m6_jax.data import pipeline, shard_files, shard_source, streams
from m6_jax.errors import BadDataError, ConfigError
from m6_jax.train import preflight

WDS_SHARDS = 3  # the world's train split: 12 records in shards of 5, 5 and 2


def _config(make_config, shards, **data):
  config = make_config(source="shards", shards=shards, image_size=IMAGE_SIZE, **data)
  config.data.update(shuffle_buffer=4, read_threads=2, prefetch_batches=2)
  return config


def _iterator(config, tokenizer, process=(0, 1)):
  return pipeline.make_iterator(
    config, tokenizer, process_index=process[0], process_count=process[1]
  )


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def with_bad(world, tmp_path_factory):
  """The world's train tars and one of two undecodable images: 14 records, 4 shards."""
  root = tmp_path_factory.mktemp("with_bad")
  for path in shard_files.resolve(world["webdataset"]["train"]).paths:
    (root / epath.Path(path).name).symlink_to(path)
  broken = {"jpg": b"\xff\xd8\xff\xe0 not a jpeg", "txt": b"a red circle"}
  write_tar(root / "bad.tar", [("bad0", broken), ("bad1", broken)])
  return str(root / "*.tar")


def test_the_sources_of_a_mixture_and_their_errors(world, tmp_path):
  wds, par = world["webdataset"]["train"], world["parquet"]["train"]
  (a, b) = shard_files.parse_sources(f"{wds},3;{par}, 1")
  assert (a.pattern, a.weight, b.pattern, b.weight) == (wds, 3.0, par, 1.0)
  assert b.label == "data.shards source 2"
  # A comma inside braces is the pattern's; a lone pattern needs no weight.
  (c,) = shard_files.parse_sources("d/{a,b}/{0..2}.tar")
  assert (c.pattern, c.weight, c.label) == ("d/{a,b}/{0..2}.tar", 1.0, "data.shards")
  for text, words in (
    (f"{wds};{par},1", "source 1 .* has no weight"),
    (f"{wds},0;{par},1", "has weight '0'; a weight is a number > 0"),
    (f"{wds},x", "has weight 'x'"),
    (f"{wds},1;", "an empty source"),
    (f"{wds},1;{wds},2", "names .* twice"),
  ):
    with pytest.raises(ConfigError, match=words):
      shard_files.parse_sources(text)
  config = config_lib.default_config()
  config.data.update(source="shards", shards=f"{wds},1;{par}")
  with pytest.raises(ConfigError, match="data.shards source 2 .* has no weight"):
    config_lib.validate(config, 1)
  config.data.update(shards=f"{wds},1;{par},1", eval_shards=f"{wds};{par}")
  with pytest.raises(ConfigError, match="data.eval_shards=.* names several patterns"):
    config_lib.validate(config, 1)
  config.data.eval_shards = ""
  config_lib.validate(config, 1)
  preflight.check_shards(config, 3)
  config.data.shards = f"{wds},1;{tmp_path}/*.tar,1"
  with pytest.raises(ConfigError, match="data.shards source 2=.* matches no file"):
    preflight.check_shards(config, 1)
  # Every source needs a shard per process.
  config.data.shards = f"{wds},1;{world['root']}/webdataset/train/0000{{0,1}}.tar,1"
  with pytest.raises(ConfigError, match="data.shards source 2 names 2 shard.* 3 processes"):
    preflight.check_shards(config, 3)


@pytest.mark.parametrize("count", [2, 3])
def test_the_processes_read_disjoint_shards_that_cover_the_epoch(make_config, world, count):
  config = _config(make_config, world["webdataset"]["train"])
  seen = []
  for p in range(count):
    ((_, source),) = shard_source.open_train_sources(config, (p, count))
    assert len(source.paths) == len(range(p, WDS_SHARDS, count))
    order, stream = streams.task_stream(source, 0, order_seed=p, shuffle_seed=p)
    seen.append([stream[i]["id"] for i in range(len(source))])  # one epoch of this process
  ids = [i for process in seen for i in process]
  assert len(ids) == len(set(ids)) == NUM_TRAIN  # disjoint, and together the whole epoch


def test_the_selection_interleaves_as_grains_mix():
  weights = [0.7 * 1.0, 0.7 * 0.5, 0.3 * 1.0, 0.3 * 0.5]
  parts = [grain.MapDataset.range(1000 * i, 1000 * (i + 1)) for i in range(4)]
  selection = streams.WeightedSelection(weights)
  ours = grain.MapDataset.select_from_datasets(parts, selection)
  theirs = grain.MapDataset.mix(parts, weights)
  assert [ours[k] for k in range(500)] == [theirs[k] for k in range(500)]
  counts = selection.counts(500)
  assert sum(counts) == 500 and [ours[k] // 1000 for k in range(500)].count(1) == counts[1]


def test_a_mixture_of_sources_draws_by_weight_and_resumes_exactly(
  tokenizer, make_config, world, with_bad
):
  """Two sources, weights 3 and 1: their shares of the records read; the state names each
  stream's position, keeps the bad-record counts, and resumes the same batches."""
  shards = f"{world['parquet']['train']},3;{with_bad},1"
  config = _config(make_config, shards, task_weights={"image_to_text": 1.0, "vqa": 1.0})
  it = _iterator(config, tokenizer)
  for _ in range(6):
    next(it)
  state = it.get_state()
  json.dumps(state)  # grain's handler writes it as JSON
  position = state["position"]
  assert [(p["source"], p["task"]) for p in position] == [
    (world["parquet"]["train"], "image_to_text"),
    (world["parquet"]["train"], "vqa"),
    (with_bad, "image_to_text"),
    (with_bad, "vqa"),
  ]
  # Each stream's share of the records read is its source's weight times its task's (3:1, 1:1).
  shares = [3 / 8, 3 / 8, 1 / 8, 1 / 8]
  assert sum(p["records"] for p in position) == state["next_index"]
  assert all(abs(p["records"] - w * state["next_index"]) <= 1 for p, w in zip(position, shares))
  assert all(p["shard"].endswith((".parquet", ".tar")) and p["record"] >= 0 for p in position)
  counts = state["bad_records"]
  assert set(counts["bad"]) == {"corrupt_image"} and counts["read"] == state["next_index"]
  assert state["sources"][1] == {"pattern": with_bad, "weight": 1.0, "shards": 4, "records": 14}
  after = [next(it) for _ in range(2)]
  again = _iterator(config, tokenizer)
  again.set_state(state)
  assert again.bad_records.state() == counts  # the counts survive a resume
  assert all(_equal(a, b) for a, b in zip(after, [next(again) for _ in range(2)]))
  assert again.get_state()["bad_records"] == it.get_state()["bad_records"]


def test_the_reading_threads_do_not_grow_with_the_sources(tokenizer, make_config, world):
  """Three sources and two tasks (six streams) are read by data.read_threads threads."""
  folder = world["root"] / "webdataset" / "train"
  shards = ";".join(f"{folder}/0000{s}.tar,{s + 1}" for s in range(3))
  config = _config(make_config, shards, task_weights={"image_to_text": 1.0, "vqa": 1.0})
  config.data.update(read_threads=3, prefetch_batches=4)
  before = {t.ident for t in threading.enumerate()}
  it = _iterator(config, tokenizer)
  for _ in range(4):
    next(it)
  assert len(it.get_state()["position"]) == 6
  assert len({t.ident for t in threading.enumerate()} - before) <= 3


def _save(directory, states, count):
  directory.mkdir()
  for i, state in enumerate(states):
    (directory / data_state.file_name(i, count)).write_text(json.dumps(state))
  return epath.Path(directory)


def _restore(directory, it):
  return data_state.DataIteratorHandler().restore(directory, args=data_state.Restore(it))


def test_a_resume_on_another_process_count(
  tokenizer, make_config, world, with_bad, tmp_path, caplog
):
  """Streamed shards: saved by 2 processes, resumed by 1 (this test's process): its stream
  starts afresh with a new salt and both processes' bad-record counts; then it resumes on its
  own count as usual. A prepared or synthetic stream goes on with the same global batches."""
  config = _config(make_config, with_bad)
  olds = [_iterator(config, tokenizer, (p, 2)) for p in range(2)]
  for old in olds:
    for _ in range(3):
      next(old)
  states = [old.get_state() for old in olds]
  paths = [set(old.dataset.streams[0].paths) for old in olds]
  assert not paths[0] & paths[1] and all(
    s["position"][0]["shard"] in p for s, p in zip(states, paths)
  )
  directory = _save(tmp_path / "shards", states, 2)
  assert data_state.saved_files(str(directory)) == ["process_0-of-2.json", "process_1-of-2.json"]
  it = _restore(directory, _iterator(config, tokenizer))
  assert "saved by 2 process(es) and this run has 1: the shards are dealt anew" in caplog.text
  state = it.get_state()
  assert state["salt"] == 1 and state["next_index"] == 0 and state["process"] == [0, 1]
  total = sum(s["bad_records"]["read"] for s in states)
  assert it.bad_records.snapshot()[0] == total and next(it)["image"].shape[0] == 4
  resumed = it.get_state()
  again = _iterator(config, tokenizer)
  again.set_state(resumed)  # the salt rebuilds the streams: the same count resumes exactly
  assert _equal(next(it), next(again))

  # The synthetic world (as a prepared dataset): every process saved the same position, which
  # one process takes (test_pipeline.py: the global batches then go on unchanged).
  synthetic = make_config(num_train_examples=24)
  olds = [_iterator(synthetic, tokenizer, (p, 2)) for p in range(2)]
  for old in olds:
    next(old)
  directory = _save(tmp_path / "synthetic", [old.get_state() for old in olds], 2)
  assert _restore(directory, _iterator(synthetic, tokenizer)).get_state() == {"next_index": 1}


def test_records_that_feed_no_task_stop_the_stream_with_one_line(
  tokenizer, make_config, world, monkeypatch
):
  monkeypatch.setattr(streams, "MAX_DROPPED_IN_A_ROW", 30)
  config = _config(make_config, world["webdataset"]["train"], max_image_pixels=4)
  with pytest.raises(BadDataError) as e:
    next(_iterator(config, tokenizer))
  assert "30 shard records in a row fed no task (bad records 30/30 (oversized_image 30))" in str(
    e.value
  )
  assert "\n" not in str(e.value)
