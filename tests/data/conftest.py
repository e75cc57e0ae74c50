"""Shared fixtures for the data tests: one tokenizer per session, a small data config."""

import ml_collections
import pytest

from m6_jax.data import tokenizer as tokenizer_lib

# The base config's settings: vocab_size 1000 on ~2000 synthetic scenes (trains in < 1 s).
VOCAB_SIZE = 1000
CORPUS_EXAMPLES = 2000


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
