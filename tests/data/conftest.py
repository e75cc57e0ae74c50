"""Shared fixtures for the data tests: one tokenizer per session, a small data config, the
world as files and shards, and a prepared dataset of user images and captions."""

import ml_collections
import numpy as np
import pytest
from PIL import Image
from user_data import (
  IMAGE_SIZE,
  MAX_CHARS,
  NUM_TRAIN,
  NUM_VALIDATION,
  SHARD_SIZE,
  encode,
  write_jsonl,
)

from m6_jax.data import export_world
from m6_jax.data import prepare as PREP
from m6_jax.data import synthetic as S
from m6_jax.data import tokenizer as tokenizer_lib

# The base config's settings: vocab_size 1000 on ~2000 synthetic scenes (trains in < 1 s).
VOCAB_SIZE = 1000
CORPUS_EXAMPLES = 2000


@pytest.fixture(scope="session")
def world(tmp_path_factory):
  """The world as files, WebDataset shards and Parquet shards (12 train, 4 validation)."""
  root = tmp_path_factory.mktemp("world")
  out = {}
  for fmt in ("files", "webdataset", "parquet"):
    out[fmt] = export_world.export(
      str(root / fmt), NUM_TRAIN, NUM_VALIDATION, IMAGE_SIZE, "zh", 0, fmt, SHARD_SIZE
    )
  out["root"] = root
  return out


@pytest.fixture(scope="session")
def tokenizer_workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("workdir"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_workdir):
  return tokenizer_lib.get_or_train_tokenizer(
    tokenizer_workdir, vocab_size=VOCAB_SIZE, seed=0, num_corpus_examples=CORPUS_EXAMPLES
  )


def _make_config(**data_overrides) -> ml_collections.ConfigDict:
  """A small config with the fields the data pipeline reads."""
  data = dict(
    batch_size=4,
    src_len=32,
    tgt_len=32,
    image_size=48,
    num_train_examples=24,
    num_eval_examples=6,
    task_weights={"text_to_text": 1.0, "image_to_text": 1.0, "multimodal_to_text": 1.0},
    noise_density=0.15,
    mean_noise_span_length=3.0,
  )
  seed = data_overrides.pop("seed", 0)
  data.update(data_overrides)
  return ml_collections.ConfigDict({"seed": seed, "data": data})


@pytest.fixture
def make_config():
  """Factory: make_config(seed=..., **data_fields) -> ConfigDict."""
  return _make_config


@pytest.fixture(scope="session")
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
    (root / rel).write_bytes(encode(ex["image"], fmt))
    originals[f"r{i}"] = (ex["image"], root / rel)
    lines.append({"image": rel, "caption": ex["caption_en"] if i % 2 else ex["caption_zh"]})
    lines[-1]["id"] = f"r{i}"
    good.append(lines[-1])
  # QA only (no caption), reusing image 1; id defaults to "<file>:<line>"
  qa = S.make_example(0, 1)["qa"][0]
  lines.append({"image": "img/1.png", "question": qa["question"], "answer": qa["answer"]})
  # A large PNG (96 x 72): shrunk to max_image_size=64 and re-encoded as PNG
  big = np.asarray(Image.fromarray(S.make_example(0, 99, image_size=96)["image"]).resize((96, 72)))
  (root / "img/big.png").write_bytes(encode(big, "PNG"))
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
    lines[2],  # the same line twice
  ]
  write_jsonl(root / "train.jsonl", lines + bad)
  # a separate validation file (relative to the same folder)
  val = []
  for i in range(100, 104):
    ex = S.make_example(0, i)
    rel = f"img/{i}.png"
    (root / rel).write_bytes(encode(ex["image"], "PNG"))
    val.append({"image": rel, "caption": ex["caption_en"], "id": f"v{i}"})
    originals[f"v{i}"] = (ex["image"], root / rel)
  write_jsonl(root / "validation.jsonl", val + [b"not json at all"])
  out = tmp_path_factory.mktemp("tfds")
  summary = PREP.prepare_data(
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
