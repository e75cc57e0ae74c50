"""Evaluation on the held-out (validation) split.

Two parts:

* **Teacher-forced loss / token accuracy** per enabled task, over the validation pipeline
  (`pipeline.make_dataset(split="validation")`, padded final batch, zero-weight padding).
* **Generation metrics** by greedy decoding (KV cache). The references are regenerated
  from the synthetic source by index (the train feature contract stays unchanged): scene
  `i` of the validation split gives one caption input per language (references: the scene's
  caption in that language) and one VQA input per question the scene answers (reference:
  its answer; question type from the world). Reported: BLEU-4 and CIDEr-D per language and
  their mean (`bleu4`, `cider`), VQA accuracy overall, per question type and per language.

`run_eval` (``--mode=eval``) loads a workdir's checkpoint, writes `eval_metrics.json`
(latest), appends `eval_metrics.jsonl`, and logs `eval/<name>` TensorBoard scalars; with
`baselines=True` it also scores the untrained model and the most-frequent baseline and
prints the comparison table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from m6_jax.data import pipeline, synthetic
from m6_jax.data.tasks import TASK_NAMES
from m6_jax.evaluation import baselines, metrics
from m6_jax.infer import generate as gen

VQA_MAX_LEN = 8  # answers are 1-3 pieces; EOS included
LANGS = ("en", "zh")


class EvaluationError(ValueError):
  """Evaluation cannot run with this data or config; the message says why."""


@dataclasses.dataclass
class HeldOut:
  """Generation inputs and references regenerated from the synthetic validation split."""

  caption_images: list[np.ndarray]
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
    image = ex["image"].astype(np.float32) / 255.0
    h.caption_images.append(image)
    h.caption_refs.append({lang: ex[f"caption_{lang}"] for lang in LANGS})
    for qa in ex["qa"]:
      h.vqa_images.append(image)
      h.vqa_questions.append(qa["question"])
      h.vqa_answers.append(qa["answer"])
      h.vqa_qtypes.append(qa["qtype"])
      h.vqa_langs.append(qa["lang"])
  return h


def caption_language(text: str) -> str:
  return "zh" if metrics._CJK_RE.search(text) else "en"


def generation_metrics(h: HeldOut, captions: Sequence[str], answers: Sequence[str]) -> dict:
  """Caption BLEU-4 / CIDEr and VQA accuracy (overall, per question type, per language).

  A caption is generated from the image alone, so the model chooses its language (it was
  trained on both): each caption is scored against the scene's caption in the language it
  is written in (Chinese if it has a Han character). `bleu4_<lang>` / `cider_<lang>` are
  over the captions of that language; `bleu4` / `cider` their mean weighted by count.
  """
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
  out["num_caption_inputs"] = len(captions)
  out["num_vqa_questions"] = len(answers)
  return out


def generate_held_out(
  model: gen.LoadedModel, h: HeldOut, batch_size: int = 64
) -> tuple[list[str], list[str]]:
  captions = gen.decode_in_batches(
    model, h.caption_images, [""] * len(h.caption_images), batch_size
  )
  answers = gen.decode_in_batches(
    model,
    h.vqa_images,
    h.vqa_questions,
    batch_size,
    max_len=min(VQA_MAX_LEN, int(model.config.data.tgt_len)),
  )
  return captions, answers


def _make_sums_fn(model):
  num_tasks = len(TASK_NAMES)

  @jax.jit
  def sums(params, batch):
    logits = model.apply({"params": params}, batch, deterministic=True).astype(jnp.float32)
    w = batch["tgt_weights"].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tgt_target"]) * w
    correct = (jnp.argmax(logits, -1) == batch["tgt_target"]) * w
    onehot = jax.nn.one_hot(batch["task_id"], num_tasks, dtype=jnp.float32)
    return {
      "loss": onehot.T @ losses.sum(1),
      "correct": onehot.T @ correct.sum(1),
      "weight": onehot.T @ w.sum(1),
    }

  return sums


def task_losses(model: gen.LoadedModel) -> dict[str, float]:
  """Teacher-forced loss and token accuracy per enabled task on the validation pipeline."""
  dataset = pipeline.make_dataset(
    model.config, model.tokenizer, split="validation", process_index=0, process_count=1
  )
  fn = _make_sums_fn(model.model)
  total = None
  for batch in dataset:
    s = jax.device_get(fn(model.params, batch))
    total = s if total is None else jax.tree.map(np.add, total, s)
  out: dict[str, float] = {}
  for i, name in enumerate(TASK_NAMES):
    if total["weight"][i] > 0:
      out[f"{name}_loss"] = float(total["loss"][i] / total["weight"][i])
      out[f"{name}_accuracy"] = float(total["correct"][i] / total["weight"][i])
  weight = max(float(total["weight"].sum()), 1.0)
  out["loss"] = float(total["loss"].sum() / weight)
  out["accuracy"] = float(total["correct"].sum() / weight)
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
    h = held_out(model.config, n)
    out.update(generation_metrics(h, *generate_held_out(model, h, batch_size)))
  out["eval_seconds"] = time.perf_counter() - start
  return out


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
  return generation_metrics(h, captions, answers)


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
  if jax.process_index() != 0:
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
  logging.info("Evaluating %s step %d", workdir, model.step)
  result: dict[str, Any] = {"step": model.step, "time": time.time(), "best": bool(best)}
  result["metrics"] = evaluate(model, num_examples)
  if with_baselines:
    untrained = gen.init_model(model.config, model.tokenizer, int(model.config.seed))
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
