"""--mode=generate / --mode=eval and fine-tuning (init_from) on one tiny trained workdir."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from m6_jax.config import default_config
from m6_jax.data import synthetic
from m6_jax.evaluation import evaluate
from m6_jax.train import checkpointing, loop


def _config():
  c = default_config()
  c.model.vocab_size = 768
  c.model.d_model = 32
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.data.batch_size = 8
  c.data.src_len = 12
  c.data.tgt_len = 12
  c.data.num_train_examples = 64
  c.data.num_eval_examples = 4
  c.data.tokenizer_corpus_examples = 300
  c.data.task_weights.vqa = 1.0
  c.train.steps = 3
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
  "--config.model.num_heads=2",
  "--config.model.head_dim=16",
  "--config.model.mlp_dim=64",
  "--config.data.src_len=12",
  "--config.data.tgt_len=12",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("trained"))
  loop.train(_config(), path)
  return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("img") / "scene.png")
  ex = synthetic.make_example(0, synthetic.split_index("validation", 0))
  Image.fromarray(ex["image"]).save(path)
  return path


def _assert_one_error_line(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


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
  assert [r["task"] for r in rows] == ["caption", "caption"]
  assert rows[0]["image"] == image_path and rows[0]["step"] == 3
  assert rows[0]["output"] == rows[1]["output"]  # greedy: same image, same caption
  assert f"-> {rows[0]['output']}" in proc.stdout

  proc = run_main(
    "--mode=generate",
    f"--workdir={workdir}",
    f"--image={image_path}",
    "--question=what color is the circle?",
    "--decoding=beam",
    "--beam_size=3",
    "--max_len=4",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(open(os.path.join(workdir, "generate.jsonl")).read().splitlines()[-1])
  assert row["task"] == "vqa" and row["question"] == "what color is the circle?"

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
  assert row["task"] == "text_generation" and row["prompt"] == "a small red circle"


def test_generate_errors_are_one_line(workdir, image_path, tmp_path, run_main):
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
  _assert_one_error_line(
    run_main("--mode=generate", f"--workdir={workdir}", f"--image={tmp_path / 'nope.png'}"),
    "image file not found",
    "nope.png",
  )
  _assert_one_error_line(
    run_main("--mode=generate", f"--workdir={workdir}", f"--image={corrupt}"),
    "cannot read image",
    "corrupt.png",
  )
  _assert_one_error_line(
    run_main("--mode=generate", f"--workdir={workdir}", "--prompt= "), "prompt is empty"
  )
  _assert_one_error_line(
    run_main("--mode=generate", f"--workdir={tmp_path / 'empty'}", f"--image={image_path}"),
    "no checkpoint in",
  )
  # Another config than the checkpoint's: the first mismatching parameter and both shapes.
  line = _assert_one_error_line(
    run_main(
      "--mode=generate",
      f"--workdir={workdir}",
      f"--image={image_path}",
      "--config=configs/base.py",
      *MODEL_FLAGS[:-1],
      "--config.model.mlp_dim=48",
    ),
    "does not fit this config",
    "(64,)",
    "(48,)",
  )
  assert "mlp" in line.lower()


def test_init_from_with_other_shapes_names_the_parameter(workdir, tmp_path):
  config = _config()
  config.model.d_model = 48
  config.init_from = workdir
  with pytest.raises(checkpointing.CheckpointError, match=r"parameter '.*' has shape \(.*32"):
    loop.train(config, str(tmp_path / "ft"))


def test_finetune_from_checkpoint_evaluates_and_keeps_best(workdir, tmp_path):
  params, _, _ = checkpointing.load_params(workdir)
  config = _config()
  config.init_from = workdir
  config.data.task_weights.text_to_text = 0.0
  config.data.task_weights.image_to_text = 0.0
  config.data.task_weights.multimodal_to_text = 0.0
  config.train.steps = 2
  config.train.lr = 0.0  # parameters stay those of init_from: proves they were loaded
  config.train.eval_every = 1
  config.train.eval_metric = "vqa_accuracy"
  ft = str(tmp_path / "ft")
  result = loop.train(config, ft)
  assert result.final_step == 2  # fresh step counter
  loaded = result.state.params
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  best = checkpointing.make_best_manager(ft, "vqa_accuracy")
  assert len(best.all_steps()) == 1 and best.best_step() in (1, 2)
  with (
    open(os.path.join(ft, "tokenizer", "spm.model"), "rb") as f,
    open(os.path.join(workdir, "tokenizer", "spm.model"), "rb") as g,
  ):
    assert f.read() == g.read()  # the pretrained tokenizer was reused
  evals = [json.loads(l) for l in open(os.path.join(ft, "metrics.jsonl")) if "eval_loss" in l]
  assert [e["step"] for e in evals] == [1, 2]


def test_eval_mode_writes_metrics_json(workdir):
  result = evaluate.run_eval(workdir, num_examples=2, with_baselines=True)
  with open(os.path.join(workdir, "eval_metrics.json")) as f:
    saved = json.load(f)
  assert saved["step"] == 3
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
