"""bfloat16 compute (float32 params, loss and softmax) with scan + remat still learns."""

import jax.numpy as jnp
import pytest

from m6_jax.train import loop


@pytest.mark.slow
def test_bfloat16_scanned_remat_training_learns(tiny_config, tokenizer_path, tmp_path):
  c = tiny_config
  c.data.tokenizer_path = tokenizer_path
  c.data.src_len, c.data.tgt_len, c.data.num_train_examples = 16, 16, 512
  c.model.dtype, c.model.scan_layers, c.model.remat_policy = "bfloat16", True, "dots_saveable"
  c.train.steps, c.train.lr, c.train.log_every, c.train.checkpoint_every = 40, 3e-3, 10, 1000
  c.mesh.data = 2
  result = loop.train(c, str(tmp_path / "run"))
  assert result.state.params["layers"]["layer_0"]["mlp"]["wi"]["kernel"].dtype == jnp.float32
  first, last = result.first_metrics["loss"], result.last_metrics["loss"]
  assert last < 0.5 * first, (first, last)
