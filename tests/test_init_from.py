"""Fine-tuning takes the model of the checkpoint it starts from (m6_jax/checkpoint/init_from.py),
on checkpoints of one small array (the parameters' shapes are checked elsewhere)."""

import os

import numpy as np
import pytest

from m6_jax.checkpoint import checkpoints, init_from
from m6_jax.config import default_config
from m6_jax.errors import CheckpointError


def _save(workdir, **model):
  config = default_config()
  config.model.update(model)
  config.data.src_len = 24
  ckpts = checkpoints.Checkpoints(checkpoints.checkpoint_dir(str(workdir)), async_save=False)
  ckpts.save(1, config=config, tokenizer=None, params={"w": np.zeros(2, np.float32)})
  ckpts.wait()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  path = tmp_path_factory.mktemp("pretrained")
  _save(path, vocab_size=2048, num_layers=1, dropout_rate=0.0)
  return str(path)


def _finetune(init):
  config = default_config()
  config.init_from = init
  config.data.task_weights.vqa = 1.0
  config.model.dropout_rate = 0.1
  return config


def test_the_model_is_the_checkpoints_but_for_the_command_lines_keys(pretrained, tmp_path):
  config = _finetune(pretrained)
  start = init_from.model_of_checkpoint(config, str(tmp_path / "ft"))
  assert (start.config.model.vocab_size, start.config.model.num_layers) == (2048, 1)
  assert start.config.model.dropout_rate == 0.0 and start.config.data.src_len == 24
  assert start.config.data.task_weights.vqa == 1.0 and start.kept == {}  # not a model key
  assert config.model.vocab_size == 1024  # the caller's config is left as it was

  explicit = {"model.vocab_size", "model.dropout_rate", "train.lr"}
  config.model.vocab_size = 1024
  start = init_from.model_of_checkpoint(config, str(tmp_path / "ft"), explicit)
  assert (start.config.model.vocab_size, start.config.model.dropout_rate) == (1024, 0.1)
  assert start.config.model.num_layers == 1
  assert start.kept == {"model.vocab_size": (1024, 2048), "model.dropout_rate": (0.1, 0.0)}
  shape = CheckpointError("checkpoint X does not fit this config: parameter 'a' has shape")
  message = str(init_from.explain_shape_error(shape, start.kept))
  assert "--config.model.vocab_size=1024 (the checkpoint's: 2048)" in message
  other = CheckpointError("tokenizer mismatch")
  assert init_from.explain_shape_error(other, start.kept) is other


def test_a_resumed_finetune_takes_its_own_checkpoints_model(pretrained, tmp_path):
  _save(tmp_path / "ft", vocab_size=4096, num_layers=2)
  start = init_from.model_of_checkpoint(_finetune(pretrained), str(tmp_path / "ft"))
  assert (start.config.model.vocab_size, start.config.model.num_layers) == (4096, 2)
  missing = _finetune(str(tmp_path / "gone"))  # init_from moved away since the first start
  assert init_from.model_of_checkpoint(missing, str(tmp_path / "ft")).config.model.num_layers == 2


def test_without_init_from_or_of_another_family_nothing_changes(pretrained, tmp_path):
  config = default_config()
  assert init_from.model_of_checkpoint(config, str(tmp_path)).config is config
  config = _finetune(pretrained)
  config.model.family = "vqgan"
  assert init_from.model_of_checkpoint(config, str(tmp_path)).config is config
  with pytest.raises(CheckpointError, match="no checkpoint in"):
    init_from.model_of_checkpoint(_finetune(os.path.join(str(tmp_path), "none")), str(tmp_path))


def test_a_checkpoint_saved_before_patch_norm_is_fine_tuned_without_it(tmp_path):
  config = default_config()
  del config.model["patch_norm"]  # a config written before the key existed
  ckpts = checkpoints.Checkpoints(
    checkpoints.checkpoint_dir(str(tmp_path / "old")), async_save=False
  )
  ckpts.save(1, config=config, tokenizer=None, params={"w": np.zeros(2, np.float32)})
  ckpts.wait()
  start = init_from.model_of_checkpoint(_finetune(str(tmp_path / "old")), str(tmp_path / "ft"))
  assert start.config.model.patch_norm is False
