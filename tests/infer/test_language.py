"""Every generated text is in one language (m6_jax/infer/generate.py's `language`), on an
untrained model: its greedy texts mix English and Chinese in some rows and not in others."""

import jax
import pytest

from m6_jax.config import default_config
from m6_jax.data import scripts, synthetic
from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.errors import GenerationError
from m6_jax.infer import decoding, generate
from m6_jax.parallel import partitioning


@pytest.fixture(scope="module")
def model_and_batch(tokenizer_path):
  """A tiny untrained model on one device, and 6 images to caption and 2 prompts."""
  c = default_config()
  c.model.vocab_size = 512
  c.model.d_model, c.model.num_layers, c.model.mlp_dim = 32, 1, 64
  c.model.num_heads, c.model.head_dim = 2, 16
  c.model.patch_size, c.data.image_size = 16, 32
  c.data.src_len, c.data.tgt_len = 12, 8
  tok = tokenizer_lib.Tokenizer.from_file(tokenizer_path)
  mesh = partitioning.make_mesh(c, jax.devices()[:1])
  model = generate.init_model(c, tok, seed=2, mesh=mesh)
  images = [synthetic.make_example(0, i, image_size=32)["image"] for i in range(6)]
  batch = generate.make_inputs(model, images + [None, None], [""] * 6 + ["a small red", "左侧有"])
  return model, batch


@pytest.mark.parametrize("language, other", [("en", "zh"), ("zh", "en")])
def test_a_language_asked_for_is_kept_from_the_first_token(model_and_batch, language, other):
  texts = generate.decode(*model_and_batch, language=language)
  chars = "".join(texts)
  assert any(scripts.char_script(ch) == language for ch in chars), texts
  assert not any(scripts.char_script(ch) == other for ch in chars), texts


def test_auto_decodes_again_the_rows_that_mix_and_only_them(model_and_batch, monkeypatch):
  """A row that mixes is decoded again in the language it began in; the others are today's
  texts, unchanged; one more decoding per language that mixed rows began in."""
  free = generate.decode(*model_and_batch, language="any")  # never decoded again
  mixed = {i: scripts.first_language(t) for i, t in enumerate(free) if scripts.mixes_languages(t)}
  assert 0 < len(mixed) < len(free), free  # the model mixes in some rows, not in all
  asked = {lang: generate.decode(*model_and_batch, language=lang) for lang in ("en", "zh")}

  calls = []
  decode = decoding.decode
  monkeypatch.setattr(decoding, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
  auto = generate.decode(*model_and_batch)
  assert len(calls) == 1 + len(set(mixed.values()))
  for i, text in enumerate(auto):
    if i in mixed:
      assert text == asked[mixed[i]][i] and not scripts.mixes_languages(text), (free[i], text)
    else:
      assert text == free[i]


def test_a_bad_language_is_one_clear_error(model_and_batch):
  with pytest.raises(GenerationError, match="unknown language 'fr'; one of auto, any, en, zh"):
    generate.decode(*model_and_batch, language="fr")
