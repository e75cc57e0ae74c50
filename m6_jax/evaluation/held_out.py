"""The held-out inputs and references that generation metrics are computed on.

Two sources, one shape (``HeldOut``):

* **The synthetic world** (``data.source='synthetic'``): the references are regenerated from
  the validation split by index. Scene ``i`` gives one caption input (references: its
  caption in each language), one VQA input per question it answers (reference: its answer;
  question type and language from the world) and one text prompt (the first half of its
  caption, alternately English and Chinese; reference: the rest).
* **A prepared dataset** (``data.source='tfds'``, ``--mode=prepare_data``): its
  ``validation`` split, grouped as the references of captioning and VQA data are: every
  caption of an image is a reference for that image (records are grouped by image key), and
  every answer given to the same question about the same image is a reference answer (VQA's
  several human answers). Question type ``user``; language: Chinese if the text has a Han
  character. The text prompts are the first half of each image's first caption.

Which generation metrics a dataset can give follows from the records it has
(``available_kinds``): captions (and text prompts) need caption records, VQA needs
question/answer records. ``check_eval_metric`` checks ``train.eval_metric`` against that
before training starts.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import ml_collections
import numpy as np

from m6_jax.data import synthetic, tasks
from m6_jax.data.tokenizer import HAN_CHARACTERS
from m6_jax.errors import ConfigError, EvaluationError
from m6_jax.evaluation import baselines

LANGS = ("en", "zh")
_HAN_RE = re.compile(f"[{HAN_CHARACTERS}]")

# eval kind -> the metric names it gives (exact) and name prefixes (per language / type).
KIND_METRICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
  "caption": (("bleu4", "cider", "num_caption_inputs"), ("bleu4_", "cider_", "captions_")),
  "vqa": (("vqa_accuracy", "num_vqa_questions"), ("vqa_accuracy_",)),
  "text": (("text_exact_match", "num_text_prompts"), ("text_exact_match_",)),
}
# eval kind -> the record field its inputs come from (tasks.FIELDS).
KIND_FIELD = {"caption": "caption", "vqa": "qa", "text": "caption"}


def language(text: str) -> str:
  """'zh' if the text has a Han character, else 'en'."""
  return "zh" if _HAN_RE.search(text) else "en"


@dataclasses.dataclass
class HeldOut:
  """Generation inputs (uint8 images, texts) and their references, per eval kind."""

  caption_images: list[np.ndarray] = dataclasses.field(default_factory=list)
  # Per caption input, {language: its reference captions in that language}.
  caption_refs: list[dict[str, list[str]]] = dataclasses.field(default_factory=list)
  vqa_images: list[np.ndarray] = dataclasses.field(default_factory=list)
  vqa_questions: list[str] = dataclasses.field(default_factory=list)
  vqa_answers: list[list[str]] = dataclasses.field(default_factory=list)  # reference answers
  vqa_qtypes: list[str] = dataclasses.field(default_factory=list)
  vqa_langs: list[str] = dataclasses.field(default_factory=list)
  text_prompts: list[str] = dataclasses.field(default_factory=list)
  text_refs: list[str] = dataclasses.field(default_factory=list)
  text_langs: list[str] = dataclasses.field(default_factory=list)

  def size(self, kind: str) -> int:
    return {
      "caption": len(self.caption_images),
      "vqa": len(self.vqa_questions),
      "text": len(self.text_prompts),
    }[kind]

  def add_text_prompt(self, caption: str) -> None:
    """The first half of ``caption`` (words, or characters for Chinese) as a prompt, the
    rest as its reference continuation; captions too short to cut are left out."""
    lang = language(caption)
    if lang == "zh":
      units, sep = list(caption), ""
    else:
      units, sep = caption.split(), " "
    if len(units) < 2:
      return
    cut = len(units) // 2
    self.text_prompts.append(sep.join(units[:cut]))
    self.text_refs.append(sep.join(units[cut:]))
    self.text_langs.append(lang)


def synthetic_held_out(config: ml_collections.ConfigDict, num_examples: int) -> HeldOut:
  source = synthetic.SyntheticWorldSource(
    int(config.seed), "validation", int(num_examples), int(config.data.image_size)
  )
  h = HeldOut()
  for i in range(len(source)):
    ex = source[i]
    h.caption_images.append(ex["image"])
    h.caption_refs.append({lang: [ex[f"caption_{lang}"]] for lang in LANGS})
    for qa in ex["qa"]:
      h.vqa_images.append(ex["image"])
      h.vqa_questions.append(qa["question"])
      h.vqa_answers.append([qa["answer"]])
      h.vqa_qtypes.append(qa["qtype"])
      h.vqa_langs.append(qa["lang"])
    h.add_text_prompt(ex[f"caption_{LANGS[i % 2]}"])
  return h


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _validation_source(config: ml_collections.ConfigDict):
  from m6_jax.data import sources  # imports tensorflow_datasets: only for prepared data

  d = config.data
  try:
    return sources.PreparedSource(d.data_dir, d.tfds_name, "validation", int(d.image_size))
  except (FileNotFoundError, ValueError) as e:
    raise EvaluationError(
      f"evaluation reads the prepared dataset's validation split: {e}"
    ) from None


def prepared_held_out(config: ml_collections.ConfigDict, num_examples: int) -> HeldOut:
  """The first ``num_examples`` images with captions and the questions about the first
  ``num_examples`` images with questions, of the validation split, with every reference."""
  source = _validation_source(config)
  captions: dict[str, list[str]] = collections.OrderedDict()  # image key -> captions
  questions: dict[tuple[str, str], list[str]] = collections.OrderedDict()  # -> answers
  first_record: dict[str, int] = {}
  asked: dict[str, None] = {}  # image keys with questions, in order
  for i in range(len(source)):
    r = source.raw(i)
    key = _text(r["image_key"])
    caption, question, answer = (_text(r[f]) for f in ("caption", "question", "answer"))
    if caption and (key in captions or len(captions) < num_examples):
      captions.setdefault(key, []).append(caption)
      first_record.setdefault(key, i)
    if question and (key in asked or len(asked) < num_examples):
      asked[key] = None
      questions.setdefault((key, question), []).append(answer)
      first_record.setdefault(key, i)
  images = {key: source[i]["image"] for key, i in first_record.items()}
  h = HeldOut()
  for key, refs in captions.items():
    h.caption_images.append(images[key])
    by_lang: dict[str, list[str]] = {}
    for ref in refs:
      by_lang.setdefault(language(ref), []).append(ref)
    h.caption_refs.append(by_lang)
    h.add_text_prompt(refs[0])
  for (key, question), answers in questions.items():
    h.vqa_images.append(images[key])
    h.vqa_questions.append(question)
    h.vqa_answers.append(answers)
    h.vqa_qtypes.append("user")
    h.vqa_langs.append(language(question))
  return h


def prepared_train_tables(config: ml_collections.ConfigDict, limit: int) -> tuple[dict, dict]:
  """The most-frequent baseline's tables from a prepared dataset's train split (first
  ``limit`` records): (answer by (language, 'user'), caption by language)."""
  from m6_jax.data import sources

  d = config.data
  try:
    source = sources.PreparedSource(d.data_dir, d.tfds_name, "train", int(d.image_size))
  except (FileNotFoundError, ValueError) as e:
    raise EvaluationError(f"the most-frequent baseline is fitted on the train split: {e}") from None
  answers, captions = [], []
  for i in range(min(len(source), int(limit))):
    r = source.raw(i)
    caption, question, answer = (_text(r[f]) for f in ("caption", "question", "answer"))
    if caption:
      captions.append((language(caption), caption))
    if question:
      answers.append(((language(question), "user"), answer))
  return baselines.fit(answers), baselines.fit(captions)


def held_out(config: ml_collections.ConfigDict, num_examples: int) -> HeldOut:
  """The held-out generation inputs of the configured data (``num_examples`` images)."""
  kind = config.data.get("source", "synthetic")
  if kind == "synthetic":
    return synthetic_held_out(config, num_examples)
  if kind == "tfds":
    return prepared_held_out(config, num_examples)
  raise EvaluationError(f"no held-out data for data.source={kind!r}")


def available_kinds(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The eval kinds the configured data's validation split has records for (the synthetic
  world has every kind); each must also be the eval kind of a registered task."""
  registered = {tasks.get(n).eval_kind for n in tasks.names()} - {None}
  kinds = [k for k in KIND_METRICS if k in registered]
  if config.data.get("source", "synthetic") != "tfds":
    return tuple(kinds)
  source = _validation_source(config)
  return tuple(k for k in kinds if source.field_count(KIND_FIELD[k]) > 0)


def metric_names(config: ml_collections.ConfigDict) -> tuple[set[str], tuple[str, ...]]:
  """(metric names, name prefixes) an evaluation of the configured data reports."""
  names = {"loss", "accuracy", "eval_seconds"}
  for task, weight in config.data.task_weights.items():
    if weight > 0:
      names |= {f"{task}_loss", f"{task}_accuracy"}
  prefixes: tuple[str, ...] = ()
  for kind in available_kinds(config):
    exact, more = KIND_METRICS[kind]
    names |= set(exact)
    prefixes += more
  return names, prefixes


def check_eval_metric(config: ml_collections.ConfigDict) -> None:
  """ConfigError, before training, if ``train.eval_metric`` cannot be computed on the
  configured data (e.g. ``vqa_accuracy`` on a dataset without questions)."""
  metric = str(config.train.eval_metric)
  try:
    names, prefixes = metric_names(config)
  except EvaluationError as e:
    raise ConfigError(f"{e} (train.eval_every={config.train.eval_every} evaluates)") from None
  if metric in names or metric.startswith(prefixes):
    return
  raise ConfigError(
    f"train.eval_metric='{metric}' cannot be computed on the configured data; it reports "
    f"{sorted(names)} (and per-language / per-type variants of {list(prefixes)}). "
    "Pick one of those, or set train.eval_every=0."
  )
