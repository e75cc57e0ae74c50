"""Training on streamed shards through the command line: the world exported as WebDataset or
Parquet shards (with a few bad records beside them), a tiny run on them that reports the bad
records in its progress line and metrics.jsonl, and a pattern that names no file: one
`error:` line before anything compiles."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testing_utils import TINY_RUN

from m6_jax.data import export_world

# End to end through the command line: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow


def _add_bad_shard(folder, fmt):
  """Two records whose images cannot be decoded, in a shard of their own."""
  if fmt == "webdataset":
    with tarfile.open(folder / "bad.tar", "w") as tar:
      for key in ("bad0", "bad1"):
        for ext, data in (("jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("txt", b"a red circle")):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  else:
    table = pa.table({"png": pa.array([b"garbage", None], pa.binary()), "txt": ["a", "b"]})
    pq.write_table(table, folder / "bad.parquet")


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_train_on_exported_shards(tmp_path, run_main, tokenizer_path, fmt):
  paths = export_world.export(str(tmp_path / "world"), 16, 8, 32, "en", 0, fmt, 8)
  ext = ".tar" if fmt == "webdataset" else ".parquet"
  _add_bad_shard(tmp_path / "world" / "train", fmt)
  run = run_main(
    "--config=configs/base.py:runlocal",
    f"--workdir={tmp_path / 'work'}",
    "--config.train.steps=4",
    "--config.train.log_every=2",
    *(f"--config.{k}={v}" for k, v in TINY_RUN.items()),
    f"--config.data.tokenizer_path={tokenizer_path}",
    "--config.data.source=shards",
    f"--config.data.shards={tmp_path / 'world' / 'train' / ('*' + ext)}",
    f"--config.data.eval_shards={paths['validation']}",
    "--config.data.max_bad_fraction=0.3",
    # One task stream: its 32 records of 4 steps cover the 18 of an epoch, bad ones included.
    *(f"--config.data.task_weights.{t}=0" for t in ("vqa", "text_lm", "text_to_text")),
    "--config.data.task_weights.multimodal_to_text=0",
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert "step 4/4" in run.stderr and "image_to_text loss" in run.stdout
  assert "| bad records " in run.stderr.splitlines()[-2], run.stderr[-2000:]
  records = [json.loads(l) for l in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
  last = records[-1]
  reasons = {k[len("data_bad_") :]: v for k, v in last.items() if k.startswith("data_bad_")}
  expected = {"corrupt_image": 2} if fmt == "webdataset" else {"corrupt_image": 1, "null_bytes": 1}
  # The first epoch meets each bad record once; the next one, begun, may meet some again.
  assert reasons.keys() == expected.keys() and all(reasons[r] >= n for r, n in expected.items())
  assert last["data_records_read"] >= 18 and last["data_records_bad"] == sum(reasons.values())


def test_a_pattern_without_files_is_one_error_line_before_compiling(tmp_path, run_main):
  run = run_main(
    "--config=configs/base.py:runlocal",
    f"--workdir={tmp_path / 'work'}",
    "--config.data.source=shards",
    f"--config.data.shards={tmp_path}/shard-{{00000..00009}}.tar",
  )
  assert run.returncode == 2
  errors = [l for l in run.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "matches no file" in errors[0], run.stderr[-2000:]
  assert "Traceback" not in run.stderr and "Model parameters" not in run.stderr
