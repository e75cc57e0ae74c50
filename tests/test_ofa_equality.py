"""The converted OFA computes what OFA's PyTorch implementation (ModelScope's modeling_ofa.py)
computes: a small random OFA built with that code, converted by m6_jax/infer/ofa_convert.py,
gives the same logits (1e-4, float32, teacher forcing, with padding in the source and the
target) and the same 10 greedy tokens through m6-jax's KV-cached decoder as OFA's own
decoder recomputing every step, which is how its sequence generator decodes."""

import jax.numpy as jnp
import numpy as np
import ofa_utils
import pytest
import torch  # requirements-ofa.txt (in requirements-test.txt): never skipped

from m6_jax.infer import decoding, ofa_convert
from m6_jax.model import ofa
from m6_jax.model.m6 import M6, M6Config

# Multi-device / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow

IMAGE_SIZE = 64  # a 4 x 4 patch grid


def _convert(model, cfg):
  vocab = ofa_utils.tiny_vocab()
  config = ofa_convert.m6_config(cfg, {"patch_image_size": IMAGE_SIZE, "prompt": "图片"})
  m6 = M6(M6Config.from_config(config))
  perm = ofa_convert.special_order(cfg, vocab)
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  sd = ofa_convert.interpolate_image_positions(sd, cfg, IMAGE_SIZE)
  params = ofa_convert.convert_params(sd, m6.config, perm)
  ofa_convert.check_shapes(params, m6)
  return m6, params, np.argsort(perm)  # ours[ofa id]


def _inputs():
  rng = np.random.RandomState(0)
  image = rng.rand(2, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  src = np.array([[0, 5, 6, 7, 8, 2, 1, 1], [0, 9, 10, 11, 12, 13, 14, 2]])  # OFA ids, 1 = pad
  tgt = np.array([[0, 15, 16, 17, 18, 19], [0, 20, 21, 22, 1, 1]])
  return image, src, tgt


def _ofa_logits(model, image, src, tgt):
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(src),
      patch_images=torch.tensor(image * 2 - 1).permute(0, 3, 1, 2),  # OFA's Normalize(0.5, 0.5)
      patch_masks=torch.ones(len(src), dtype=torch.bool),
      decoder_input_ids=torch.tensor(tgt),
    )
  return out.logits.numpy()


# OFA-CN's form with an untied head, with a tied head, the other options' other values, and
# image positions interpolated from a smaller grid's (config.json's interpolate_position).
VARIANTS = {
  "untied": {},
  "tied": {"share_decoder_input_output_embed": True},
  "post_norm_relu": {
    "encoder_normalize_before": False,
    "decoder_normalize_before": False,
    "normformer": False,
    "layernorm_embedding": False,
    "patch_layernorm_embedding": False,
    "scale_embedding": False,
    "activation_function": "relu",
    "attn_scale_factor": 1.0,
  },
  # A 4 x 4 patch grid from the 2 x 2 grid's position embeddings, bilinearly resized.
  "interpolated_positions": {"interpolate_position": True, "orig_patch_image_size": 32},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_teacher_forced_logits_match_ofa(variant):
  model, cfg = ofa_utils.tiny_ofa(**VARIANTS[variant])
  m6, params, ours = _convert(model, cfg)
  image, src, tgt = _inputs()
  perm = np.argsort(ours)
  expected = _ofa_logits(model, image, src, tgt)[..., perm]
  batch = {
    "image": jnp.asarray(image),
    "has_image": jnp.ones(2, jnp.int32),
    "src_tokens": jnp.asarray(ours[src]),
    "tgt_input": jnp.asarray(ours[tgt]),
  }
  got = np.asarray(m6.apply({"params": params}, batch))
  real = tgt != 1  # OFA's padded target positions are not compared (their rows are padding)
  assert np.abs(expected).max() > 1.0  # logits of a size where 1e-4 means something
  np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


def test_greedy_tokens_match_ofa():
  model, cfg = ofa_utils.tiny_ofa()
  m6, params, ours = _convert(model, cfg)
  image, src, _ = _inputs()
  tokens = torch.zeros((2, 1), dtype=torch.long)  # OFA's <s>
  for _ in range(10):
    logits = _ofa_logits(model, image, src, tokens.numpy())
    tokens = torch.cat([tokens, torch.tensor(logits[:, -1].argmax(-1))[:, None]], 1)
  expected = ours[tokens[:, 1:].numpy()]
  batch = {
    "image": jnp.asarray(image),
    "has_image": jnp.ones(2, jnp.int32),
    "src_tokens": jnp.asarray(ours[src]),
  }
  # eos_id -1: ten steps whatever is generated (a random model may emit </s> early).
  got = np.asarray(decoding.decode(m6, params, batch, "greedy", 10, 2, -1, None))
  assert len(set(expected.ravel().tolist())) > 2  # a sequence that tests something
  np.testing.assert_array_equal(got, expected)


def test_position_buckets_are_ofas():
  """The relative buckets beyond the tiny model's lengths: OFA-CN's sizes (256 text buckets,
  log-spaced past 128 positions; 42 image buckets), against modeling_ofa.py's tables."""
  modeling, _ = ofa_utils.load_modules()
  text = modeling.make_token_bucket_position(256).numpy()
  np.testing.assert_array_equal(ofa.token_buckets(256, 1024), text)
  np.testing.assert_array_equal(
    ofa.token_buckets(16, 40), modeling.make_token_bucket_position(16)[:40, :40].numpy()
  )
  b = 42
  table = modeling.make_image_bucket_position(b, ofa.num_image_buckets(b)).numpy()
  ids = ofa.image_position_ids(b, (24, 30))
  np.testing.assert_array_equal(ofa.image_buckets(b, (24, 30)), table[ids][:, ids])
