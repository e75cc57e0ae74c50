"""Evaluation on the held-out (validation) split, on the model's mesh.

Two parts:

* **Teacher-forced loss / token accuracy** per enabled task, over the validation pipeline
  (`pipeline.make_dataset(split="validation")`, padded final batch, zero-weight padding),
  with the loss the train step uses (m6_jax/model/loss.py).
* **Generation metrics** by greedy decoding (KV cache), one group per `eval_kind` of the
  registered tasks (m6_jax/data/tasks.py) that the data has inputs for, on the held-out
  inputs and references of `held_out.py` (the synthetic world's validation scenes, or a
  prepared dataset's validation split with every caption of an image and every answer to a
  question as references). Reported: BLEU-4 and CIDEr-D per language and their mean
  (`bleu4`, `cider`), VQA accuracy overall, per question type and per language, and the
  exact match of text continuations (`text_exact_match`).

`run_eval` (``--mode=eval``) loads a workdir's checkpoint onto the config's mesh, writes
`eval_metrics.json` (latest), appends `eval_metrics.jsonl`, and logs `eval/<name>`
TensorBoard scalars; with `baselines=True` it also scores the untrained model and the
most-frequent baseline and prints the comparison table. `PeriodicEvaluator` is what the
train loop calls every `train.eval_every` steps, on the training mesh; it checks at
construction, before training, that `train.eval_metric` can be computed on the data.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from m6_jax.data import pipeline, synthetic, tasks
from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.errors import EvaluationError
from m6_jax.evaluation import baselines, metrics
from m6_jax.evaluation import held_out as held_out_lib
from m6_jax.infer import generate as gen
from m6_jax.model import loss as loss_lib
from m6_jax.model.m6 import M6, M6Config
from m6_jax.parallel import multihost, partitioning

__all__ = ["EvaluationError", "evaluate", "run_eval", "PeriodicEvaluator"]

LANGS = held_out_lib.LANGS
HeldOut = held_out_lib.HeldOut
held_out = held_out_lib.held_out
caption_language = held_out_lib.language


def caption_scores(h: HeldOut, captions: Sequence[str]) -> dict[str, float]:
  """Caption BLEU-4 / CIDEr-D. A caption is generated from the image alone, so the model
  chooses its language: each caption is scored against its image's references in the
  language it is written in (Chinese if it has a Han character), or, when the image has
  none in that language, against those it has. `bleu4_<lang>` / `cider_<lang>` are over
  the captions scored in that language; `bleu4` / `cider` their mean weighted by count."""
  out: dict[str, float] = {}
  langs = []
  for caption, refs in zip(captions, h.caption_refs):
    lang = caption_language(caption)
    langs.append(lang if lang in refs else next(iter(refs)))
  weighted_bleu = weighted_cider = 0.0
  for lang in LANGS:
    rows = [i for i, l in enumerate(langs) if l == lang]
    out[f"captions_{lang}"] = len(rows)
    if not rows:
      continue
    preds, refs = [captions[i] for i in rows], [h.caption_refs[i][lang] for i in rows]
    out[f"bleu4_{lang}"] = metrics.bleu4(preds, refs, lang=lang)
    out[f"cider_{lang}"] = metrics.cider(preds, refs, lang=lang)
    weighted_bleu += out[f"bleu4_{lang}"] * len(rows)
    weighted_cider += out[f"cider_{lang}"] * len(rows)
  out["bleu4"] = weighted_bleu / len(captions)
  out["cider"] = weighted_cider / len(captions)
  out["num_caption_inputs"] = len(captions)
  return out


def vqa_scores(h: HeldOut, answers: Sequence[str]) -> dict[str, float]:
  """VQA accuracy overall, per question type and per language (several reference answers:
  the official min(#matching / 3, 1))."""
  out: dict[str, float] = {}
  vqa = metrics.vqa_accuracy(list(answers), h.vqa_answers, h.vqa_qtypes)
  out["vqa_accuracy"] = vqa["overall"]
  for qtype, value in sorted(vqa["per_type"].items()):
    out[f"vqa_accuracy_{qtype}"] = value
  for lang in LANGS:
    rows = [i for i, l in enumerate(h.vqa_langs) if l == lang]
    if rows:
      out[f"vqa_accuracy_{lang}"] = metrics.vqa_accuracy(
        [answers[i] for i in rows], [h.vqa_answers[i] for i in rows]
      )["overall"]
  out["num_vqa_questions"] = len(answers)
  return out


def text_scores(h: HeldOut, continuations: Sequence[str]) -> dict[str, float]:
  """Exact match (after whitespace stripping) of each continuation with the rest of its
  caption, overall and per language."""
  out: dict[str, float] = {}
  for lang in (None,) + LANGS:
    rows = [i for i, l in enumerate(h.text_langs) if lang in (None, l)]
    if rows:
      name = "text_exact_match" + (f"_{lang}" if lang else "")
      out[name] = metrics.exact_match(
        [continuations[i] for i in rows], [h.text_refs[i] for i in rows], normalize=False
      )
  out["num_text_prompts"] = len(continuations)
  return out


# eval_kind -> (the held-out inputs: (images, source texts), how to score the outputs)
GENERATIONS: dict[str, tuple[Callable, Callable]] = {
  "caption": (lambda h: (h.caption_images, [""] * len(h.caption_images)), caption_scores),
  "vqa": (lambda h: (h.vqa_images, h.vqa_questions), vqa_scores),
  "text": (lambda h: ([None] * len(h.text_prompts), h.text_prompts), text_scores),
}


def eval_tasks() -> dict[str, tasks.Task]:
  """{eval kind: the first registered task of that kind}: what generation evaluates."""
  out: dict[str, tasks.Task] = {}
  for name in tasks.names():
    task = tasks.get(name)
    if task.eval_kind is not None:
      out.setdefault(task.eval_kind, task)
  return out


def generation_metrics(model: gen.LoadedModel, h: HeldOut, batch_size: int = 64) -> dict:
  """Greedy decoding of the held-out inputs of every eval kind the data has, scored."""
  out: dict[str, float] = {}
  tgt_len = int(model.config.data.tgt_len)
  for kind, task in eval_tasks().items():
    if not h.size(kind):
      continue  # e.g. no questions in a captioning dataset
    inputs, score = GENERATIONS[kind]
    images, sources = inputs(h)
    max_len = min(task.decode_len or tgt_len, tgt_len)
    out.update(score(h, gen.decode_in_batches(model, images, sources, batch_size, max_len=max_len)))
  return out


@functools.lru_cache(maxsize=8)
def _sums_fn(model: M6) -> Callable:
  """The jitted per-task loss sums of one validation batch (the train step's loss)."""

  def sums(params, batch):
    _, out = loss_lib.loss_and_sums(
      params, batch, jax.random.PRNGKey(0), model, len(tasks.names()), 0.0, 1.0, True
    )
    return out

  return jax.jit(sums)


def task_losses(model: gen.LoadedModel) -> dict[str, float]:
  """Teacher-forced loss and token accuracy per enabled task on the validation pipeline."""
  dataset = pipeline.make_dataset(
    model.config, model.tokenizer, split="validation", process_index=0, process_count=1
  )
  fn, total = _sums_fn(model.model), None
  with model.mesh_context():
    for batch in dataset:
      inputs, _ = partitioning.put_full_batch(batch, model.mesh, model.rules)
      s = multihost.to_host(fn(model.params, inputs))
      total = s if total is None else jax.tree.map(np.add, total, s)
  out: dict[str, float] = {}
  loss, correct, weight = (
    total["task_loss_sum"],
    total["task_correct_sum"],
    total["task_weight_sum"],
  )
  for i, name in enumerate(tasks.names()):
    if weight[i] > 0:
      out[f"{name}_loss"] = float(loss[i] / weight[i])
      out[f"{name}_accuracy"] = float(correct[i] / weight[i])
  out["loss"] = float(loss.sum() / max(float(weight.sum()), 1.0))
  out["accuracy"] = float(correct.sum() / max(float(weight.sum()), 1.0))
  return out


def evaluate(
  model: gen.LoadedModel, num_examples: int = 0, generation: bool = True, batch_size: int = 64
) -> dict[str, float]:
  """All eval metrics of `model` (`num_examples` validation scenes for generation; 0: the
  config's data.num_eval_examples)."""
  start = time.perf_counter()
  out = task_losses(model)
  if generation:
    n = int(num_examples) or int(model.config.data.num_eval_examples)
    out.update(generation_metrics(model, held_out(model.config, n), batch_size))
  out["eval_seconds"] = time.perf_counter() - start
  return out


class PeriodicEvaluator:
  """`evaluator(step, params) -> metrics`: the train loop's periodic evaluation, on the
  parameters as they are sharded for training (`train.eval_examples` scenes decoded)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    held_out_lib.check_eval_metric(config)  # a ConfigError now, not after training
    self.config, self.workdir = config, workdir
    self.model = M6(M6Config.from_config(config))
    self._tokenizer = None

  def __call__(self, step: int, params: Any) -> dict[str, float]:
    if self._tokenizer is None:  # the loop has made the workdir's tokenizer by now
      path = gen.tokenizer_path(self.workdir, self.config)
      self._tokenizer = tokenizer_lib.load_tokenizer(path)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    rules = partitioning.logical_rules(self.config)
    model = gen.LoadedModel(
      self.config, self.model, params, self._tokenizer, step, self.workdir, mesh, rules
    )
    return evaluate(model, int(self.config.train.eval_examples))


def most_frequent_metrics(config: ml_collections.ConfigDict, h: HeldOut) -> dict[str, float]:
  """Generation metrics of the most-frequent answer / caption baseline: fitted on the texts
  of the first data.tokenizer_corpus_examples (at least 2000) training scenes, or of a
  prepared dataset's train split (its first 20,000 records). Each image gets the most
  frequent caption in its references' language; each question the most frequent answer of
  its (language, question type)."""
  if config.data.get("source", "synthetic") == "tfds":
    answer_table, caption_table = held_out_lib.prepared_train_tables(config, 20000)
  else:
    n = max(int(config.data.get("tokenizer_corpus_examples", 2000)), 2000)
    seed = int(config.seed)
    train = (
      synthetic.scene_texts(synthetic.sample_scene(seed, synthetic.split_index("train", i)))
      for i in range(n)
    )
    answer_table, caption_table = baselines.fit_synthetic(train)
  out: dict[str, float] = {}
  if h.size("caption"):
    keys = [next(iter(refs)) for refs in h.caption_refs]
    out.update(caption_scores(h, baselines.predict(caption_table, keys)))
  if h.size("vqa"):
    answers = baselines.predict(answer_table, list(zip(h.vqa_langs, h.vqa_qtypes)))
    out.update(vqa_scores(h, answers))
  return out


TABLE_KEYS = (
  "vqa_accuracy",
  "bleu4",
  "cider",
  "text_exact_match",
  "bleu4_en",
  "bleu4_zh",
  "cider_en",
  "cider_zh",
)


def comparison_table(rows: dict[str, dict]) -> str:
  """A markdown table: one row per model, columns TABLE_KEYS (missing values as '-')."""
  header = "| model | " + " | ".join(TABLE_KEYS) + " |"
  lines = [header, "|" + " --- |" * (len(TABLE_KEYS) + 1)]
  for name, m in rows.items():
    cells = [f"{m[k]:.2f}" if k in m else "-" for k in TABLE_KEYS]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_results(workdir: str, result: dict[str, Any]) -> None:
  """eval_metrics.json(l) and TensorBoard, from process 0 only (the workdir is shared)."""
  if not multihost.is_primary():
    return
  path = os.path.join(workdir, "eval_metrics.json")
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  with open(os.path.join(workdir, "eval_metrics.jsonl"), "a") as f:
    f.write(json.dumps(result, sort_keys=True) + "\n")
  import tensorboardX

  tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
  for name, value in result["metrics"].items():
    tb.add_scalar(f"eval/{name}", value, result["step"])
  tb.close()


def run_eval(
  workdir: str,
  step: int | None = None,
  config: ml_collections.ConfigDict | None = None,
  best: bool = False,
  num_examples: int = 0,
  with_baselines: bool = False,
) -> dict[str, Any]:
  """--mode=eval: evaluates a checkpoint of `workdir`, writes and returns the results."""
  model = gen.load_model(workdir, step, config=config, best=best)
  logging.info("Evaluating %s step %d on mesh %s", workdir, model.step, dict(model.mesh.shape))
  result: dict[str, Any] = {"step": model.step, "time": time.time(), "best": bool(best)}
  result["metrics"] = evaluate(model, num_examples)
  if with_baselines:
    untrained = gen.init_model(model.config, model.tokenizer, int(model.config.seed), model.mesh)
    n = int(num_examples) or int(model.config.data.num_eval_examples)
    result["baselines"] = {
      "untrained": evaluate(untrained, num_examples),
      "most_frequent": most_frequent_metrics(model.config, held_out(model.config, n)),
    }
    table = comparison_table(
      {
        f"trained (step {model.step})": result["metrics"],
        "untrained (initial parameters)": result["baselines"]["untrained"],
        "most frequent answer / caption": result["baselines"]["most_frequent"],
      }
    )
    result["table"] = table
    print(table)
  write_results(workdir, result)
  m = result["metrics"]
  summary = ", ".join(f"{k} {m[k]:.2f}" for k in TABLE_KEYS[:3] if k in m)
  print(
    f"eval step {model.step}: {summary} (loss {m['loss']:.4f}); wrote "
    f"{os.path.join(workdir, 'eval_metrics.json')}"
  )
  return result
