"""A batch with its trailing padding columns removed means the same as the padded batch:
same logits on the kept target positions, same loss (what length bucketing relies on)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6_jax.data import tasks
from m6_jax.model import loss as loss_lib
from m6_jax.model import moe as moe_lib
from m6_jax.model.m6 import M6, M6Config, dummy_batch

SRC, TGT = 5, 4  # kept columns of src_len 12 / tgt_len 10


def _padded_batch(random_batch, config):
  """A random batch whose text ends by column SRC / TGT in every row (padding after)."""
  batch = random_batch(4, config, seed=1)
  batch["src_tokens"][:, SRC:] = 0
  for k in ("tgt_input", "tgt_target", "tgt_weights"):
    batch[k][:, TGT:] = 0
  assert batch["src_tokens"][:, SRC - 1].any() and batch["tgt_weights"][:, TGT - 1].any()
  return batch


def _trim(batch):
  out = dict(batch, src_tokens=batch["src_tokens"][:, :SRC])
  out.update({k: batch[k][:, :TGT] for k in ("tgt_input", "tgt_target", "tgt_weights")})
  return out


def _init(config):
  model = M6(M6Config.from_config(config))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), dummy_batch(model.config))["params"]
  return model, nn.unbox(params)


def _logits_and_losses(model, params, batch):
  """(logits [b, Lt, V], mean token loss, per-task loss sums), jitted (one compile per shape)."""

  @jax.jit
  def run(params, batch):
    logits = model.apply(
      {"params": params},
      batch,
      mutable=[moe_lib.AUX_LOSS_COLLECTION, moe_lib.METRICS_COLLECTION],
    )[0]
    weights = batch["tgt_weights"]
    losses = loss_lib.token_losses(logits, batch["tgt_target"], 0.0) * weights
    task_losses = jax.nn.one_hot(batch["task_id"], len(tasks.names())).T @ losses.sum(axis=1)
    return logits, losses.sum() / weights.sum(), task_losses

  logits, loss, task_losses = run(params, jax.tree.map(jnp.asarray, batch))
  return np.asarray(logits), float(loss), np.asarray(task_losses)


@pytest.mark.parametrize("variant", ["dense", "scan", "moe_no_drop"])
def test_trimmed_batch_gives_the_padded_batch_logits_and_loss(tiny_config, random_batch, variant):
  c = tiny_config
  if variant == "scan":
    c.model.scan_layers = True
  if variant == "moe_no_drop":  # capacity that never binds: the token count does not matter
    c.model.moe_num_experts, c.model.moe_every = 4, 2
    c.model.moe_capacity_factor = c.model.moe_eval_capacity_factor = 4.0
  model, params = _init(c)
  padded = _padded_batch(random_batch, c)
  logits_full, loss_full, tasks_full = _logits_and_losses(model, params, padded)
  logits_cut, loss_cut, tasks_cut = _logits_and_losses(model, params, _trim(padded))
  assert logits_cut.shape == (4, TGT, c.model.vocab_size)
  np.testing.assert_allclose(logits_cut, logits_full[:, :TGT], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss_cut, loss_full, rtol=1e-6)
  np.testing.assert_allclose(tasks_cut, tasks_full, rtol=1e-5)
  assert np.isfinite(loss_full) and loss_full > 0


def test_kv_cache_decoding_with_a_trimmed_source(tiny_config, random_batch):
  """encode_prefix / decode_step on a trimmed source give the padded source's logits."""
  model, params = _init(tiny_config)
  padded = _padded_batch(random_batch, tiny_config)
  tokens = jnp.asarray(padded["tgt_input"])
  encode = jax.jit(lambda b: model.apply({"params": params}, b, method="encode_prefix"))
  step = jax.jit(lambda c, t, p: model.apply({"params": params}, c, t, p, method="decode_step"))

  def decode(batch):
    cache = encode(jax.tree.map(jnp.asarray, batch))
    out = []
    for pos in range(TGT):
      logits, cache = step(cache, tokens[:, pos], pos)
      out.append(np.asarray(logits))
    return np.stack(out, axis=1)

  cut = decode(_trim(padded))
  np.testing.assert_allclose(cut, decode(padded), rtol=1e-5, atol=1e-5)
  teacher = _logits_and_losses(model, params, _trim(padded))[0]
  np.testing.assert_allclose(cut, teacher, rtol=1e-4, atol=1e-4)


def test_too_long_text_is_refused(tiny_config):
  model = M6(M6Config.from_config(tiny_config))
  batch = dummy_batch(model.config)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)["params"]
  long = dict(batch, src_tokens=jnp.zeros((1, tiny_config.data.src_len + 1), jnp.int32))
  with pytest.raises(ValueError, match="src_len=12"):
    jax.eval_shape(model.apply, {"params": nn.unbox(params)}, long)
