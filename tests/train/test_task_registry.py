"""Adding a task is one registry entry plus its example function: a toy task registered here,
and nowhere else, gets a config weight, user-data field checks, a task id and a logged loss,
and trains."""

import json
import os

import numpy as np
import pytest

from m6_jax import config as config_lib
from m6_jax.data import tasks


def first_words(example, tokenizer, rng, cfg):
  """Image -> the first three words of the English caption (a toy captioning task)."""
  words = " ".join(example["caption_en"].split()[:3])
  ids = tokenizer.encode(words)[: int(cfg.tgt_len) - 1]
  image = example["image"]
  return tasks.make_features(image, image.shape, [], ids, "first_words", tokenizer, cfg)


@pytest.fixture
def toy_task():
  task = tasks.register(tasks.Task("first_words", first_words, ("caption",), default_weight=0.5))
  yield task
  tasks.unregister("first_words")


@pytest.mark.slow
def test_a_registered_task_is_configured_and_trained(toy_task, tmp_path):
  from m6_jax.train import loop

  assert tasks.names()[-1] == "first_words"
  assert tasks.task_id("first_words") == len(tasks.names()) - 1
  config = config_lib.default_config()
  assert config.data.task_weights.first_words == 0.5  # the registry's default weight
  for name in ("text_to_text", "image_to_text", "multimodal_to_text"):
    config.data.task_weights[name] = 0.0
  config.model.vocab_size, config.model.d_model, config.model.num_layers = 512, 32, 1
  config.model.num_heads, config.model.head_dim, config.model.mlp_dim = 2, 16, 64
  config.data.batch_size, config.data.num_train_examples = 8, 32
  config.data.tokenizer_corpus_examples = 300
  config.train.steps, config.train.log_every = 2, 1
  result = loop.train(config, str(tmp_path))
  assert result.final_step == 2
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert all(np.isfinite(r["first_words_loss"]) for r in rows)
  assert not any("image_to_text_loss" in r for r in rows)  # only the toy task ran


def test_registry_checks_and_unregistering(toy_task):
  with pytest.raises(ValueError, match="new identifier"):
    tasks.register(tasks.Task("first_words", first_words))
  with pytest.raises(ValueError, match="unknown record fields"):
    tasks.register(tasks.Task("bad_fields", first_words, ("pixels",)))
  with pytest.raises(ValueError, match="eval_kind 'bleu' but no generation"):
    tasks.register(tasks.Task("bad_kind", first_words, eval_kind="bleu"))
  tasks.unregister("first_words")
  assert "first_words" not in config_lib.default_config().data.task_weights
  with pytest.raises(config_lib.ConfigError, match="Unknown config key 'data.task_weights.first"):
    config = config_lib.default_config()
    config.data.task_weights.first_words = 1.0
    config_lib.validate(config, 8)
  tasks.register(toy_task)  # for the fixture's clean-up


def test_an_unknown_eval_kind_is_named_when_evaluation_looks_it_up():
  from m6_jax.errors import EvaluationError
  from m6_jax.evaluation import eval_kinds

  tasks.register(tasks.Task("bad_kind", first_words, eval_kind="bleu", generation=tasks.CAPTIONING))
  try:
    with pytest.raises(EvaluationError, match="task 'bad_kind' .*unknown eval kind 'bleu'"):
      eval_kinds.of_tasks()
  finally:
    tasks.unregister("bad_kind")
  assert "bad_kind" not in tasks.names() and "caption" in eval_kinds.of_tasks()
