"""A task in one file: grounding on the synthetic world (image + phrase -> where it is).

The phrase names one object of the scene, "the red circle" ("the second red circle" when
the scene has several red circles, counted in reading order); the target is its cell, "top
left". Everything the task needs is registered here: its record field (the phrase and
location columns prepared user data stores), its Task (example function, generation
inputs) and its EvalKind (`grounding_accuracy`: exact match of the location). Name this
module in data.task_modules to train, evaluate and generate with it (docs/tasks.md):

  PYTHONPATH=tests python -m m6_jax.main --config=configs/base.py:runlocal \\
    --config.data.task_modules=toy_grounding --config.data.task_weights.grounding=1 \\
    --workdir=/tmp/grounding
  PYTHONPATH=tests python -m m6_jax.main --mode=eval --workdir=/tmp/grounding
  PYTHONPATH=tests python -m m6_jax.main --mode=generate --workdir=/tmp/grounding \\
    --task=grounding --image=scene.png --text="the red circle"
"""

from m6_jax.data import fields, tasks
from m6_jax.evaluation import eval_kinds, metrics

ORDINALS = ("first", "second", "third")

# A prepared record's {"phrase": ..., "location": ...} (plain strings in the JSONL line).
fields.register(fields.Field("grounding", ("phrase", "location")))


def scene_phrases(objects: list[dict]) -> list[tuple[str, str]]:
  """(phrase, location) of every object of a synthetic scene, each phrase unambiguous."""
  out = []
  for o in objects:
    alike = [p for p in objects if (p["color"], p["shape"]) == (o["color"], o["shape"])]
    which = "" if len(alike) == 1 else f"{ORDINALS[alike.index(o)]} "
    out.append((f"the {which}{o['color']} {o['shape']}", o["cell_name"]))
  return out


def phrases(example: dict) -> list[tuple[str, str]]:
  """A prepared record's (phrase, location), or those of a synthetic scene's objects."""
  if "phrase" in example:
    return [(example["phrase"], example["location"])] if example["phrase"] else []
  return scene_phrases(example["objects"])


def grounding(example, tokenizer, rng, cfg):
  """Image + a phrase naming an object -> the object's cell."""
  candidates = phrases(example)
  phrase, location = candidates[int(rng.integers(len(candidates)))]
  src = tokenizer.encode(phrase)[: int(cfg.src_len)]
  tgt = tokenizer.encode(location)[: int(cfg.tgt_len) - 1]
  image = example["image"]
  return tasks.make_features(image, image.shape, src, tgt, "grounding", tokenizer, cfg)


def from_example(example, index):
  return [eval_kinds.Item(example["image"], p, [loc]) for p, loc in phrases(example)]


def from_records(records, num_images, image):
  """Every location given for the same phrase about the same image is a reference."""
  groups = eval_kinds.group_references(
    records,
    lambda r: (r["image_key"], r["phrase"]) if r["phrase"] else None,
    lambda r: r["location"],
    num_images,
  )
  return [eval_kinds.Item(image(key), p, locs) for (key, p), locs in groups.items()]


def score(items, outputs):
  refs = [item.refs for item in items]
  accuracy = metrics.exact_match(list(outputs), refs, normalize=False)
  return {"grounding_accuracy": accuracy, "num_grounding_phrases": len(items)}


eval_kinds.register(
  eval_kinds.EvalKind(
    "grounding",
    field="grounding",
    from_example=from_example,
    from_records=from_records,
    score=score,
    metrics=("grounding_accuracy", "num_grounding_phrases"),
    # The most frequent location of all.
    baseline=eval_kinds.Baseline(
      example_pairs=lambda ex: [(None, loc) for _, loc in phrases(ex)],
      record_pairs=lambda r: [(None, r["location"])] if r["phrase"] else [],
      key=lambda item: None,
    ),
    headline=("grounding_accuracy",),
  )
)

tasks.register(
  tasks.Task(
    "grounding",
    grounding,
    needs=("grounding",),
    eval_kind="grounding",
    decode_len=6,  # "bottom right" and EOS
    generation=tasks.Generation(image="required", text="required", text_name="phrase"),
  )
)
