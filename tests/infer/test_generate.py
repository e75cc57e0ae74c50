"""--mode=generate / eval / export and fine-tuning (init_from) on one tiny trained workdir:
inference on a mesh, exports, and the tokenizer check."""

import gc
import json
import logging
import os
import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from PIL import Image
from testing_utils import DAMAGE, LIBRARY_NOISE, damage_step, warnings_and_noise

from m6_jax.checkpoint import checkpoints
from m6_jax.config import ConfigError, default_config
from m6_jax.data import drawings, synthetic
from m6_jax.data import images as images_lib
from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.errors import DamagedCheckpoint, UserError
from m6_jax.evaluation import evaluate
from m6_jax.evaluation import held_out as held_out_lib
from m6_jax.infer import decoding, generate
from m6_jax.parallel import partitioning
from m6_jax.train import loop

STEPS = 80


def _config():
  c = default_config()
  c.model.vocab_size = 768
  c.model.d_model = 32
  c.model.num_layers = 1
  c.model.num_heads = 4
  c.model.head_dim = 8
  c.model.mlp_dim = 64
  c.model.patch_size = 8  # a small image stem, so that the layers hold most parameters
  c.data.batch_size = 8
  c.data.src_len = 12
  c.data.tgt_len = 12
  c.data.num_train_examples = 64
  c.data.num_eval_examples = 4
  c.data.tokenizer_corpus_examples = 300
  c.data.task_weights.vqa = 1.0
  c.train.steps = STEPS  # enough to decode words rather than EOS (decoding is compared below)
  c.train.lr = 5e-3
  c.train.warmup_steps = 0
  c.train.schedule = "constant"
  c.train.log_every = 1
  c.train.checkpoint_every = 100
  c.train.eval_examples = 2
  return c


# Flags that make configs/base.py the _config() model (for subprocess runs).
MODEL_FLAGS = [
  "--config.model.vocab_size=768",
  "--config.model.d_model=32",
  "--config.model.num_layers=1",
  "--config.model.num_heads=4",
  "--config.model.head_dim=8",
  "--config.model.mlp_dim=64",
  "--config.model.patch_size=8",
  "--config.data.src_len=12",
  "--config.data.tgt_len=12",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The test model trained STEPS steps, with checkpoints at STEPS // 2 and STEPS."""
  path = str(tmp_path_factory.mktemp("trained"))
  config = _config()
  config.train.checkpoint_every = STEPS // 2
  loop.train(config, path)
  return path


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory, run_main):
  """The workdir's latest parameters exported by the CLI (and what it printed)."""
  path = str(tmp_path_factory.mktemp("export") / "m6")
  proc = run_main("--mode=export", f"--workdir={workdir}", f"--export_dir={path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return path, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("img") / "scene.png")
  ex = synthetic.make_example(0, synthetic.split_index("validation", 0))
  Image.fromarray(ex["image"]).save(path)
  return path


def _generate_with_config(run_main, workdir, image_path, *overrides, devices=1):
  """--mode=generate with --config=configs/base.py made the test model, plus `overrides`."""
  return run_main(
    "--mode=generate",
    f"--workdir={workdir}",
    f"--image={image_path}",
    "--config=configs/base.py",
    *MODEL_FLAGS,
    *overrides,
    devices=devices,
  )


def _assert_one_error_line(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


@pytest.mark.slow
def test_generate_caption_vqa_and_prompt(workdir, image_path, tmp_path, run_main):
  out = tmp_path / "out.jsonl"
  proc = run_main(
    "--mode=generate",
    f"--workdir={workdir}",
    f"--image={image_path}",
    f"--image={image_path}",
    f"--output={out}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["task"] for r in rows] == ["image_to_text", "image_to_text"]
  assert rows[0]["image"] == image_path and rows[0]["step"] == STEPS
  assert rows[0]["output"] == rows[1]["output"]  # greedy: same image, same caption
  assert f"-> {rows[0]['output']}" in proc.stdout
  assert "Mesh: {'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}" in proc.stderr, proc.stderr
  assert "one device holds all the parameters" in proc.stderr

  # The docs' tensor-parallel command: it says which mesh it decodes on.
  proc = _generate_with_config(
    run_main,
    workdir,
    image_path,
    "--config.mesh.data=1",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=4",
    "--question=what color is the circle?",
    "--decoding=beam",
    "--beam_size=3",
    "--max_len=4",
    devices=8,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(open(os.path.join(workdir, "generate.jsonl")).read().splitlines()[-1])
  assert row["task"] == "vqa" and row["question"] == "what color is the circle?"
  mesh = re.findall(r"Mesh: (\{.*?\}); each device holds at most (\d+)% of the param", proc.stderr)
  assert mesh == [("{'data': 1, 'fsdp': 2, 'tensor': 4, 'expert': 1}", mesh[0][1])], proc.stderr
  assert int(mesh[0][1]) <= 25

  proc = run_main(
    "--mode=generate",
    f"--workdir={workdir}",
    "--prompt=a small red circle",
    "--decoding=sample",
    "--temperature=0.8",
    "--top_k=5",
    "--seed=3",
    f"--output={out}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(out.read_text().splitlines()[-1])
  assert row["task"] == "text_lm" and row["prompt"] == "a small red circle"


def _user_error(call, *args, **kwargs) -> str:
  """The one-line UserError `call` raises (in this process: the CLI turns it into its one
  `error:` line and status 2, as the launches of the tests here check)."""
  with pytest.raises(UserError) as error:
    call(*args, **kwargs)
  assert "\n" not in str(error.value), error.value
  return str(error.value)


@pytest.mark.slow
def test_generate_errors_are_one_line(workdir, image_path, tmp_path, run_main):
  """The CLI's own check (an empty prompt) through the CLI; the errors it meets in the code
  it runs (an image, the task, the checkpoint), from that code: each one a UserError of one
  line."""
  _assert_one_error_line(
    run_main("--mode=generate", f"--workdir={workdir}", "--prompt= "), "prompt is empty"
  )
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
  line = _user_error(images_lib.load_image_file, str(tmp_path / "nope.png"), 8)
  assert "image file not found" in line and "nope.png" in line, line
  line = _user_error(images_lib.load_image_file, str(corrupt), 8)
  assert "cannot read image" in line and "corrupt.png" in line, line
  line = _user_error(generate.named_task, generate.workdir_config(workdir), "text_lm", workdir)
  assert "was not trained on task 'text_lm' (data.task_weights.text_lm=0)" in line, line
  line = _user_error(generate.load_model, str(tmp_path / "empty"), devices=jax.devices()[:1])
  assert "no checkpoint in" in line, line
  # Another config than the checkpoint's: the first mismatching parameter and both shapes.
  config = _config()
  config.model.mlp_dim = 48
  line = _user_error(generate.load_model, workdir, config=config, devices=jax.devices()[:1])
  assert "does not fit this config" in line and "(64,)" in line and "(48,)" in line, line
  assert "mlp" in line.lower()


@pytest.mark.slow
def test_generate_by_task_name(workdir, image_path):
  """--task picks a registered task the model was trained on; its text may come as --text;
  a task it was not trained on, one that does not exist or wrong inputs are one line each."""
  model = generate.load_model(workdir, devices=jax.devices()[:1])
  question = "what color is the circle?"
  by_task = generate.generate(model, images=[image_path], texts=[question], task="vqa", max_len=4)
  implicit = generate.generate(model, images=[image_path], questions=[question], max_len=4)
  assert by_task == implicit and by_task[0]["task"] == "vqa" and by_task[0]["question"] == question
  for kwargs, needle in [
    (dict(task="grounding"), "unknown --task 'grounding'; the registered tasks are"),
    (dict(task="text_lm", prompt="a red"), "not trained on task 'text_lm'"),
    (dict(task="text_to_text", texts=["a red"]), "does not generate text"),
    (dict(task="vqa"), "--task=vqa needs a question: pass it with --question or --text"),
    (dict(task="vqa", prompt="a red"), "--task=vqa takes a question (--question or --text)"),
    (dict(task="image_to_text", texts=["a red"]), "takes no text; drop --text"),
    (dict(texts=["a red"]), "--text is the text of a --task"),
    (dict(questions=["a", "b"]), "got 2 questions for 1 images"),
    (dict(questions=[" "]), "a question is empty"),
    (dict(questions=["a"], prompt="b"), "either --question or --prompt, not both"),
  ]:
    with pytest.raises(generate.GenerationError, match=re.escape(needle)):
      generate.generate(model, images=[image_path], **kwargs)
  with pytest.raises(generate.GenerationError, match=r"--question needs an --image \(task 'vqa'"):
    generate.generate(model, questions=[question])
  with pytest.raises(generate.GenerationError, match="--task=vqa needs an --image"):
    generate.generate(model, texts=[question], task="vqa")


@pytest.mark.slow
def test_init_from_with_other_shapes_names_the_parameter(workdir, tmp_path):
  config = _config()
  config.model.d_model = 48
  config.init_from = workdir
  with pytest.raises(checkpoints.CheckpointError, match=r"parameter '.*' has shape \(.*32"):
    loop.train(config, str(tmp_path / "ft"))


def saved_params(path):
  """The parameters of the latest step under `path`, as host arrays."""
  ckpts = checkpoints.open_steps(path)
  step = ckpts.latest_step()
  shapes = ckpts.saved_param_shapes(step)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), shapes)
  return ckpts.restore_params(step, target)


@pytest.mark.slow
def test_finetune_from_an_export_evaluates_and_keeps_best(workdir, exported, tmp_path):
  params = saved_params(workdir)
  config = _config()
  config.init_from = exported[0]  # an export holds the parameters, config and tokenizer
  config.data.task_weights.text_to_text = 0.0
  config.data.task_weights.image_to_text = 0.0
  config.data.task_weights.multimodal_to_text = 0.0
  config.train.steps = 2
  config.train.lr = 0.0  # parameters stay those of init_from: proves they were loaded
  config.train.eval_every = 1
  config.train.eval_metric = "vqa_accuracy"
  ft = str(tmp_path / "ft")
  result = loop.train(config, ft, evaluate.PeriodicEvaluator(config, ft))
  assert result.final_step == 2  # fresh step counter
  loaded = result.state.params
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  best = checkpoints.open_steps(checkpoints.best_dir(ft)).steps()
  assert len(best) == 1 and best[0] in (1, 2)
  with (
    open(os.path.join(ft, "tokenizer", "spm.model"), "rb") as f,
    open(os.path.join(workdir, "tokenizer", "spm.model"), "rb") as g,
  ):
    assert f.read() == g.read()  # the pretrained tokenizer was reused
  evals = [json.loads(l) for l in open(os.path.join(ft, "metrics.jsonl")) if "eval_loss" in l]
  assert [e["step"] for e in evals] == [1, 2]


@pytest.mark.slow
def test_eval_mode_writes_metrics_json(workdir, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  result = evaluate.run_eval(workdir, num_examples=2, with_baselines=True)
  assert "Mesh: {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}; each device" in caplog.text
  with open(os.path.join(workdir, "eval_metrics.json")) as f:
    saved = json.load(f)
  assert saved["step"] == STEPS
  m = saved["metrics"]
  for key in (
    "loss",
    "accuracy",
    "image_to_text_loss",
    "image_to_text_accuracy",
    "vqa_loss",
    "vqa_accuracy",
    "bleu4",
    "cider",
    "num_vqa_questions",
  ):
    assert key in m, sorted(m)
  assert any(k.startswith("vqa_accuracy_") and k[13:] in synthetic.QTYPES for k in m), sorted(m)
  assert 0.0 <= m["vqa_accuracy"] <= 100.0
  assert set(saved["baselines"]) == {"untrained", "most_frequent"}
  assert "| most frequent answer / caption |" in result["table"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))


@pytest.mark.slow
def test_eval_mode_on_the_unseen_combinations_and_drawings_splits(workdir):
  validation_file = os.path.join(workdir, "eval_metrics.json")
  # Another test of this module may have written the validation split's file, or not yet.
  before = open(validation_file).read() if os.path.exists(validation_file) else None
  result = evaluate.run_eval(workdir, num_examples=2, split=synthetic.UNSEEN_SPLIT)
  with open(os.path.join(workdir, "eval_metrics_unseen_combinations.json")) as f:
    saved = json.load(f)
  assert saved["split"] == result["split"] == synthetic.UNSEEN_SPLIT
  assert {"bleu4", "vqa_accuracy", "image_to_text_loss"} <= set(saved["metrics"])
  after = open(validation_file).read() if os.path.exists(validation_file) else None
  assert after == before  # neither written nor overwritten
  # Its captions are the unseen split's: the references name its combinations.
  captions = held_out_lib.held_out(default_config(), 2, synthetic.UNSEEN_SPLIT)
  first = synthetic.sample_scene(0, synthetic.split_index(synthetic.UNSEEN_SPLIT, 0)).objects[0]
  assert (first.color, first.shape, first.cell) in synthetic.UNSEEN_COMBINATIONS
  refs = [r for it in captions.items["caption"] for r in it.refs["en"]]
  assert any(f"{first.color} {first.shape}" in r for r in refs), refs
  tfds = ml_collections.ConfigDict({"data": {"source": "tfds"}})
  with pytest.raises(evaluate.EvaluationError, match="synthetic world's"):
    held_out_lib.check_split(tfds, synthetic.UNSEEN_SPLIT)
  # The drawings: their own file, their captions scored by what they say.
  evaluate.run_eval(workdir, num_examples=2, split=drawings.SPLIT)
  with open(os.path.join(workdir, "eval_metrics_drawings.json")) as f:
    metrics = json.load(f)["metrics"]
  assert {"caption_color", "caption_all_correct", "vqa_accuracy_position"} <= set(metrics)
  drawn = held_out_lib.held_out(default_config(), 2, drawings.SPLIT).items["caption"]
  assert [it.refs["en"] for it in drawn] == [
    [drawings.make_example(0, i)["caption_en"]] for i in range(2)
  ]


def _scenes(n):
  """uint8 images of the first `n` validation scenes and one question about each."""
  examples = [synthetic.make_example(0, synthetic.split_index("validation", i)) for i in range(n)]
  return [ex["image"] for ex in examples], [ex["qa"][0]["question"] for ex in examples]


@pytest.mark.slow
def test_generate_on_a_tensor_parallel_mesh_equals_one_device(workdir):
  one = generate.load_model(workdir, devices=jax.devices()[:1])
  config = _config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 4
  sharded = generate.load_model(workdir, config=config)
  assert dict(sharded.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4, "expert": 1}
  # Each device holds at most a quarter of the parameters (the rest live on other devices).
  total = sum(x.nbytes for x in jax.tree.leaves(one.params))
  held = partitioning.device_bytes(sharded.params)
  assert len(held) == 8 and max(held.values()) <= total / 4, (max(held.values()), total)
  kernel = sharded.params["layer_0"]["mlp"]["wi"]["kernel"]
  assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
  images, questions = _scenes(6)
  for sources in ([""] * len(images), questions):  # captions, then answers
    batch = generate.make_inputs(one, images, sources)
    want = generate.decode(one, batch)
    assert generate.decode(sharded, batch) == want
    assert any(want)  # it decoded something


@pytest.mark.slow
def test_export_holds_the_parameters_alone_and_generates_the_same(workdir, exported):
  path, printed, logged = exported
  assert "Mesh: {'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}" in logged, logged
  steps = os.listdir(os.path.join(path, "checkpoints"))
  assert steps == [str(STEPS)]
  items = sorted(os.listdir(os.path.join(path, "checkpoints", str(STEPS))))
  assert "params" in items and "state" not in items and "data" not in items
  assert os.path.exists(os.path.join(path, "tokenizer", "spm.model"))
  assert os.path.exists(os.path.join(path, "config.json"))
  sizes = re.search(r"([\d.]+) MiB, against ([\d.]+) MiB", printed)
  assert sizes, printed
  assert float(sizes.group(1)) < float(sizes.group(2)) / 2  # no Adam moments
  for a, b in zip(jax.tree.leaves(saved_params(path)), jax.tree.leaves(saved_params(workdir))):
    np.testing.assert_array_equal(a, b)
  images, _ = _scenes(3)
  model, original = generate.load_model(path), generate.load_model(workdir)
  batch = generate.make_inputs(model, images, [""] * len(images))
  assert generate.decode(model, batch) == generate.decode(original, batch)


@pytest.mark.slow
def test_a_checkpoint_refuses_another_tokenizer(workdir, image_path, tmp_path, run_main):
  other = tokenizer_lib.get_or_train_tokenizer(
    str(tmp_path), vocab_size=700, seed=1, num_corpus_examples=200
  )
  path = os.path.join(str(tmp_path), "tokenizer", "spm.model")
  assert other.vocab_size <= 768
  line = _assert_one_error_line(
    _generate_with_config(run_main, workdir, image_path, f"--config.data.tokenizer_path={path}"),
    "tokenizer mismatch",
    path,
    workdir,
  )
  assert "pieces" in line


def test_inference_uses_the_training_mesh_where_it_fits():
  saved = _config().to_dict()
  saved["mesh"].update(data=1, fsdp=8)
  assert generate.inference_config(saved, None, num_devices=8).mesh.fsdp == 8
  fallback = generate.inference_config(saved, None, num_devices=2)  # fsdp=8 cannot fit
  assert (fallback.mesh.data, fallback.mesh.fsdp) == (-1, 1)
  given = _config()
  given.mesh.data, given.mesh.tensor = 1, 4
  with pytest.raises(ConfigError, match="needs 4 devices"):
    generate.inference_config(saved, given, num_devices=2)  # a given mesh is not replaced


@pytest.fixture(scope="module")
def untrained(workdir):
  """The workdir's model (on one device) with fresh parameters (the decoding methods share
  it)."""
  trained = generate.load_model(workdir, devices=jax.devices()[:1])
  return generate.init_model(trained.config, trained.tokenizer, seed=3, mesh=trained.mesh)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_decoding_never_emits_special_tokens(untrained, method):
  """Not even an untrained model: captions, answers and continuations hold text pieces and
  EOS only (no sentinel, <mask>, <unk>, PAD/BOS, or embedding row past the pieces)."""
  tok = untrained.tokenizer
  allowed = tok.text_token_mask(untrained.config.model.vocab_size)
  assert allowed[tok.eos_id] and not allowed[tok.sentinel_id(0)] and not allowed[tok.mask_id]
  assert not allowed[tok.vocab_size :].any() and not allowed[[0, 2, 3]].any()
  images, questions = _scenes(4)
  batch = generate.make_inputs(untrained, images + [None], [""] * 4 + ["a small red circle"])
  with untrained.mesh_context():
    inputs, _ = partitioning.put_full_batch(batch, untrained.mesh, untrained.rules)
    args = (untrained.model, untrained.params, inputs)
    kwargs = dict(allowed=allowed)
    if method == "greedy":
      ids = decoding.decode(*args, "greedy", 12, tok.bos_id, tok.eos_id, **kwargs)
    elif method == "beam":
      ids = decoding.decode(*args, "beam", 12, tok.bos_id, tok.eos_id, beam_size=3, **kwargs)[0][
        :, 0
      ]
    else:
      ids = decoding.decode(
        *args, "sample", 12, tok.bos_id, tok.eos_id, rng=jax.random.PRNGKey(0), **kwargs
      )
  ids = np.asarray(ids)
  assert (ids != 0).sum() > 10  # it generated tokens
  emitted = ids[ids != 0]  # padding after EOS is not emitted
  assert allowed[emitted].all(), sorted(set(emitted[~allowed[emitted]].tolist()))
  for text in generate.decode(untrained, batch, method):
    assert "<extra_id" not in text and "<mask>" not in text and "<unk>" not in text


# -- damaged checkpoints: generate / eval / export verify them as training does ---------------


LATEST, BEFORE = STEPS, STEPS // 2  # the workdir's two checkpoint steps


def _damaged_copy(workdir, tmp_path, kind):
  """A copy of the workdir whose latest step has damage `kind`."""
  copy = tmp_path / kind
  shutil.copytree(workdir, copy)
  damage_step(str(copy / "checkpoints" / str(LATEST)), kind)
  return copy


# Inference reads no data-iterator position: that damage leaves its parameters readable.
INFERENCE_DAMAGE = [k for k in DAMAGE if k != "deleted_data_iterator"] + ["unverifiable_flip"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", INFERENCE_DAMAGE)
def test_inference_falls_back_past_a_damaged_latest_step(workdir, tmp_path, kind, caplog, capfd):
  """The latest step of a workdir is the newest intact one: a damaged latest step is one
  warning line naming it and what is wrong, left in place, and the step before is loaded;
  nothing of the failed read on the screen. Asked for by number, the damaged step is one
  DamagedCheckpoint naming it. A step without checksums is loaded, with a warning line that
  it cannot be verified."""
  damaged = _damaged_copy(workdir, tmp_path, kind)
  capfd.readouterr()
  with caplog.at_level(logging.INFO):
    model = generate.load_model(str(damaged), devices=jax.devices()[:1])
    gc.collect()
  warnings, noise = warnings_and_noise(caplog.records, capfd.readouterr().err)
  assert noise == [] and len(warnings) == 1, (warnings, noise)
  line, source = warnings[0], f"{damaged}/checkpoints (step {LATEST})"
  if kind == "unverifiable_flip":
    assert model.step == LATEST and f"{source} has no checksums, so it cannot be verified" in line
    return
  assert model.step == BEFORE
  assert line.startswith(f"Checkpoint damaged, {source}: ") and DAMAGE[kind] in line, line
  assert f"left it in place and fall back to step {BEFORE}" in line, line
  assert os.path.lexists(damaged / "checkpoints" / str(LATEST))
  with pytest.raises(DamagedCheckpoint) as error:
    generate.load_model(str(damaged), step=LATEST, devices=jax.devices()[:1])
  message = str(error.value)
  assert message.startswith(f"damaged checkpoint {source}: ") and DAMAGE[kind] in message
  assert f"load another step (others here: {BEFORE})" in message and "\n" not in message


@pytest.mark.slow
def test_a_damaged_best_step_is_one_error(workdir, tmp_path):
  """--best asks for one step: damaged, it is an error naming it, not a fallback."""
  copy = tmp_path / "best"
  shutil.copytree(workdir, copy)
  model = generate.load_model(str(copy), devices=jax.devices()[:1])
  best = checkpoints.Checkpoints(checkpoints.best_dir(str(copy)), 1, "loss", "min")
  best.save(
    LATEST, config=model.config, tokenizer=model.tokenizer, params=model.params, metrics={"loss": 1}
  )
  best.wait()
  damage_step(os.path.join(best.directory, str(LATEST)), "flipped_byte")
  with pytest.raises(DamagedCheckpoint, match=r"array 'params/.*checksum.*instead of the best one"):
    generate.load_model(str(copy), best=True, devices=jax.devices()[:1])


# Per mode, the damage of the latest step: a byte flipped inside a parameter, which only the
# checksums show, or in the index every array is read through, which fails the read.
CLI_DAMAGE = {"generate": "flipped_byte", "eval": "flipped_index_byte", "export": "flipped_byte"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(CLI_DAMAGE))
def test_generate_eval_and_export_verify_the_checkpoint(
  mode, workdir, image_path, tmp_path, run_main
):
  """On a workdir whose latest step is damaged, --mode=generate / eval / export fall back to
  the newest intact step with one warning line (export writes that step's parameters, never
  the damaged ones under fresh checksums); --checkpoint_step=<the damaged step> is one error
  line naming it."""
  damaged = _damaged_copy(workdir, tmp_path, CLI_DAMAGE[mode])
  for written in ("generate.jsonl", "eval_metrics.json"):  # by other tests, into the original
    (damaged / written).unlink(missing_ok=True)
  extra = {
    "generate": [f"--image={image_path}"],
    "eval": ["--num_eval_examples=2"],
    "export": [f"--export_dir={tmp_path / 'export'}"],
  }[mode]
  proc = run_main(f"--mode={mode}", f"--workdir={damaged}", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  noise = [l for l in proc.stderr.splitlines() if any(n in l for n in LIBRARY_NOISE)]
  warnings = [l for l in proc.stderr.splitlines() if l.startswith("W")]
  assert noise == [] and len(warnings) == 1, proc.stderr[-3000:]
  assert f"(step {LATEST}): " in warnings[0] and DAMAGE[CLI_DAMAGE[mode]] in warnings[0]
  assert f"fall back to step {BEFORE}" in warnings[0]
  if mode == "export":
    assert f"exported step {BEFORE} " in proc.stdout, proc.stdout
    assert os.listdir(tmp_path / "export" / "checkpoints") == [str(BEFORE)]
  elif mode == "generate":
    assert json.loads((damaged / "generate.jsonl").read_text())["step"] == BEFORE
  else:
    assert json.loads((damaged / "eval_metrics.json").read_text())["step"] == BEFORE

  needles = ("damaged checkpoint", f"(step {LATEST})", DAMAGE[CLI_DAMAGE[mode]])
  if mode == "generate":  # the CLI's one error line; the other modes load the step as it does
    proc = run_main(f"--mode={mode}", f"--workdir={damaged}", f"--checkpoint_step={LATEST}", *extra)
    _assert_one_error_line(proc, *needles)
    return
  if mode == "eval":
    line = _user_error(evaluate.run_eval, str(damaged), LATEST, num_examples=2)
  else:  # export reads the step with load_model before it writes anything
    line = _user_error(generate.load_model, str(damaged), LATEST)
  assert all(n in line for n in needles), line
