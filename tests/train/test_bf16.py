"""bfloat16 compute (float32 params, loss and softmax) with scan + remat still learns."""

import jax.numpy as jnp

from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.train import loop


def test_bfloat16_scanned_remat_training_learns(tiny_config, tmp_path):
  tokenizer_lib.get_or_train_tokenizer(
    str(tmp_path / "tok"), vocab_size=512, seed=0, num_corpus_examples=300
  )
  c = tiny_config
  c.data.tokenizer_path = str(tmp_path / "tok" / "tokenizer" / "spm.model")
  c.data.src_len, c.data.tgt_len, c.data.num_train_examples = 16, 16, 512
  c.model.dtype, c.model.scan_layers, c.model.remat_policy = "bfloat16", True, "dots_saveable"
  c.train.steps, c.train.lr, c.train.log_every, c.train.checkpoint_every = 40, 3e-3, 10, 1000
  c.mesh.data = 2
  result = loop.train(c, str(tmp_path / "run"))
  assert result.state.params["layers"]["layer_0"]["mlp"]["wi"]["kernel"].dtype == jnp.float32
  first, last = result.first_metrics["loss"], result.last_metrics["loss"]
  assert last < 0.5 * first, (first, last)
