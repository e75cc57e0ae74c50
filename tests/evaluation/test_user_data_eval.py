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


def _shipped(name, data_dir, tfds_name, **train):
  """configs/<name>.py:runlocal on the prepared dataset, shrunk to a few steps."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
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
