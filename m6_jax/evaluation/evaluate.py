"""Evaluation on the held-out (validation) split, on the model's mesh.

Two parts:

* **Teacher-forced loss / token accuracy** per enabled task, over the validation pipeline
  (`pipeline.make_dataset(split="validation")`, padded final batch, zero-weight padding),
  with the loss the train step uses (m6_jax/model/loss.py).
* **Generation metrics** by greedy decoding (KV cache), one group per `eval_kind` of the
  registered tasks (m6_jax/data/tasks.py). The references are regenerated from the
  synthetic source by index: scene `i` of the validation split gives one caption input
  (references: the scene's caption in each language) and one VQA input per question the
  scene answers (reference: its answer; question type from the world). Reported: BLEU-4 and
  CIDEr-D per language and their mean (`bleu4`, `cider`), VQA accuracy overall, per
  question type and per language.

`run_eval` (``--mode=eval``) loads a workdir's checkpoint onto the config's mesh, writes
`eval_metrics.json` (latest), appends `eval_metrics.jsonl`, and logs `eval/<name>`
TensorBoard scalars; with `baselines=True` it also scores the untrained model and the
most-frequent baseline and prints the comparison table. `PeriodicEvaluator` is what the
train loop calls every `train.eval_every` steps, on the training mesh.
"""

from __future__ import annotations

import dataclasses
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
from m6_jax.infer import generate as gen
from m6_jax.model import loss as loss_lib
from m6_jax.model.m6 import M6, M6Config
from m6_jax.parallel import multihost, partitioning

__all__ = ["EvaluationError", "evaluate", "run_eval", "PeriodicEvaluator"]

LANGS = ("en", "zh")


@dataclasses.dataclass
class HeldOut:
  """Generation inputs and references regenerated from the synthetic validation split."""

  caption_images: list[np.ndarray]  # uint8
  caption_refs: list[dict[str, str]]  # {"en": caption, "zh": caption} of the scene
  vqa_images: list[np.ndarray]
  vqa_questions: list[str]
  vqa_answers: list[str]
  vqa_qtypes: list[str]
  vqa_langs: list[str]


def held_out(config: ml_collections.ConfigDict, num_examples: int) -> HeldOut:
  if config.data.get("source", "synthetic") != "synthetic":
    raise EvaluationError(
      "generation metrics need the synthetic source (references are regenerated from it); "
      f"data.source={config.data.source!r}."
    )
  source = synthetic.SyntheticWorldSource(
    int(config.seed), "validation", int(num_examples), int(config.data.image_size)
  )
  h = HeldOut([], [], [], [], [], [], [])
  for i in range(len(source)):
    ex = source[i]
    h.caption_images.append(ex["image"])
    h.caption_refs.append({lang: ex[f"caption_{lang}"] for lang in LANGS})
    for qa in ex["qa"]:
      h.vqa_images.append(ex["image"])
      h.vqa_questions.append(qa["question"])
      h.vqa_answers.append(qa["answer"])
      h.vqa_qtypes.append(qa["qtype"])
      h.vqa_langs.append(qa["lang"])
  return h


def caption_language(text: str) -> str:
  return "zh" if metrics._CJK_RE.search(text) else "en"


def caption_scores(h: HeldOut, captions: Sequence[str]) -> dict[str, float]:
  """Caption BLEU-4 / CIDEr-D. A caption is generated from the image alone, so the model
  chooses its language (it was trained on both): each caption is scored against the scene's
  caption in the language it is written in (Chinese if it has a Han character).
  `bleu4_<lang>` / `cider_<lang>` are over the captions of that language; `bleu4` / `cider`
  their mean weighted by count."""
  out: dict[str, float] = {}
  langs = [caption_language(c) for c in captions]
  weighted_bleu = weighted_cider = 0.0
  for lang in LANGS:
    rows = [i for i, l in enumerate(langs) if l == lang]
    out[f"captions_{lang}"] = len(rows)
    if not rows:
      continue
    preds, refs = [captions[i] for i in rows], [[h.caption_refs[i][lang]] for i in rows]
    out[f"bleu4_{lang}"] = metrics.bleu4(preds, refs, lang=lang)
    out[f"cider_{lang}"] = metrics.cider(preds, refs, lang=lang)
    weighted_bleu += out[f"bleu4_{lang}"] * len(rows)
    weighted_cider += out[f"cider_{lang}"] * len(rows)
  out["bleu4"] = weighted_bleu / len(captions)
  out["cider"] = weighted_cider / len(captions)
  out["num_caption_inputs"] = len(captions)
  return out


def vqa_scores(h: HeldOut, answers: Sequence[str]) -> dict[str, float]:
  """VQA accuracy overall, per question type and per language."""
  out: dict[str, float] = {}
  vqa = metrics.vqa_accuracy(list(answers), [[a] for a in h.vqa_answers], h.vqa_qtypes)
  out["vqa_accuracy"] = vqa["overall"]
  for qtype, value in sorted(vqa["per_type"].items()):
    out[f"vqa_accuracy_{qtype}"] = value
  for lang in LANGS:
    rows = [i for i, l in enumerate(h.vqa_langs) if l == lang]
    if rows:
      out[f"vqa_accuracy_{lang}"] = metrics.vqa_accuracy(
        [answers[i] for i in rows], [[h.vqa_answers[i]] for i in rows]
      )["overall"]
  out["num_vqa_questions"] = len(answers)
  return out


# eval_kind -> (the held-out inputs: (images, source texts), how to score the outputs)
GENERATIONS: dict[str, tuple[Callable, Callable]] = {
  "caption": (lambda h: (h.caption_images, [""] * len(h.caption_images)), caption_scores),
  "vqa": (lambda h: (h.vqa_images, h.vqa_questions), vqa_scores),
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
  """Greedy decoding of the held-out inputs of every eval kind, scored."""
  out: dict[str, float] = {}
  tgt_len = int(model.config.data.tgt_len)
  for kind, task in eval_tasks().items():
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
    self.config, self.workdir = config, workdir
    self.model = M6(M6Config.from_config(config))
    self._tokenizer = None

  def __call__(self, step: int, params: Any) -> dict[str, float]:
    if self._tokenizer is None:  # the loop has made the workdir's tokenizer by now
      path = gen.tokenizer_path(self.workdir, self.config)
      self._tokenizer = tokenizer_lib.Tokenizer.from_file(path)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    rules = partitioning.logical_rules(self.config)
    model = gen.LoadedModel(
      self.config, self.model, params, self._tokenizer, step, self.workdir, mesh, rules
    )
    return evaluate(model, int(self.config.train.eval_examples))


def most_frequent_metrics(config: ml_collections.ConfigDict, h: HeldOut) -> dict[str, float]:
  """Generation metrics of the most-frequent answer / caption baseline, fitted on the
  texts of the first data.tokenizer_corpus_examples (at least 2000) training scenes."""
  n = max(int(config.data.get("tokenizer_corpus_examples", 2000)), 2000)
  seed = int(config.seed)
  train = (
    synthetic.scene_texts(synthetic.sample_scene(seed, synthetic.split_index("train", i)))
    for i in range(n)
  )
  answer_table, caption_table = baselines.fit_synthetic(train)
  # Every image gets the most frequent English training caption.
  captions = baselines.predict(caption_table, ["en"] * len(h.caption_images))
  answers = baselines.predict(answer_table, list(zip(h.vqa_langs, h.vqa_qtypes)))
  return {**caption_scores(h, captions), **vqa_scores(h, answers)}


TABLE_KEYS = ("vqa_accuracy", "bleu4", "cider", "bleu4_en", "bleu4_zh", "cider_en", "cider_zh")


def comparison_table(rows: dict[str, dict]) -> str:
  """A markdown table: one row per model, columns TABLE_KEYS (missing values as '-')."""
  header = "| model | " + " | ".join(TABLE_KEYS) + " |"
  lines = [header, "|" + " --- |" * (len(TABLE_KEYS) + 1)]
  for name, m in rows.items():
    cells = [f"{m[k]:.2f}" if k in m else "-" for k in TABLE_KEYS]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _write(workdir: str, result: dict[str, Any]) -> None:
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
  _write(workdir, result)
  m = result["metrics"]
  summary = ", ".join(f"{k} {m[k]:.2f}" for k in TABLE_KEYS[:3] if k in m)
  print(
    f"eval step {model.step}: {summary} (loss {m['loss']:.4f}); wrote "
    f"{os.path.join(workdir, 'eval_metrics.json')}"
  )
  return result
