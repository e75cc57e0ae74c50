"""Text-to-image: code tokens and their 2-D positions in the model, config checks, sampling
(code tokens only, reproducible per image, cached == uncached, guidance), reranking, the
CLI's errors, and a tiny end-to-end run (train, generate, PNGs)."""

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from image_codes_stand_in import StandInImageTokenizer, write_codes_dir
from PIL import Image
from testing_utils import cpu_env

from m6_jax import config as config_lib
from m6_jax.data import synthetic, tasks
from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.errors import ConfigError, GenerationError
from m6_jax.infer import decoding, generate, image_outputs
from m6_jax.infer import text_to_image as t2i
from m6_jax.model.m6 import M6, M6Config, dummy_batch
from m6_jax.parallel import partitioning

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K, GRID = 16, (3, 3)
PROMPTS = ["a small red circle", "一个红色的圆", "a large blue square", "a green cross"]


def _code_config(config):
  """The tests' text-to-image model: tiny (one layer), so that its decoders compile fast."""
  config.model.d_model, config.model.num_layers, config.model.mlp_dim = 32, 1, 64
  config.model.num_heads, config.model.head_dim = 2, 16
  config.model.code_vocab_size = K
  config.model.code_grid = GRID
  config.data.tgt_len = 10  # 9 codes + EOS
  config.data.image_size = 48  # the stand-in VQGAN's (3 x 3 cells of 16 pixels)
  return config


@pytest.fixture
def code_config(tiny_config):
  return _code_config(tiny_config)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
  return tokenizer_lib.Tokenizer.from_file(tokenizer_path)


@functools.lru_cache(maxsize=None)
def _loaded(config_json: str, tokenizer_path: str, devices: int):
  config = config_lib.merged_with_defaults(json.loads(config_json))
  mesh = partitioning.make_mesh(config, jax.devices()[:devices])
  return generate.init_model(config, tokenizer_lib.Tokenizer.from_file(tokenizer_path), 0, mesh)


def _model(config, tokenizer_path, devices=8):
  """A freshly initialised (seed 0) model on a mesh of `devices` devices, shared by tests."""
  return _loaded(json.dumps(config.to_dict()), tokenizer_path, devices)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


def _abstract_params(cfg: M6Config):
  return jax.eval_shape(lambda: M6(cfg).init(jax.random.PRNGKey(0), dummy_batch(cfg)))["params"]


def test_codes_are_embedding_rows_after_the_text_vocabulary(code_config):
  vocab = code_config.model.vocab_size
  cfg = M6Config.from_config(code_config)
  assert cfg.total_vocab_size == vocab + K and cfg.code_grid == GRID
  params = _abstract_params(cfg)
  assert params["token_embedding"]["embedding"].value.shape == (vocab + K, 32)
  assert params["code_position"]["row_embedding"].value.shape == (GRID[0], 32)
  assert params["code_position"]["col_embedding"].names == ("patch", "embed")
  text = _abstract_params(dataclasses.replace(cfg, code_vocab_size=0, code_grid=(0, 0)))
  assert "code_position" not in text
  assert text["token_embedding"]["embedding"].value.shape == (vocab, 32)


def _code_batch(config, random_batch):
  """Rows 0-2: BOS + the 9 codes (ids vocab + c); row 3: a text target."""
  batch = random_batch(4, config, seed=1)
  codes = np.random.default_rng(0).integers(0, K, (3, 9))
  batch["tgt_input"][:3] = np.concatenate([np.full((3, 1), 2), config.model.vocab_size + codes], 1)
  return jax.tree.map(jnp.asarray, batch)


def test_code_positions_teacher_forcing_equals_cached_decoding(code_config, random_batch):
  cfg = M6Config.from_config(code_config)
  model = M6(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), dummy_batch(cfg))["params"])
  batch = _code_batch(code_config, random_batch)
  apply = jax.jit(model.apply)
  full = np.asarray(apply({"params": params}, batch))
  assert full.shape == (4, 10, cfg.total_vocab_size)
  cache = jax.jit(functools.partial(model.apply, method=M6.encode_prefix))(
    {"params": params}, batch
  )
  step = jax.jit(
    lambda cache, token, t: model.apply({"params": params}, cache, token, t, method=M6.decode_step)
  )
  for t in range(cfg.tgt_len):
    logits, cache = step(cache, batch["tgt_input"][:, t], t)
    np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-5, rtol=0, err_msg=f"t={t}")
  # The row / column embeddings reach the code positions (and only those): without them the
  # code rows' logits change after BOS, the text row's do not.
  flat = dict(params, code_position=jax.tree.map(jnp.zeros_like, params["code_position"]))
  without = np.asarray(apply({"params": flat}, batch))
  assert np.abs(without[:3, 1:] - full[:3, 1:]).min(axis=-1).max() > 1e-4
  np.testing.assert_allclose(without[:3, 0], full[:3, 0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(without[3], full[3], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------


def _validate_error(config) -> str:
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config, 8)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_config_checks_for_text_to_image(code_config, tmp_path):
  code_config.data.task_weights.text_to_image = 1.0
  assert "data.image_codes_dir" in _validate_error(code_config)
  vqgan = StandInImageTokenizer(K, GRID)
  code_config.data.image_codes_dir = write_codes_dir(str(tmp_path / "codes"), vqgan, "")
  config_lib.validate(code_config, 8)
  code_config.data.tgt_len = 9
  assert "data.tgt_len=9 must be >= 10" in _validate_error(code_config)
  code_config.data.tgt_len = 10
  code_config.model.code_vocab_size = 32
  assert "codebook_size=16 but the model has model.code_vocab_size=32" in _validate_error(
    code_config
  )
  code_config.model.code_vocab_size = 0
  assert "model.code_vocab_size > 0" in _validate_error(code_config)
  code_config.model.code_vocab_size, code_config.model.code_grid = K, (3, 0)
  assert "model.code_grid" in _validate_error(code_config)
  code_config.model.code_grid, code_config.data.guidance_drop_rate = GRID, 1.0
  assert "data.guidance_drop_rate" in _validate_error(code_config)
  # Not enabled: the default weight is 0 and the defaults validate.
  assert config_lib.default_config().data.task_weights.text_to_image == 0.0
  config_lib.validate(config_lib.default_config(), 8)


def _config_file(name, arg=None):
  spec = importlib.util.spec_from_file_location("config_file", f"{REPO}/configs/{name}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_the_text_to_image_config(tmp_path):
  assert _config_file("base.py").data.task_weights.text_to_image == 0.0
  config = _config_file("finetune_text_to_image.py")
  assert "text_to_image needs data.image_codes_dir" in _validate_error(config)
  for arg, grid in ((None, (12, 12)), ("grid6", (6, 6))):
    config = _config_file("finetune_text_to_image.py", arg)
    vqgan = StandInImageTokenizer(256, grid)
    config.data.image_codes_dir = write_codes_dir(str(tmp_path / str(arg)), vqgan, "")
    config_lib.validate(config, 8)
    assert config.data.task_weights.image_to_text > 0  # to rerank with


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def _sample(model, prompts, indices, **kw):
  return t2i.sample_codes(model, prompts, indices, seed=7, **kw)


def test_sampling_is_per_image_reproducible_and_draws_codes_only(code_config, tokenizer_path):
  one_device = _model(code_config, tokenizer_path, devices=1)
  at_once = _sample(one_device, PROMPTS, [0, 1, 2, 3], guidance_scale=3.0)
  assert at_once.shape == (4,) + GRID and at_once.dtype == np.int32
  assert at_once.min() >= 0 and at_once.max() < K  # image codes, never text or EOS
  assert len({c.tobytes() for c in at_once}) == 4
  two_by_two = np.concatenate(
    [
      _sample(one_device, PROMPTS[:2], [0, 1], guidance_scale=3.0),
      _sample(one_device, PROMPTS[2:], [2, 3], guidance_scale=3.0),
    ]
  )
  np.testing.assert_array_equal(at_once, two_by_two)
  eight_devices = _model(code_config, tokenizer_path, devices=8)
  np.testing.assert_array_equal(
    at_once, _sample(eight_devices, PROMPTS, [0, 1, 2, 3], guidance_scale=3.0)
  )


def test_cached_sampling_equals_uncached(code_config, tokenizer_path):
  model = _model(code_config, tokenizer_path)
  kw = dict(guidance_scale=3.0, top_k=8, top_p=0.95)
  cached = _sample(model, PROMPTS, [0, 1, 2, 3], **kw)
  np.testing.assert_array_equal(cached, _sample(model, PROMPTS, [0, 1, 2, 3], cached=False, **kw))


def test_guidance_scale_one_is_conditional_and_zero_unconditional(code_config, tokenizer_path):
  model = _model(code_config, tokenizer_path)
  c = model.model.config
  plain = _sample(model, PROMPTS, [0, 1, 2, 3], guidance_scale=1.0)
  # Conditional sampling written out with decoding.py's pieces: the same keys and mask.
  d = model.config.data
  rows = [
    tasks.prefix_features(None, (48, 48, 3), model.tokenizer.encode(p)[: d.src_len], d.src_len)
    for p in PROMPTS
  ]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in decoding.PREFIX_KEYS}
  cache = decoding.encode_prefix(model.model, model.params, batch)
  step = decoding.m6_step_fn(model.model, model.params, cache, t2i.code_token_mask(c))
  keys = t2i.example_keys(7, [0, 1, 2, 3])
  ids = decoding.generic_sample(
    step, cache.target, keys, batch_size=4, max_len=9, bos_id=2, eos_id=1
  )
  np.testing.assert_array_equal(plain, (np.asarray(ids) - c.vocab_size).reshape(4, *GRID))
  # Scale 0 samples the unconditional model: what an empty caption gives at scale 1.
  unconditional = _sample(model, [""] * 4, [0, 1, 2, 3], guidance_scale=1.0)
  np.testing.assert_array_equal(
    _sample(model, PROMPTS, [0, 1, 2, 3], guidance_scale=0.0), unconditional
  )
  assert not np.array_equal(plain, _sample(model, PROMPTS, [0, 1, 2, 3], guidance_scale=3.0))


# --------------------------------------------------------------------------------------
# Reranking
# --------------------------------------------------------------------------------------


def test_reranking_keeps_the_best_scored_candidates(code_config, tokenizer_path, tmp_path):
  model = _model(code_config, tokenizer_path)
  vqgan = StandInImageTokenizer(K, GRID, image_size=96)  # decoded larger than the model's 48
  base = dict(prompt="a small red circle", output_dir=str(tmp_path), seed=3, batch_size=4)
  every = t2i.generate_images(model, vqgan, t2i.ImageRequest(num_images=6, **base))
  scores = [3.0, 9.0, 1.0, 9.0, 5.0, 0.0]
  seen = []
  scorer = lambda images: seen.append(images) or scores
  best = t2i.generate_images(model, vqgan, t2i.ImageRequest(num_images=2, rerank=6, **base), scorer)
  np.testing.assert_array_equal(seen[0], every.images)  # every candidate was scored
  assert best.candidates.tolist() == [1, 3] and best.scores.tolist() == [9.0, 9.0]
  np.testing.assert_array_equal(best.images, every.images[[1, 3]])
  np.testing.assert_array_equal(best.codes, every.codes[[1, 3]])
  # The default scorer: the model's own log-likelihood of the prompt given each image.
  own = t2i.prompt_log_likelihood(model, every.images, base["prompt"], batch_size=4)
  assert own.shape == (6,) and np.isfinite(own).all() and (own < 0).all()
  assert len(set(own.round(5))) > 1
  ranked = t2i.generate_images(model, vqgan, t2i.ImageRequest(num_images=2, rerank=6, **base))
  assert ranked.candidates.tolist() == np.argsort(-own, kind="stable")[:2].tolist()


# --------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------


def _run_error(request, workdir, config, loader=StandInImageTokenizer.load) -> str:
  with pytest.raises(GenerationError) as e:
    t2i.run(request, workdir, config, image_tokenizer_loader=loader)
  assert "\n" not in str(e.value)
  return str(e.value)


@pytest.mark.slow
def test_cli_errors_are_one_line(code_config, tmp_path, run_main):
  vqgan_dir = StandInImageTokenizer(32, GRID).save(str(tmp_path / "vqgan"))  # 32 codes, not 16
  code_config.data.image_codes_dir = write_codes_dir(
    str(tmp_path / "codes"), StandInImageTokenizer(K, GRID), vqgan_dir
  )
  ok = t2i.ImageRequest("a red circle", num_images=2, output_dir=str(tmp_path / "out"))
  workdir = str(tmp_path / "never_read")
  replace = lambda **kw: t2i.ImageRequest(**{**ok.__dict__, **kw})
  assert "prompt is empty" in _run_error(replace(prompt=" "), workdir, code_config)
  assert "--num_images=0 must be positive" in _run_error(
    replace(num_images=0), workdir, code_config
  )
  assert "--output_dir" in _run_error(replace(output_dir=""), workdir, code_config)
  assert "--rerank=1" in _run_error(replace(rerank=1), workdir, code_config)
  line = _run_error(ok, workdir, code_config)
  assert (
    "does not fit the model: codebook_size=32 but the model has model.code_vocab_size=16" in line
  )
  other_grid = StandInImageTokenizer(K, (2, 2)).save(str(tmp_path / "vqgan2"))
  assert "grid=(2, 2)" in _run_error(replace(vqgan_workdir=other_grid), workdir, code_config)
  text_only = code_config.copy_and_resolve_references()
  text_only.model.code_vocab_size = 0
  assert "has no image codes" in _run_error(ok, workdir, text_only)
  drawn = tmp_path / "drawn"  # a drawing of the prompt is there already
  drawn.mkdir()
  (drawn / f"{image_outputs.stem('a red circle')}_0.png").write_bytes(b"")
  assert "pass --overwrite" in _run_error(replace(output_dir=str(drawn)), workdir, code_config)
  # The same checks through main: exit status 2 and one `error:` line, before any loading.
  for flags, needle in (
    (["--prompt=", "--num_images=2"], "prompt is empty"),
    (["--prompt=a red circle", "--num_images=-1"], "--num_images=-1 must be positive"),
    (["--prompt=a red circle", f"--output_dir={drawn}"], "_0.png exists"),
    (["--prompt=a red circle", f"--output_dir={drawn}", "--overwrite"], "no checkpoint in"),
  ):
    proc = run_main("--mode=generate", f"--workdir={workdir}", f"--output_dir={tmp_path}", *flags)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_prompt_alone_draws_only_on_a_model_with_codes(code_config):
  has_codes = lambda config: lambda: int(config.model.code_vocab_size) > 0
  text_only = code_config.copy_and_resolve_references()
  text_only.model.code_vocab_size = 0
  assert t2i.draws_images(False, "a red circle", False, has_codes(code_config))
  assert not t2i.draws_images(False, "a red circle", False, has_codes(text_only))  # continues
  assert not t2i.draws_images(False, "a red circle", True, has_codes(code_config))  # --image
  assert not t2i.draws_images(False, None, False, has_codes(code_config))  # no prompt
  assert t2i.draws_images(True, "a red circle", False, has_codes(text_only))  # then an error


# --------------------------------------------------------------------------------------
# End to end: train on text_to_image with stand-in codes, generate PNGs
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_and_generate_pngs(code_config, tokenizer_path, tmp_path):
  from m6_jax.data import image_codes
  from m6_jax.evaluation import evaluate
  from m6_jax.train import loop

  vqgan = StandInImageTokenizer(K, GRID, image_size=48)
  vqgan_dir = vqgan.save(str(tmp_path / "vqgan"))
  c = code_config
  c.data.batch_size, c.data.num_train_examples, c.data.num_eval_examples = 8, 32, 4
  c.data.image_codes_dir = str(tmp_path / "codes")
  image_codes.encode_dataset(vqgan, c, c.data.image_codes_dir)
  c.data.tokenizer_path = tokenizer_path
  for name in c.data.task_weights:
    c.data.task_weights[name] = 0.0
  c.data.task_weights.text_to_image, c.data.task_weights.image_to_text = 1.0, 0.5
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 3, 1, 3
  workdir = str(tmp_path / "m6")
  loop.train(c, workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all(np.isfinite(r["text_to_image_loss"]) for r in rows if "event" not in r)
  model = generate.load_model(workdir)
  losses = evaluate.task_losses(model)  # teacher-forced, like every task's
  assert np.isfinite(losses["text_to_image_loss"]) and "text_to_image_accuracy" in losses

  out = str(tmp_path / "out")
  request = t2i.ImageRequest("一个红色的圆", num_images=3, output_dir=out, rerank=4, batch_size=2)
  loads = []
  loader = lambda d, s: loads.append(d) or StandInImageTokenizer.load(d, s)
  index = t2i.run(request, workdir, image_tokenizer_loader=loader)
  assert loads == [vqgan_dir]  # found through data.image_codes_dir/codes_info.json
  stem = image_outputs.stem("一个红色的圆")
  assert stem.startswith("image-") and index["files"] == [f"{stem}_{i}.png" for i in range(3)]
  assert index["prompt"] == "一个红色的圆" and index["seed"] == 0 and index["step"] == 3
  assert index["settings"]["rerank"] == 4 and len(index["scores"]) == 3
  assert index["scores"] == sorted(index["scores"], reverse=True)
  assert json.load(open(os.path.join(out, f"{stem}.json"), encoding="utf-8")) == index
  # The workdir as given, the VQGAN (an absolute path in codes_info.json) relative to it.
  assert index["workdir"] == workdir and index["vqgan_workdir"] == "../vqgan"
  for name in index["files"]:
    with Image.open(os.path.join(out, name)) as img:
      assert img.size == (48, 48) and img.text["prompt"] == "一个红色的圆"
  with Image.open(os.path.join(out, index["grid"])) as grid:
    assert grid.width >= 2 * image_outputs.GRID_CELL and grid.text["prompt"] == "一个红色的圆"
  assert index["prompt_drawn_on_grid"]  # by a system font, else the package's CJK subset
  _judged_against_the_scenes(workdir, vqgan)


class _ColourJudge:
  """A judge for the evaluation's mechanics: a cell is occupied (as a circle) when its mean
  is far from the light background, in the world colour nearest its saturated pixels."""

  def predict(self, images):
    cells = np.asarray(images, np.float32).reshape(len(images), 3, 16, 3, 16, 3)
    cells = cells.transpose(0, 1, 3, 2, 4, 5).reshape(len(images), 9, 256, 3)
    saturated = cells.max(-1) - cells.min(-1) > 80
    occupied = saturated.mean(-1) > 0.05
    mean = (cells * saturated[..., None]).sum(2) / np.maximum(saturated.sum(2), 1)[..., None]
    palette = np.array(list(synthetic.COLORS.values()), np.float32)
    colour = ((mean[:, :, None] - palette) ** 2).sum(-1).argmin(-1)
    zeros = np.zeros_like(colour)
    return {"shape": occupied.astype(np.int32), "color": colour, "size": zeros}

  def features(self, images):
    cells = np.asarray(images, np.float32).reshape(len(images), 4, 12, 4, 12, 3).mean((2, 4))
    return cells.reshape(len(images), -1)


def _judged_against_the_scenes(workdir, vqgan):
  from m6_jax.evaluation import text_to_image_eval

  results = text_to_image_eval.evaluate(
    workdir,
    _ColourJudge(),
    4,
    [1.0, 3.0],
    2,
    batch_size=4,
    image_tokenizer=vqgan,
    log=None,
    reference_images=6,
  )
  assert results["reference_images"] == 6
  rows = results["rows"]
  assert list(rows) == [
    "real images (ceiling)",
    "VQGAN reconstructions",
    "generated, guidance 1",
    "generated, guidance 1, best of 2",
    "generated, guidance 3",
    "generated, guidance 3, best of 2",
    "chance (other captions)",
  ]
  real = rows["real images (ceiling)"]
  assert real["position"] == 1.0 and real["color"] == 1.0 and real["count"] == 1.0
  assert rows["chance (other captions)"]["position"] < 1.0
  for name, row in rows.items():
    assert all(0.0 <= row[k] <= 1.0 for k in text_to_image_eval.SCORES), name
    assert row["num_images"] == 4
  assert all(np.isfinite(rows[n]["frechet"]) for n in list(rows)[:-1])
  table = text_to_image_eval.format_table(rows)
  assert table.count("\n") == len(rows) + 1 and "generated, guidance 3, best of 2" in table


@pytest.mark.slow
def test_the_judged_evaluation_rejects_a_reference_too_small_for_a_frechet_distance(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "m6_jax.main", "--mode=text_to_image_eval", f"--workdir={tmp_path}"]
    + ["--reference_images=1"],
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and lines[-1].startswith("error: --reference_images=1"), proc.stderr
  assert "Traceback" not in proc.stderr
