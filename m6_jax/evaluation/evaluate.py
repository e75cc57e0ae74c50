"""Evaluation on the held-out (validation) split, on the model's mesh.

Two parts:

* **Teacher-forced loss / token accuracy** per enabled task, over the validation pipeline
  (`pipeline.make_dataset(split="validation")`, padded final batch, zero-weight padding),
  with the loss the train step uses (m6_jax/model/loss.py).
* **Generation metrics** by greedy decoding (KV cache), one group per `eval_kind` of the
  registered tasks (m6_jax/data/tasks.py) that the data has inputs for, on the held-out
  inputs and references of `held_out.py` (the synthetic world's validation scenes, or a
  prepared dataset's validation split with every caption of an image and every answer to a
  question as references), each scored as its kind says (`eval_kinds.py`). Built in:
  BLEU-4 and CIDEr-D per language and their mean (`bleu4`, `cider`), VQA accuracy overall,
  per question type and per language, and the exact match of text continuations
  (`text_exact_match`).

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
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from m6_jax.data import pipeline, tasks
from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.errors import EvaluationError
from m6_jax.evaluation import baselines, eval_kinds, tensorboard
from m6_jax.evaluation import held_out as held_out_lib
from m6_jax.infer import generate as gen
from m6_jax.model import loss as loss_lib
from m6_jax.model.m6 import M6, M6Config
from m6_jax.parallel import multihost, partitioning

__all__ = ["EvaluationError", "evaluate", "run_eval", "PeriodicEvaluator"]

HeldOut = held_out_lib.HeldOut
held_out = held_out_lib.held_out


def generation_metrics(model: gen.LoadedModel, h: HeldOut, batch_size: int = 64) -> dict:
  """Greedy decoding of the held-out inputs of every eval kind the data has, scored."""
  out: dict[str, float] = {}
  tgt_len = int(model.config.data.tgt_len)
  for name, (kind, task) in eval_kinds.of_tasks().items():
    items = h.items.get(name, [])
    if not items:
      continue  # e.g. no questions in a captioning dataset
    images = [it.image for it in items]
    sources = gen.task_sources(task, [it.text for it in items], model.config)
    max_len = min(task.decode_len or tgt_len, tgt_len)
    outputs = gen.decode_in_batches(model, images, sources, batch_size, max_len=max_len)
    out.update(kind.score(items, outputs))
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


def task_losses(model: gen.LoadedModel, split: str = "validation") -> dict[str, float]:
  """Teacher-forced loss and token accuracy per enabled task on the split's pipeline."""
  dataset = pipeline.make_dataset(
    model.config, model.tokenizer, split=split, process_index=0, process_count=1
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
  model: gen.LoadedModel,
  num_examples: int = 0,
  generation: bool = True,
  batch_size: int = 64,
  split: str = "validation",
) -> dict[str, float]:
  """All eval metrics of `model` on `split` (`num_examples` scenes for generation; 0: the
  config's data.num_eval_examples)."""
  start = time.perf_counter()
  out = task_losses(model, split)
  if generation:
    n = int(num_examples) or int(model.config.data.num_eval_examples)
    out.update(generation_metrics(model, held_out(model.config, n, split), batch_size))
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
      clean_up = bool(self.config.data.clean_up_tokenization_spaces)
      self._tokenizer = tokenizer_lib.load_tokenizer(path, clean_up)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    rules = partitioning.logical_rules(self.config)
    model = gen.LoadedModel(
      self.config, self.model, params, self._tokenizer, step, self.workdir, mesh, rules
    )
    return evaluate(model, int(self.config.train.eval_examples))


def most_frequent_metrics(config: ml_collections.ConfigDict, h: HeldOut) -> dict[str, float]:
  """Generation metrics of the most-frequent baseline of each eval kind that has one
  (`EvalKind.baseline`: e.g. the most frequent caption per language, the most frequent
  answer per language and question type), fitted on the training data
  (`held_out.baseline_tables`)."""
  out: dict[str, float] = {}
  tables = None
  for name, (kind, _) in eval_kinds.of_tasks().items():
    if kind.baseline is None or not h.size(name):
      continue
    tables = tables if tables is not None else held_out_lib.baseline_tables(config)
    items = h.items[name]
    predictions = baselines.predict(tables[name], [kind.baseline.key(it) for it in items])
    out.update(kind.score(items, predictions))
  return out


def comparison_table(rows: dict[str, dict]) -> str:
  """A markdown table: one row per model, a column per headline and detail metric of the
  eval kinds (eval_kinds.table_columns; missing values as '-')."""
  columns = eval_kinds.table_columns()
  header = "| model | " + " | ".join(columns) + " |"
  lines = [header, "|" + " --- |" * (len(columns) + 1)]
  for name, m in rows.items():
    cells = [f"{m[k]:.2f}" if k in m else "-" for k in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def results_path(workdir: str, split: str = "validation") -> str:
  """eval_metrics.json (the validation split) or eval_metrics_<split>.json."""
  name = "eval_metrics" if split == "validation" else f"eval_metrics_{split}"
  return os.path.join(workdir, f"{name}.json")


def write_results(workdir: str, result: dict[str, Any], split: str = "validation") -> None:
  """eval_metrics[_<split>].json(l) and TensorBoard (eval/ or eval_<split>/), from process 0
  only (the workdir is shared)."""
  if not multihost.is_primary():
    return
  path = results_path(workdir, split)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  with open(path + "l", "a") as f:
    f.write(json.dumps(result, sort_keys=True) + "\n")
  tb = tensorboard.summary_writer(os.path.join(workdir, "tensorboard"))
  prefix = "eval" if split == "validation" else f"eval_{split}"
  for name, value in result["metrics"].items():
    tb.add_scalar(f"{prefix}/{name}", value, result["step"])
  tb.close()


def run_eval(
  workdir: str,
  step: int | None = None,
  config: ml_collections.ConfigDict | None = None,
  best: bool = False,
  num_examples: int = 0,
  with_baselines: bool = False,
  split: str = "validation",
) -> dict[str, Any]:
  """--mode=eval: evaluates a checkpoint of `workdir` on `split`, writes and returns the
  results."""
  model = gen.load_model(workdir, step, config=config, best=best)
  held_out_lib.check_split(model.config, split)
  logging.info("Evaluating %s step %d on the %s split", workdir, model.step, split)
  result: dict[str, Any] = {"step": model.step, "time": time.time(), "best": bool(best)}
  result["split"] = split
  result["metrics"] = evaluate(model, num_examples, split=split)
  if with_baselines:
    untrained = gen.init_model(model.config, model.tokenizer, int(model.config.seed), model.mesh)
    n = int(num_examples) or int(model.config.data.num_eval_examples)
    result["baselines"] = {
      "untrained": evaluate(untrained, num_examples, split=split),
      "most_frequent": most_frequent_metrics(model.config, held_out(model.config, n, split)),
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
  write_results(workdir, result, split)
  m = result["metrics"]
  headline = [k for kind in eval_kinds.names() for k in eval_kinds.get(kind).headline]
  summary = ", ".join(f"{k} {m[k]:.2f}" for k in headline if k in m)
  on = "" if split == "validation" else f" ({split} split)"
  print(
    f"eval step {model.step}{on}: {summary} (loss {m['loss']:.4f}); wrote "
    f"{results_path(workdir, split)}"
  )
  return result
