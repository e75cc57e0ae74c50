"""The eval kinds: how the generations of a task are evaluated, one registry entry each.

A task names its eval kind (``Task.eval_kind`` in m6_jax/data/tasks.py); evaluation looks it
up here. An ``EvalKind`` says

  * how held-out inputs are extracted, as ``Item``s (an image or None, the task's text, the
    references): from an example of the synthetic world's validation split
    (``from_example``), and from the records of a prepared dataset's validation split
    (``from_records``; None when the kind has no prepared-data form), grouping references
    as the data has them (``group_references``);
  * the record field its inputs come from (``field``, m6_jax/data/fields.py): a prepared
    dataset without it does not offer the kind;
  * how the outputs are scored (``score(items, outputs) -> {metric: value}``) and the metric
    names that gives (``metrics`` exactly, and the per-language / per-type ``prefixes``);
  * optionally its most-frequent baseline (``baseline``), and its columns of the comparison
    table of ``--mode=eval --baselines`` (``headline``, also on the summary line, and
    ``details``; kinds in registration order).

Built in: ``caption`` (BLEU-4 / CIDEr-D against the image's captions, per language),
``vqa`` (VQA accuracy overall, per question type and per language) and ``text`` (exact
match of a text's continuation). A task module (``data.task_modules``) registers its own
beside its task (docs/tasks.md).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

from m6_jax.data import fields, scripts, synthetic, tasks
from m6_jax.errors import EvaluationError
from m6_jax.evaluation import metrics, scene_scores

LANGS = scripts.LANGUAGES
OBJECTS = "objects"  # a synthetic caption item's scene objects, beside its references

# A prepared dataset's record as eval kinds read it: "image_key" and every field's columns.
Record = Mapping[str, str]


def language(text: str) -> str:
  """'zh' if the text has a Han character, else 'en'."""
  return "zh" if scripts.has_han(text) else "en"


@dataclasses.dataclass(frozen=True)
class Item:
  """One held-out generation input and what its output is scored against."""

  image: np.ndarray | None  # uint8 [H, W, 3], or None for a text-only input
  text: str  # the task's text input ("" when it takes none)
  refs: Any  # the references, as the kind's score function reads them


@dataclasses.dataclass(frozen=True)
class Baseline:
  """The most-frequent baseline: the (key, text) pairs of a training example (the synthetic
  world's texts and objects, no image) or record, and each held-out item's key. An item gets
  the most frequent text of its key (an unseen key: the most frequent of all)."""

  example_pairs: Callable[[dict], Iterable[tuple[Hashable, str]]]
  record_pairs: Callable[[Record], Iterable[tuple[Hashable, str]]]
  key: Callable[[Item], Hashable]


@dataclasses.dataclass(frozen=True)
class EvalKind:
  """How the generations of the tasks of this kind are extracted, scored and reported."""

  name: str
  field: str
  from_example: Callable[[dict, int], list[Item]]  # (example, its index in the split)
  # (validation records, how many images, image of an image key) -> items; None: no form.
  from_records: Callable[[Sequence[Record], int, Callable[[str], np.ndarray]], list[Item]] | None
  score: Callable[[Sequence[Item], Sequence[str]], dict[str, float]]
  metrics: tuple[str, ...]
  prefixes: tuple[str, ...] = ()
  baseline: Baseline | None = None
  headline: tuple[str, ...] = ()
  details: tuple[str, ...] = ()


_REGISTRY: dict[str, EvalKind] = {}


def register(kind: EvalKind) -> EvalKind:
  """Adds an eval kind; returns it."""
  if not kind.name.isidentifier() or kind.name in _REGISTRY:
    raise ValueError(f"eval kind name {kind.name!r} must be a new identifier; have {names()}")
  if kind.field not in fields.names():
    raise ValueError(
      f"eval kind {kind.name!r} reads the unknown record field {kind.field!r}; "
      f"the registered fields are {list(fields.names())}"
    )
  _REGISTRY[kind.name] = kind
  return kind


def unregister(name: str) -> None:
  """Removes an eval kind (tests that register their own use this to clean up)."""
  del _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> EvalKind:
  if name not in _REGISTRY:
    raise EvaluationError(
      f"unknown eval kind {name!r}; the registered ones are {list(names())} (a task module "
      "registers its own with m6_jax.evaluation.eval_kinds.register)"
    )
  return _REGISTRY[name]


def of_tasks() -> dict[str, tuple[EvalKind, tasks.Task]]:
  """{kind name: (the kind, the first registered task of that kind)}, in task order: what
  generation evaluates. EvaluationError for a task whose eval kind is not registered."""
  out: dict[str, tuple[EvalKind, tasks.Task]] = {}
  for name in tasks.names():
    task = tasks.get(name)
    if task.eval_kind is None or task.eval_kind in out:
      continue
    try:
      out[task.eval_kind] = (get(task.eval_kind), task)
    except EvaluationError as e:
      raise EvaluationError(f"task {name!r} names its eval_kind: {e}") from None
  return out


def table_columns() -> tuple[str, ...]:
  """The comparison table's columns: every kind's headline metrics, then its details."""
  kinds = _REGISTRY.values()
  return tuple(m for k in kinds for m in k.headline) + tuple(m for k in kinds for m in k.details)


def group_references(
  records: Iterable[Record],
  group_of: Callable[[Record], Hashable | None],
  reference: Callable[[Record], str],
  num_images: int,
) -> dict[Hashable, list[str]]:
  """{group: its references} over the records of the first ``num_images`` images that have
  a group (``group_of`` None: the record has nothing for this kind), in order: e.g. every
  caption of an image, or every answer to one question about one image."""
  out: dict[Hashable, list[str]] = collections.OrderedDict()
  images: dict[str, None] = {}
  for r in records:
    group = group_of(r)
    if group is None:
      continue
    key = r["image_key"]
    if key in images or len(images) < num_images:
      images[key] = None
      out.setdefault(group, []).append(reference(r))
  return out


# --------------------------------------------------------------------------------------
# vqa: image + question -> answer
# --------------------------------------------------------------------------------------


def _vqa_from_example(ex: dict, i: int) -> list[Item]:
  return [
    Item(ex["image"], qa["question"], {"answers": [qa["answer"]], **_qtype_lang(qa)})
    for qa in ex["qa"]
  ]


def _qtype_lang(qa: Mapping[str, str]) -> dict[str, str]:
  return {"qtype": qa["qtype"], "lang": qa["lang"]}


def _vqa_from_records(records, num_images: int, image) -> list[Item]:
  """Every answer given to the same question about the same image is a reference (VQA's
  several human answers); question type "user", language from the question's text."""
  groups = group_references(
    records,
    lambda r: (r["image_key"], r["question"]) if r["question"] else None,
    lambda r: r["answer"],
    num_images,
  )
  return [
    Item(image(key), question, {"answers": answers, "qtype": "user", "lang": language(question)})
    for (key, question), answers in groups.items()
  ]


def vqa_scores(items: Sequence[Item], answers: Sequence[str]) -> dict[str, float]:
  """VQA accuracy overall, per question type and per language (several reference answers:
  the official min(#matching / 3, 1))."""
  out: dict[str, float] = {}
  refs = [it.refs["answers"] for it in items]
  vqa = metrics.vqa_accuracy(list(answers), refs, [it.refs["qtype"] for it in items])
  out["vqa_accuracy"] = vqa["overall"]
  for qtype, value in sorted(vqa["per_type"].items()):
    out[f"vqa_accuracy_{qtype}"] = value
  for lang in LANGS:
    rows = [i for i, it in enumerate(items) if it.refs["lang"] == lang]
    if rows:
      out[f"vqa_accuracy_{lang}"] = metrics.vqa_accuracy(
        [answers[i] for i in rows], [refs[i] for i in rows]
      )["overall"]
  out["num_vqa_questions"] = len(answers)
  return out


register(
  EvalKind(
    "vqa",
    field="qa",
    from_example=_vqa_from_example,
    from_records=_vqa_from_records,
    score=vqa_scores,
    metrics=("vqa_accuracy", "num_vqa_questions"),
    prefixes=("vqa_accuracy_",),
    # The answer seen most often per (language, question type): the usual "prior" baseline.
    baseline=Baseline(
      example_pairs=lambda ex: [((qa["lang"], qa["qtype"]), qa["answer"]) for qa in ex["qa"]],
      record_pairs=lambda r: (
        [((language(r["question"]), "user"), r["answer"])] if r["question"] else []
      ),
      key=lambda it: (it.refs["lang"], it.refs["qtype"]),
    ),
    headline=("vqa_accuracy",),
  )
)


# --------------------------------------------------------------------------------------
# caption: image -> caption
# --------------------------------------------------------------------------------------


def _caption_from_example(ex: dict, i: int) -> list[Item]:
  objects = tuple(
    synthetic.SceneObject(o["shape"], o["color"], o["size"], o["cell"]) for o in ex["objects"]
  )
  refs = {lang: [ex[f"caption_{lang}"]] for lang in LANGS}
  return [Item(ex["image"], "", {**refs, OBJECTS: objects})]


def _caption_groups(records, num_images: int) -> dict[Hashable, list[str]]:
  """{image key: its captions}: every caption of an image is a reference for it."""
  return group_references(
    records, lambda r: r["image_key"] if r["caption"] else None, lambda r: r["caption"], num_images
  )


def _caption_from_records(records, num_images: int, image) -> list[Item]:
  items = []
  for key, refs in _caption_groups(records, num_images).items():
    by_lang: dict[str, list[str]] = {}
    for ref in refs:
      by_lang.setdefault(language(ref), []).append(ref)
    items.append(Item(image(key), "", by_lang))
  return items


def caption_scores(items: Sequence[Item], captions: Sequence[str]) -> dict[str, float]:
  """Caption BLEU-4 / CIDEr-D. A caption is generated from the image alone, so the model
  chooses its language: each caption is scored against its image's references in the
  language it is written in (Chinese if it has a Han character), or, when the image has
  none in that language, against those it has. `bleu4_<lang>` / `cider_<lang>` are over
  the captions scored in that language; `bleu4` / `cider` their mean weighted by count."""
  out: dict[str, float] = {}
  langs = []
  for caption, item in zip(captions, items):
    lang = language(caption)
    langs.append(lang if lang in item.refs else _caption_langs(item)[0])
  weighted_bleu = weighted_cider = 0.0
  for lang in LANGS:
    rows = [i for i, l in enumerate(langs) if l == lang]
    out[f"captions_{lang}"] = len(rows)
    if not rows:
      continue
    preds, refs = [captions[i] for i in rows], [items[i].refs[lang] for i in rows]
    out[f"bleu4_{lang}"] = metrics.bleu4(preds, refs, lang=lang)
    out[f"cider_{lang}"] = metrics.cider(preds, refs, lang=lang)
    weighted_bleu += out[f"bleu4_{lang}"] * len(rows)
    weighted_cider += out[f"cider_{lang}"] * len(rows)
  out["bleu4"] = weighted_bleu / len(captions)
  out["cider"] = weighted_cider / len(captions)
  out["num_caption_inputs"] = len(captions)
  if all(OBJECTS in item.refs for item in items):
    out.update(caption_object_scores(items, captions))
  return out


def _caption_langs(item: Item) -> list[str]:
  return [lang for lang in item.refs if lang in LANGS]


def caption_object_scores(items: Sequence[Item], captions: Sequence[str]) -> dict[str, float]:
  """For the synthetic world's scenes: what the captions say, read by the world's grammar,
  scored as text-to-image images are (m6_jax/evaluation/scene_scores.py), in percent.
  Per object, at its cell: ``caption_position`` (the caption describes that cell),
  ``caption_shape`` / ``caption_color`` / ``caption_size`` (and names it right there); per
  caption: ``caption_count`` (as many places described as objects) and
  ``caption_all_correct`` (every object right, nothing else); and, less strictly,
  ``caption_named``: per object, one description names its colour and shape together,
  wherever the caption puts it."""
  scenes = [item.refs[OBJECTS] for item in items]
  said = [synthetic.read_caption(caption) for caption in captions]
  scores = scene_scores.score_predictions(scene_scores.caption_readings(said), scenes)
  out = {
    f"caption_{name}": 100.0 * scores[name]
    for name in scene_scores.OBJECT_SCORES + scene_scores.IMAGE_SCORES
  }
  named = [
    any((d["color"], d["shape"]) == (o.color, o.shape) for d in descriptions)
    for descriptions, objects in zip(said, scenes)
    for o in objects
  ]
  out["caption_named"] = 100.0 * sum(named) / len(named)
  return out


register(
  EvalKind(
    "caption",
    field="caption",
    from_example=_caption_from_example,
    from_records=_caption_from_records,
    score=caption_scores,
    metrics=("bleu4", "cider", "num_caption_inputs"),
    prefixes=("bleu4_", "cider_", "captions_", "caption_"),
    # The caption seen most often per language; an image gets that of its references' first.
    baseline=Baseline(
      example_pairs=lambda ex: [(lang, ex[f"caption_{lang}"]) for lang in LANGS],
      record_pairs=lambda r: [(language(r["caption"]), r["caption"])] if r["caption"] else [],
      key=lambda it: _caption_langs(it)[0],
    ),
    headline=("bleu4", "cider"),
    details=("bleu4_en", "bleu4_zh", "cider_en", "cider_zh", "caption_all_correct"),
  )
)


# --------------------------------------------------------------------------------------
# text: the first half of a caption -> the rest of it
# --------------------------------------------------------------------------------------


def _text_prompt(caption: str) -> list[Item]:
  """The first half of ``caption`` (words, or characters for Chinese) as a prompt, the rest
  as its reference continuation; captions too short to cut give none."""
  lang = language(caption)
  units, sep = (list(caption), "") if lang == "zh" else (caption.split(), " ")
  if len(units) < 2:
    return []
  cut = len(units) // 2
  return [Item(None, sep.join(units[:cut]), {"rest": sep.join(units[cut:]), "lang": lang})]


def _text_from_records(records, num_images: int, image) -> list[Item]:
  """The first half of each image's first caption."""
  groups = _caption_groups(records, num_images)
  return [item for refs in groups.values() for item in _text_prompt(refs[0])]


def text_scores(items: Sequence[Item], continuations: Sequence[str]) -> dict[str, float]:
  """Exact match (after whitespace stripping) of each continuation with the rest of its
  caption, overall and per language."""
  out: dict[str, float] = {}
  for lang in (None,) + LANGS:
    rows = [i for i, it in enumerate(items) if lang in (None, it.refs["lang"])]
    if rows:
      name = "text_exact_match" + (f"_{lang}" if lang else "")
      out[name] = metrics.exact_match(
        [continuations[i] for i in rows], [items[i].refs["rest"] for i in rows], normalize=False
      )
  out["num_text_prompts"] = len(continuations)
  return out


register(
  EvalKind(
    "text",
    field="caption",
    # Scene i's prompt is from its caption in English and Chinese alternately.
    from_example=lambda ex, i: _text_prompt(ex[f"caption_{LANGS[i % 2]}"]),
    from_records=_text_from_records,
    score=text_scores,
    metrics=("text_exact_match", "num_text_prompts"),
    prefixes=("text_exact_match_",),
    headline=("text_exact_match",),
  )
)
