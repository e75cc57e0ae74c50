"""model.architecture="encoder_decoder": a bidirectional encoder over [image ; source] and a
causal decoder with cross-attention over the target, behind the unified model's interface
(same batch, logits, loss, KV-cached decoding, scan / remat / MoE, trimmed batches)."""

import copy
import functools
import importlib
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import init_model, model_and_batch, moe_objective

from m6_jax import config as config_lib
from m6_jax.config import ConfigError, validate
from m6_jax.infer import decoding
from m6_jax.model import param_count
from m6_jax.model.m6 import M6, M6Config, dummy_batch
from m6_jax.model.moe import AUX_LOSS_COLLECTION, METRICS_COLLECTION

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

BOS = 2


def _encdec(config, encoder=2, decoder=2):
  config.model.architecture = "encoder_decoder"
  config.model.num_encoder_layers, config.model.num_decoder_layers = encoder, decoder
  return config


def _no_prefix_row(batch):
  """Row 0 without image and source: its cross-attention has no key to attend to."""
  batch = jax.tree.map(np.array, batch)
  batch["has_image"][0], batch["image"][0], batch["src_tokens"][0] = 0, 0.0, 0
  return jax.tree.map(jnp.asarray, batch)


def test_parameters_are_two_stacks_with_cross_attention_in_the_decoder(tiny_config):
  cfg = M6Config.from_config(_encdec(tiny_config, encoder=1, decoder=3))
  boxed = jax.eval_shape(M6(cfg).init, jax.random.PRNGKey(0), dummy_batch(cfg))["params"]
  assert {k for k in boxed if "layer" in k} == {
    "encoder_layer_0",
    "decoder_layer_0",
    "decoder_layer_1",
    "decoder_layer_2",
  }
  assert "cross_attention" not in boxed["encoder_layer_0"] and "encoder_norm" in boxed
  cross = boxed["decoder_layer_2"]["cross_attention"]
  assert cross["query"].names == ("embed", "heads", "kv")
  assert cross["key"].value.shape == (64, 4, 16)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)  # every parameter has axis names


def test_cached_decoding_matches_teacher_forcing(tiny_config, random_batch):
  """encode_prefix once, then decode_step per position == __call__ at that position; two
  query rows per example share one cross-attention cache row (as beams do). With scanned
  stacks (the unrolled ones: the trimmed-batch test below)."""
  tiny_config.model.scan_layers = True
  model, params, batch = model_and_batch(_encdec(tiny_config), random_batch)
  batch = _no_prefix_row(batch)
  variables = {"params": params}
  full = np.asarray(jax.jit(model.apply)(variables, batch))
  cache = jax.jit(functools.partial(model.apply, method=M6.encode_prefix))(variables, batch)
  cfg = model.config
  assert len(cache.prefix.layers) == len(cache.target.layers) == 2  # per decoder layer
  # The cross-attention keys cover the encoder positions: image patches + source.
  assert cache.prefix.layers[0].key.shape == (4, cfg.num_patches + cfg.src_len, 4, 16)
  cache = cache.replace(target=jax.tree.map(lambda x: jnp.repeat(x, 2, 0), cache.target))
  step = jax.jit(lambda c, tok, t: model.apply(variables, c, tok, t, method=M6.decode_step))
  for t in range(cfg.tgt_len):
    logits, cache = step(cache, jnp.repeat(batch["tgt_input"][:, t], 2), t)
    logits = np.asarray(logits).reshape(4, 2, -1)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0, err_msg=f"t={t}")
    np.testing.assert_array_equal(logits[:, 0], logits[:, 1])


def test_decoder_is_causal_and_the_encoder_never_sees_the_target(tiny_config, random_batch):
  model, params, batch = model_and_batch(_encdec(tiny_config), random_batch)
  tokens = np.random.default_rng(1).integers(4, 500, batch["tgt_input"].shape)
  batch = dict(batch, tgt_input=jnp.asarray(tokens, jnp.int32))
  apply = jax.jit(model.apply)
  before = np.asarray(apply({"params": params}, batch))
  j = 6
  changed = tokens.copy()
  changed[:, j] = (changed[:, j] + 17) % 500 + 4
  after = np.asarray(apply({"params": params}, dict(batch, tgt_input=jnp.asarray(changed))))
  np.testing.assert_array_equal(before[:, :j], after[:, :j])
  assert np.abs(before[:, j:] - after[:, j:]).max() > 1e-4  # later positions do see it

  encode = jax.jit(lambda b: model.apply({"params": params}, b, method=M6.encode))
  encoded, valid = encode(batch)
  np.testing.assert_array_equal(encode(dict(batch, tgt_input=jnp.asarray(changed)))[0], encoded)
  # ... while every target position depends on the source.
  src = np.asarray(batch["src_tokens"]).copy()
  src[:, 0] = (src[:, 0] + 1) % 500 + 4
  moved = np.asarray(apply({"params": params}, dict(batch, src_tokens=jnp.asarray(src))))
  assert (np.abs(moved - before).max(axis=-1) > 1e-5).all()
  assert encoded.shape == (4, model.config.num_patches + model.config.src_len, 64)
  np.testing.assert_array_equal(valid[:, -model.config.src_len :], src != 0)


def test_trimmed_batch_gives_the_padded_logits_and_cached_decoding(tiny_config, random_batch):
  model, params, batch = model_and_batch(_encdec(tiny_config), random_batch, seed=1)
  src_cut, tgt_cut = 5, 4
  padded = jax.tree.map(np.array, _no_prefix_row(batch))
  padded["src_tokens"][:, src_cut:] = 0
  padded["tgt_input"][:, tgt_cut:] = 0
  trimmed = dict(padded, src_tokens=padded["src_tokens"][:, :src_cut])
  trimmed["tgt_input"] = padded["tgt_input"][:, :tgt_cut]
  apply = jax.jit(model.apply)
  full = np.asarray(apply({"params": params}, padded))
  cut = np.asarray(apply({"params": params}, trimmed))
  assert cut.shape == (4, tgt_cut, 512)
  np.testing.assert_allclose(cut, full[:, :tgt_cut], rtol=1e-5, atol=1e-5)

  encode = jax.jit(lambda b: model.apply({"params": params}, b, method="encode_prefix"))
  step = jax.jit(lambda c, t, p: model.apply({"params": params}, c, t, p, method="decode_step"))
  cache = encode(trimmed)
  for pos in range(tgt_cut):
    logits, cache = step(cache, jnp.asarray(trimmed["tgt_input"][:, pos]), pos)
    np.testing.assert_allclose(logits, cut[:, pos], rtol=1e-4, atol=1e-4)


def test_greedy_beam_and_sampling_run_on_the_cached_decoder(tiny_config, random_batch):
  model, params, batch = model_and_batch(_encdec(tiny_config), random_batch)
  max_len = model.config.tgt_len
  # An EOS the model emits: row 0's fourth greedy token when nothing stops it.
  eos = int(np.asarray(decoding.decode(model, params, batch, "greedy", max_len, BOS, -1))[0, 3])
  greedy = np.asarray(decoding.decode(model, params, batch, "greedy", max_len, BOS, eos))
  end = int(np.argmax(greedy[0] == eos))  # the first EOS: at step 3 or before, then padding
  assert greedy[0, end] == eos and end <= 3 and (greedy[0, end + 1 :] == 0).all()
  top1 = decoding.decode(
    model, params, batch, "sample", max_len, BOS, eos, rng=jax.random.PRNGKey(3), top_k=1
  )
  np.testing.assert_array_equal(np.asarray(top1), greedy)
  # Beam scores equal the teacher-forced log-probabilities of the returned hypotheses: the
  # cross-attention cache followed the beams (it is shared, per example, by all of them).
  k, alpha = 3, 0.6
  seqs, scores = decoding.decode(
    model, params, batch, "beam", max_len, BOS, eos, beam_size=k, length_penalty=alpha
  )
  flat = np.asarray(seqs).reshape(4 * k, max_len)
  tgt_input = np.concatenate([np.full((4 * k, 1), BOS), flat[:, :-1]], axis=1).astype(np.int32)
  rep = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), batch)
  logp = jax.nn.log_softmax(
    jax.jit(model.apply)({"params": params}, dict(rep, tgt_input=tgt_input))
  )
  token_logp = np.take_along_axis(np.asarray(logp), flat[:, :, None], axis=-1)[..., 0]
  is_eos = flat == eos
  ends = np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, max_len)
  total = np.where(np.arange(max_len)[None] < ends[:, None], token_logp, 0).sum(-1)
  expected = total / ((5.0 + ends) / 6.0) ** alpha
  np.testing.assert_allclose(np.asarray(scores).reshape(-1), expected, atol=1e-4, rtol=0)


def _stack_layers(params, config):
  """Unrolled params (encoder_layer_i, decoder_layer_i) -> scanned ({encoder,decoder}_layers
  with layer_j stacked over the groups)."""
  k = config.layers_per_group
  out = {name: p for name, p in params.items() if "_layer_" not in name}
  for stack in ("encoder", "decoder"):
    groups = config.stack_layers(stack) // k
    out[f"{stack}_layers"] = {
      f"layer_{j}": jax.tree.map(
        lambda *xs: jnp.stack(xs),
        *[params[f"{stack}_layer_{g * k + j}"] for g in range(groups)],
      )
      for j in range(k)
    }
  return out


def _scanned(c, params):
  """The model with scan_layers (and c's remat_policy) and the unrolled params mapped to it."""
  c.model.scan_layers = True
  model = M6(M6Config.from_config(c))
  mapped = _stack_layers(params, model.config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy_batch(model.config))
  assert jax.tree.structure(nn.unbox(shapes["params"])) == jax.tree.structure(mapped)
  return model, mapped


def test_scan_and_remat_match_the_unrolled_stacks(tiny_config, random_batch):
  c = _encdec(tiny_config)
  batch = jax.tree.map(jnp.asarray, random_batch(4, c))
  plain, params = init_model(M6Config.from_config(c))
  c.model.remat_policy = "full"
  other, other_params = _scanned(c, params)
  grad = jax.jit(jax.value_and_grad(moe_objective, argnums=1, has_aux=True), static_argnums=0)
  (want, _), want_grads = grad(plain, params, batch)
  (got, _), got_grads = grad(other, other_params, batch)
  assert float(got) == pytest.approx(float(want), abs=1e-5)
  mapped = _stack_layers(want_grads, other.config)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(mapped), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  assert np.abs(np.asarray(want_grads["decoder_layer_1"]["cross_attention"]["key"])).max() > 0


def test_moe_layers_in_both_stacks(tiny_config, random_batch):
  """moe_every=2: layer 1 of the encoder and of the decoder is MoE; both sow aux losses,
  and the scanned stacks (groups of [dense, MoE]) compute the same."""
  c = _encdec(tiny_config)
  c.model.moe_num_experts, c.model.moe_num_groups, c.model.moe_every = 4, 2, 2
  batch = jax.tree.map(jnp.asarray, random_batch(4, c))
  plain, params = init_model(M6Config.from_config(c))
  for stack in ("encoder", "decoder"):
    assert {"experts", "router"} <= set(params[f"{stack}_layer_1"]["mlp"])
    assert "wi" in params[f"{stack}_layer_0"]["mlp"]
  other, other_params = _scanned(c, params)
  run = jax.jit(moe_objective, static_argnums=0)
  (want, want_terms), (got, got_terms) = run(plain, params, batch), run(other, other_params, batch)
  assert (
    set(want_terms) == set(got_terms) == {"load_balance_loss", "router_z_loss", "dropped_fraction"}
  )
  assert float(got) == pytest.approx(float(want), abs=1e-5)
  for name in want_terms:
    assert float(got_terms[name]) == pytest.approx(float(want_terms[name]), abs=1e-5)
  mutable = [AUX_LOSS_COLLECTION, METRICS_COLLECTION]
  _, state = jax.eval_shape(
    functools.partial(plain.apply, mutable=mutable), {"params": params}, batch
  )
  assert set(state[AUX_LOSS_COLLECTION]) == {"encoder_layer_1", "decoder_layer_1"}


def test_flops_and_parameter_counts_follow_the_two_stacks(tiny_config):
  c = _encdec(tiny_config, encoder=1, decoder=2)
  cfg = M6Config.from_config(c)
  p, t = cfg.seq_len - cfg.tgt_len, cfg.tgt_len
  # Attention pairs: prefix x prefix per encoder layer; per decoder layer a target x target
  # block (causal self-attention) and target x prefix (cross-attention).
  assert cfg.total_attention_pairs == 1 * p * p + 2 * (t * t + t * p)
  # The config's depths (config.py imports no JAX, so it has its own) are the model's.
  assert config_lib.stack_depths(c.model) == {"encoder": 1, "decoder": 2}
  assert [cfg.stack_layers(s) for s in ("encoder", "decoder")] == [1, 2]
  c.model.num_decoder_layers = 0  # 0: num_layers
  assert config_lib.stack_depths(c.model)["decoder"] == 2 == tiny_config.model.num_layers
  assert M6Config.from_config(c).stack_layers("decoder") == 2
  counts = param_count.count_params(c)
  assert counts["total"] == sum(counts[k] for k in param_count.COMPONENTS)
  # A decoder layer is an encoder layer plus cross-attention and its norm.
  d, h = 64, 4 * 16
  cross = 3 * d * h + 2 * h + h * d + d + 2 * d  # q, k, v (no key bias), out; the norm
  assert counts["decoder active per token"] == 2 * (counts["encoder active per token"] + cross)
  rest = counts["total"] - counts["encoder active per token"] - counts["decoder active per token"]
  assert 0 < rest < counts["total"] / 2  # embeddings, stem, the two final norms
  flops = param_count.train_flops(c, counts)
  assert flops > 0
  assert param_count.train_flops(c, counts, None, 4, 4) < flops  # a trimmed batch costs less


def test_architecture_config_errors(tiny_config):
  def check(message, **model):
    c = copy.deepcopy(tiny_config)
    c.model.update(model)
    with pytest.raises(ConfigError, match=message):
      validate(c, num_devices=8)

  check(
    r"model.architecture='encoder' is not one of \('unified', 'encoder_decoder'\)",
    architecture="encoder",
  )
  check(
    "model.num_encoder_layers=2 sizes a stack of model.architecture='encoder_decoder'",
    num_encoder_layers=2,
  )
  check(
    "model.num_decoder_layers=-1 must be >= 0",
    architecture="encoder_decoder",
    num_decoder_layers=-1,
  )
  check(
    r"so the decoder's depth 3 \(model.num_decoder_layers; 0: model.num_layers\) must be",
    architecture="encoder_decoder",
    num_decoder_layers=3,
    moe_num_experts=4,
    moe_every=2,
    scan_layers=True,
  )
  validate(_encdec(copy.deepcopy(tiny_config), 0, 3), num_devices=8)


@pytest.mark.slow
def test_base_config_trains_through_the_loop(tokenizer_path, tmp_path):
  """A few steps of configs/base.py as an encoder-decoder in the real train loop (one layer
  per stack and shorter texts, to keep the test cheap)."""
  from m6_jax.train import loop

  config = _encdec(importlib.import_module("configs.base").get_config(), 1, 1)
  config.data.tokenizer_path = tokenizer_path
  config.data.batch_size, config.data.num_train_examples = 8, 64
  config.data.src_len = config.data.tgt_len = 32
  config.data.length_bucket = 0  # one step shape, one compilation
  config.train.steps, config.train.warmup_steps, config.train.log_every = 6, 2, 3
  config.mesh.data = 1
  result = loop.train(config, str(tmp_path / "run"))
  assert result.final_step == 6 and len(result.losses) == 6
  assert np.isfinite(result.losses).all()
  assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2]) - 0.5, result.losses
