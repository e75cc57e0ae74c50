"""Evaluation and fine-tuning on a prepared user dataset (not the synthetic world): the
shipped fine-tuning configs pointed at it train, evaluate and keep their best checkpoint,
and --mode=eval reports captioning, VQA and text metrics against every reference."""

import importlib.util
import json
import os

import pytest

from m6_jax.checkpoint import checkpoints
from m6_jax.data import prepare
from m6_jax.data import synthetic as S
from m6_jax.errors import ConfigError
from m6_jax.evaluation import evaluate
from m6_jax.evaluation import held_out as H
from m6_jax.train import loop

# Multi-process / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_VALIDATION = 4


def _write_split(root, name, indices, with_questions=True):
  """Images + a JSONL: per image its Chinese and English captions and (optionally) one
  Chinese question with three reference answers, two of them the scene's answer."""
  lines = []
  for i in indices:
    ex = S.make_example(3, i, image_size=32)
    path = root / f"img/{i}.png"
    from PIL import Image

    Image.fromarray(ex["image"]).save(path)
    line = {"image": f"img/{i}.png", "caption": [ex["caption_zh"], ex["caption_en"]]}
    if with_questions:
      qa = next(q for q in ex["qa"] if q["lang"] == "zh")
      line.update(question=qa["question"], answers=[qa["answer"], qa["answer"], "不知道"])
    lines.append(json.dumps(line, ensure_ascii=False))
  (root / name).write_text("\n".join(lines) + "\n")


def _prepare(root, name, with_questions=True):
  (root / "img").mkdir()
  _write_split(root, "train.jsonl", range(16), with_questions)
  _write_split(root, "validation.jsonl", range(100, 100 + NUM_VALIDATION), with_questions)
  out = str(root / "tfds")
  prepare.prepare_data("image_folder_jsonl", str(root), out, name, print_fn=None)
  return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return _prepare(tmp_path_factory.mktemp("user_vqa"), "user_vqa")


def _config_file(name, arg):
  """get_config(arg) of configs/<name>.py."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _shipped(name, data_dir, tfds_name, **train):
  """configs/<name>.py:runlocal on the prepared dataset, shrunk to a few steps."""
  config = _config_file(name, "runlocal")
  config.data.source, config.data.data_dir, config.data.tfds_name = "tfds", data_dir, tfds_name
  config.data.image_size, config.data.batch_size = 32, 8
  config.data.tokenizer_corpus_examples = 100
  config.data.update(src_len=24, tgt_len=24, length_bucket=0)  # one shape to compile
  config.model.update(vocab_size=512, d_model=32, num_layers=1, num_heads=2, head_dim=16)
  config.model.mlp_dim = 64
  config.train.update(steps=2, eval_every=1, eval_examples=NUM_VALIDATION, log_every=1)
  config.train.update(checkpoint_every=2, **train)
  return config


def test_held_out_groups_every_reference(dataset):
  config = _shipped("finetune_vqa", dataset, "user_vqa")
  h = H.held_out(config, 3)
  ex = S.make_example(3, 100, image_size=32)
  captions, questions, texts = h.items["caption"], h.items["vqa"], h.items["text"]
  assert len(captions) == 3 and captions[0].refs == {
    "zh": [ex["caption_zh"]],
    "en": [ex["caption_en"]],
  }
  assert captions[0].image.shape == (32, 32, 3) and captions[0].text == ""
  qa = next(q for q in ex["qa"] if q["lang"] == "zh")
  assert questions[0].text == qa["question"] and questions[0].refs["lang"] == "zh"
  assert questions[0].refs["answers"] == [qa["answer"], qa["answer"], "不知道"]  # 3 answers
  assert len(questions) == 3
  assert texts[0].image is None and texts[0].text + texts[0].refs["rest"] == ex["caption_zh"]
  # the most-frequent baseline is fitted on the train split's texts
  tables = H.baseline_tables(config)
  assert tables["vqa"][("zh", "user")] == "不知道"  # every question's third answer
  assert set(tables["caption"]) == {"zh", "en"} and "text" not in tables


def test_finetune_vqa_then_caption_on_user_data_and_eval(dataset, tmp_path):
  vqa_dir, caption_dir = str(tmp_path / "vqa"), str(tmp_path / "caption")
  config = _shipped("finetune_vqa", dataset, "user_vqa")
  result = loop.train(config, vqa_dir, evaluate.PeriodicEvaluator(config, vqa_dir))
  assert result.final_step == 2
  assert len(checkpoints.open_steps(checkpoints.best_dir(vqa_dir)).steps()) == 1
  evals = [json.loads(x) for x in open(os.path.join(vqa_dir, "metrics.jsonl")) if "eval_" in x]
  assert [e["step"] for e in evals] == [1, 2]
  assert all(0 <= e["eval_vqa_accuracy"] <= 100 for e in evals)
  assert evals[0]["eval_num_vqa_questions"] == NUM_VALIDATION

  config = _shipped("finetune_caption", dataset, "user_vqa", eval_metric="cider")
  config.init_from = vqa_dir
  loop.train(config, caption_dir, evaluate.PeriodicEvaluator(config, caption_dir))
  best = checkpoints.open_steps(checkpoints.best_dir(caption_dir))
  assert len(best.steps()) == 1

  result = evaluate.run_eval(caption_dir, with_baselines=True)
  with open(os.path.join(caption_dir, "eval_metrics.json")) as f:
    m = json.load(f)["metrics"]
  for key in ("image_to_text_loss", "bleu4", "cider", "vqa_accuracy", "text_exact_match"):
    assert key in m, sorted(m)
  assert m["num_caption_inputs"] == NUM_VALIDATION and m["num_vqa_questions"] == NUM_VALIDATION
  assert m["vqa_accuracy_user"] == m["vqa_accuracy"]
  assert "| most frequent answer / caption |" in result["table"]


def test_an_eval_metric_the_data_cannot_give_stops_before_training(tmp_path):
  out = _prepare(tmp_path, "captions_only", with_questions=False)
  config = _shipped("finetune_vqa", out, "captions_only")
  config.data.task_weights.vqa, config.data.task_weights.image_to_text = 0.0, 1.0
  with pytest.raises(ConfigError, match="vqa_accuracy.*cannot be computed.*'cider'"):
    evaluate.PeriodicEvaluator(config, str(tmp_path / "w"))
  config.train.eval_metric = "cider"
  evaluate.PeriodicEvaluator(config, str(tmp_path / "w"))  # computable: no error
  config.data.tfds_name = "no_such_dataset"
  with pytest.raises(ConfigError, match="no prepared dataset 'no_such_dataset'"):
    evaluate.PeriodicEvaluator(config, str(tmp_path / "w"))


def test_finetune_vqa_from_a_caption_user_data_cpu_run(dataset, tmp_path, run_main):
  """docs/your_data.md's path: a `caption_user_data.py:<data>,cpu` run (vocabulary 2048; here
  also 1 layer of width 32 and 24-token texts, to be quick), then the README's fine-tuning
  command, `configs/finetune_vqa.py --config.init_from=<that run>`, on the same dataset: the
  model comes from the checkpoint, not from finetune_vqa.py's defaults (vocabulary 1024)."""
  pretrained = str(tmp_path / "captions")
  config = _config_file("caption_user_data", f"{dataset}/user_vqa,cpu")
  assert config.model.vocab_size == 2048 != _config_file("finetune_vqa", None).model.vocab_size
  config.data.update(image_size=32, batch_size=8, tokenizer_corpus_examples=100)
  config.data.update(src_len=24, tgt_len=24, length_bucket=0)
  config.model.update(num_layers=1, d_model=32, num_heads=2, head_dim=16, mlp_dim=64)
  config.train.update(steps=2, log_every=1, checkpoint_every=2, warmup_steps=0)
  loop.train(config, pretrained)

  command = [
    "--config=configs/finetune_vqa.py:runlocal",
    f"--config.init_from={pretrained}",
    "--config.data.source=tfds",
    f"--config.data.data_dir={dataset}",
    "--config.data.tfds_name=user_vqa",
    "--config.data.batch_size=8",
    "--config.train.steps=2",
    "--config.train.eval_every=2",
    f"--config.train.eval_examples={NUM_VALIDATION}",
  ]
  proc = run_main(*command, f"--workdir={tmp_path / 'vqa'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "vqa" / "config.json") as f:
    saved = json.load(f)
  assert saved["model"] == json.loads(json.dumps(config.model.to_dict())), saved["model"]
  assert (saved["data"]["src_len"], saved["data"]["image_size"]) == (24, 32)
  assert saved["data"]["task_weights"]["vqa"] == 1.0  # the fine-tuning config's own keys
  assert "model.vocab_size=2048 (the config had 1024)" in proc.stderr
  best = checkpoints.open_steps(checkpoints.best_dir(str(tmp_path / "vqa"))).steps()
  assert best == [2]

  # Resumed, it takes the model of its own checkpoint (init_from may be gone by then).
  os.rename(pretrained, f"{pretrained}.moved")
  more = [*command[:-3], "--config.train.steps=3", "--config.train.eval_every=0"]
  proc = run_main(*more, f"--workdir={tmp_path / 'vqa'}")
  assert proc.returncode == 0 and "Resumed from step 2" in proc.stderr, proc.stderr[-3000:]
  os.rename(f"{pretrained}.moved", pretrained)

  # A model key set on the command line is the user's: one error line when it cannot fit.
  proc = run_main(*command, "--config.model.vocab_size=1024", f"--workdir={tmp_path / 'other'}")
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
  assert "has shape (2048, 32) in the checkpoint but (1024, 32) in the model" in errors[0]
  assert "--config.model.vocab_size=1024 (the checkpoint's: 2048)" in errors[0], errors[0]
