"""The held-out inputs and references that generation metrics are computed on, per eval kind
(m6_jax/evaluation/eval_kinds.py: each kind says how its inputs are extracted).

Two sources, one shape (``HeldOut``: {kind: its items}):

* **The synthetic world** (``data.source='synthetic'``): the references are regenerated from
  the validation split by index; each kind extracts its items from scene ``i``
  (``EvalKind.from_example``): e.g. one caption input (references: its caption in each
  language), one VQA input per question it answers, one text prompt.
* **A prepared dataset** (``data.source='tfds'``, ``--mode=prepare_data``) or **streamed
  shards** (``data.source='shards'``, ``data.eval_shards``): its
  ``validation`` split's records, grouped by each kind as the references of its data are
  (``EvalKind.from_records``): every caption of an image is a reference for that image,
  every answer given to the same question about the same image a reference answer (VQA's
  several human answers).

Which generation metrics a dataset can give follows from the records it has
(``available_kinds``): a kind needs records with its field (``EvalKind.field``) and a
prepared-data form. ``check_eval_metric`` checks ``train.eval_metric`` against that before
training starts.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from m6_jax.data import drawings, splits, synthetic
from m6_jax.errors import ConfigError, EvaluationError
from m6_jax.evaluation import baselines, eval_kinds
from m6_jax.evaluation.eval_kinds import Item


@dataclasses.dataclass
class HeldOut:
  """Generation inputs (uint8 images, texts) and their references, per eval kind."""

  items: dict[str, list[Item]] = dataclasses.field(default_factory=dict)

  def size(self, kind: str) -> int:
    return len(self.items.get(kind, ()))


# The splits --mode=eval reads: every data source has a validation split; the synthetic
# world also the scenes of its unseen (colour, shape, cell) combinations and held-out
# drawings of its vocabulary (m6_jax/data/drawings.py).
EVAL_SPLITS = ("validation", synthetic.UNSEEN_SPLIT, drawings.SPLIT)


def check_split(config: ml_collections.ConfigDict, split: str) -> None:
  """An EvaluationError unless the configured data has the eval split ``split``."""
  if split not in EVAL_SPLITS:
    raise EvaluationError(f"unknown eval split {split!r}; use one of {list(EVAL_SPLITS)}")
  if split != "validation" and _has_records(config):
    raise EvaluationError(
      f"the {split} split is the synthetic world's; data.source="
      f"{config.data.get('source')!r} is evaluated on its validation split"
    )


def synthetic_held_out(
  config: ml_collections.ConfigDict, num_examples: int, split: str = "validation"
) -> HeldOut:
  source = splits.synthetic_source(config, split, int(num_examples))
  kinds = [kind for kind, _ in eval_kinds.of_tasks().values()]
  h = HeldOut({kind.name: [] for kind in kinds})
  for i in range(len(source)):
    ex = source[i]
    for kind in kinds:
      h.items[kind.name] += kind.from_example(ex, i)
  return h


def _has_records(config: ml_collections.ConfigDict) -> bool:
  """Whether the configured data is records with their own texts (prepared or shards)."""
  return config.data.get("source", "synthetic") in splits.RECORD_SOURCES


def _prepared_source(config: ml_collections.ConfigDict, split: str, why: str):
  try:
    return splits.split_source(config, split)
  except (FileNotFoundError, ValueError) as e:
    raise EvaluationError(f"{why}: {e}") from None


def _validation_source(config: ml_collections.ConfigDict):
  return _prepared_source(config, "validation", "evaluation reads the validation split")


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _records(source, limit: int | None = None) -> list[dict[str, str]]:
  """The first records of a prepared split as eval kinds read them: image key and texts."""
  from m6_jax.data import sources

  n = len(source) if limit is None else min(len(source), int(limit))
  raw = (source.raw(i) for i in range(n))
  return [{"image_key": _text(r["image_key"]), **sources.record_texts(r)} for r in raw]


def prepared_held_out(config: ml_collections.ConfigDict, num_examples: int) -> HeldOut:
  """Per kind, the items of the first ``num_examples`` images of the validation split that
  have the kind's inputs, with every reference."""
  source = _validation_source(config)
  records = _records(source)
  first: dict[str, int] = {}  # image key -> its first record
  for i, r in enumerate(records):
    first.setdefault(r["image_key"], i)
  images: dict[str, object] = {}

  def image(key: str):
    if key not in images:
      example = source[first[key]]
      if example is None:  # a shard record whose image cannot be decoded: counted, skipped
        raise EvaluationError(
          f"validation image {key} cannot be read ({source.bad.summary()}); remove the "
          "record from the validation shards."
        )
      images[key] = example["image"]
    return images[key]

  h = HeldOut()
  for kind, _ in eval_kinds.of_tasks().values():
    if kind.from_records is not None:
      h.items[kind.name] = kind.from_records(records, int(num_examples), image)
  return h


def prepared_train_pairs(config: ml_collections.ConfigDict, limit: int) -> dict[str, list]:
  """{kind: its baseline's (key, text) pairs} from a prepared dataset's train split (first
  ``limit`` records), for the kinds with a most-frequent baseline."""
  source = _prepared_source(
    config, "train", "the most-frequent baseline is fitted on the train split"
  )
  kinds = [k for k, _ in eval_kinds.of_tasks().values() if k.baseline is not None]
  pairs: dict[str, list] = {k.name: [] for k in kinds}
  for r in _records(source, limit):
    for kind in kinds:
      pairs[kind.name] += kind.baseline.record_pairs(r)
  return pairs


def synthetic_train_pairs(config: ml_collections.ConfigDict, num_scenes: int) -> dict[str, list]:
  """{kind: its baseline's (key, text) pairs} from the texts and objects (no images) of the
  first ``num_scenes`` training scenes of the synthetic world."""
  kinds = [k for k, _ in eval_kinds.of_tasks().values() if k.baseline is not None]
  pairs: dict[str, list] = {k.name: [] for k in kinds}
  seed = int(config.seed)
  for i in range(int(num_scenes)):
    scene = synthetic.sample_scene(seed, synthetic.split_index("train", i))
    ex = {**synthetic.scene_texts(scene), "objects": [o.as_dict() for o in scene.objects]}
    for kind in kinds:
      pairs[kind.name] += kind.baseline.example_pairs(ex)
  return pairs


def baseline_tables(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """{kind: the most-frequent baseline's table}: fitted on the texts of the first
  data.tokenizer_corpus_examples (at least 2000) training scenes, or of a prepared
  dataset's train split (its first 20,000 records)."""
  if _has_records(config):
    pairs = prepared_train_pairs(config, 20000)
  else:
    pairs = synthetic_train_pairs(
      config, max(int(config.data.get("tokenizer_corpus_examples", 2000)), 2000)
    )
  return {kind: baselines.fit(p) for kind, p in pairs.items()}


def held_out(
  config: ml_collections.ConfigDict, num_examples: int, split: str = "validation"
) -> HeldOut:
  """The held-out generation inputs of the configured data (``num_examples`` images of
  ``split``, one of EVAL_SPLITS)."""
  check_split(config, split)
  kind = config.data.get("source", "synthetic")
  if kind == "synthetic":
    return synthetic_held_out(config, num_examples, split)
  if kind in splits.RECORD_SOURCES:
    return prepared_held_out(config, num_examples)
  raise EvaluationError(f"no held-out data for data.source={kind!r}")


def available_kinds(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The eval kinds of the registered tasks that the configured data's validation split has
  records for (the synthetic world has every kind)."""
  kinds = [kind for kind, _ in eval_kinds.of_tasks().values()]
  if not _has_records(config):
    return tuple(k.name for k in kinds)
  source = _validation_source(config)
  return tuple(
    k.name for k in kinds if k.from_records is not None and source.field_count(k.field) > 0
  )


def metric_names(config: ml_collections.ConfigDict) -> tuple[set[str], tuple[str, ...]]:
  """(metric names, name prefixes) an evaluation of the configured data reports."""
  names = {"loss", "accuracy", "eval_seconds"}
  for task, weight in config.data.task_weights.items():
    if weight > 0:
      names |= {f"{task}_loss", f"{task}_accuracy"}
  prefixes: tuple[str, ...] = ()
  for name in available_kinds(config):
    kind = eval_kinds.get(name)
    names |= set(kind.metrics)
    prefixes += kind.prefixes
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
