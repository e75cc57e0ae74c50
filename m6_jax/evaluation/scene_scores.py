"""Scores of images against the synthetic scenes they should show, from per-cell readings.

The scene judge (``scene_judge``) reads, for each of the 9 grid cells of an image, a shape
(or "empty"), a colour and a size; this module turns such readings into the text-to-image
scores, and holds the measures that need no network: the chance levels and the Fréchet
distance. Everything here is numpy on plain arrays, so the scoring is exact and testable
with readings one controls.

**Scoring** (``score_predictions``, ``attribute_accuracy``) is strict: every attribute of
a stated object is judged at the object's stated cell, so an object drawn in the wrong cell
counts as wrong position, shape, colour and size alike. The per-object scores are averaged
over all stated objects, ``count`` and ``all_correct`` over images.

**Fréchet distance** (``frechet_distance``) on the judge's features is this project's own
distribution metric for the synthetic world: it compares generated and real images in the
space the judge learned to tell scenes apart in. It is *not* FID as reported on COCO (that
uses Inception-v3 features on natural images); its values are comparable only with each
other, at equal sample sizes (the estimate is biased upward for small samples).
"""

from __future__ import annotations

import math
from typing import Mapping, Protocol, Sequence

import numpy as np
from PIL import Image

from m6_jax.data import synthetic
from m6_jax.errors import EvaluationError

NUM_CELLS = 9
EMPTY = 0  # shape class 0 is an empty cell; class k + 1 is synthetic.SHAPES[k]
UNREAD = -1  # an occupied cell whose attribute a caption does not state: never right
COLOR_NAMES = tuple(synthetic.COLORS)
OBJECT_SCORES = ("position", "shape", "color", "size")
IMAGE_SCORES = ("count", "all_correct")
Objects = Sequence[synthetic.SceneObject]
# Each attribute's class index per cell, as the judge predicts it.
CLASS_OF = {
  "shape": lambda shape: 1 + synthetic.SHAPES.index(shape),
  "color": COLOR_NAMES.index,
  "size": synthetic.SIZES.index,
}


def scene_targets(scenes: Sequence[synthetic.Scene | Objects]) -> dict[str, np.ndarray]:
  """The truth per cell, int32 [b, 9] each: ``shape`` (EMPTY or 1 + index in SHAPES),
  ``color`` (index in COLORS) and ``size`` (index in SIZES); 0 where a cell is empty.
  A scene may be given as its objects alone (all that scoring reads of it)."""
  out = {k: np.zeros((len(scenes), NUM_CELLS), np.int32) for k in CLASS_OF}
  for i, scene in enumerate(scenes):
    for o in getattr(scene, "objects", scene):
      for k, class_of in CLASS_OF.items():
        out[k][i, o.cell] = class_of(getattr(o, k))
  return out


def caption_readings(said: Sequence[list[dict]]) -> dict[str, np.ndarray]:
  """What captions say (each caption's ``synthetic.read_caption``), as the judge's per-cell
  predictions: each description that names a cell occupies it with its shape, colour and
  size; a word it lacks (or a second description of the same cell) reads as UNREAD, which
  matches nothing. ``score_predictions`` of these against the scenes scores captions as
  images are scored."""
  out = {k: np.zeros((len(said), NUM_CELLS), np.int32) for k in CLASS_OF}
  for i, descriptions in enumerate(said):
    described = set()
    for d in descriptions:
      cell = d["cell"]
      if cell is None:
        continue
      twice = cell in described
      described.add(cell)
      for k, class_of in CLASS_OF.items():
        out[k][i, cell] = UNREAD if twice or d[k] is None else class_of(d[k])
  return out


def world_scenes(seed: int, split: str, num: int) -> list[synthetic.Scene]:
  """The first ``num`` scenes of a split of the world ``seed``."""
  return [synthetic.sample_scene(seed, synthetic.split_index(split, i)) for i in range(num)]


def render(scenes: Sequence[synthetic.Scene], image_size: int = 48) -> np.ndarray:
  """uint8 [b, s, s, 3]: the renderer's images of ``scenes``."""
  return np.stack([synthetic.render_scene(s, image_size) for s in scenes])


class Predictor(Protocol):
  def predict(self, images: np.ndarray) -> Mapping[str, np.ndarray]: ...


def score_predictions(
  predictions: Mapping[str, np.ndarray], scenes: Sequence[synthetic.Scene]
) -> dict[str, float]:
  """How well per-cell predictions (``Judge.predict``'s dict) show the stated scenes.

  Per stated object (averaged over all objects of all scenes), judged at its stated cell c:
    position: c is predicted occupied (shape != EMPTY);
    shape:    the predicted shape at c is the stated shape;
    color:    c is predicted occupied and its predicted colour is the stated one;
    size:     c is predicted occupied and its predicted size is the stated one.
  A wrong position is thus also a wrong shape, colour and size (the strict reading: an
  object is only "red" if it is where the caption says). Per image (averaged over images):
    count:       the number of predicted occupied cells is the number of stated objects;
    all_correct: every stated object right in all four and no other cell occupied.
  Also returns ``num_images`` and ``num_objects``.
  """
  shape, color, size = (np.asarray(predictions[k]) for k in ("shape", "color", "size"))
  if shape.shape != (len(scenes), NUM_CELLS):
    raise EvaluationError(
      f"predictions for {shape.shape[0]} images, but {len(scenes)} scenes to judge them by."
    )
  truth = scene_targets(scenes)
  stated = truth["shape"] != EMPTY
  if not stated.any():
    raise EvaluationError("no stated objects to judge.")
  occupied = shape != EMPTY
  position = occupied
  right = {
    "position": position,
    "shape": shape == truth["shape"],
    "color": position & (color == truth["color"]),
    "size": position & (size == truth["size"]),
  }
  object_right = right["shape"] & right["color"] & right["size"]
  scores = {k: float(v[stated].mean()) for k, v in right.items()}
  scores["count"] = float((occupied.sum(1) == stated.sum(1)).mean())
  scores["all_correct"] = float(((object_right | ~stated) & (occupied == stated)).all(1).mean())
  scores["num_images"] = len(scenes)
  scores["num_objects"] = int(stated.sum())
  return scores


def attribute_accuracy(
  judge: Predictor, images: np.ndarray, scenes: Sequence[synthetic.Scene]
) -> dict[str, float]:
  """``score_predictions`` of the judge's reading of ``images`` against ``scenes`` (image
  i was made from scene i's caption, or is its rendering)."""
  if len(images) != len(scenes):
    raise EvaluationError(f"{len(images)} images but {len(scenes)} scenes; one scene per image.")
  return score_predictions(judge.predict(images), scenes)


def analytic_chance() -> dict[str, float]:
  """The expected scores of a perfect judge when each image is paired with the caption of
  another, independent scene of the world: a stated cell is occupied with probability
  E[#objects] / 9, and then has the stated shape with probability 1/5, colour 1/6, size 1/2
  (the world draws them uniformly); counts agree with probability sum_n P(n)^2."""
  counts = range(1, synthetic.MAX_OBJECTS + 1)
  p_n = 1.0 / len(counts)
  position = sum(p_n * n for n in counts) / NUM_CELLS
  per_object = {
    "shape": 1 / len(synthetic.SHAPES),
    "color": 1 / len(COLOR_NAMES),
    "size": 1 / len(synthetic.SIZES),
  }
  p_object = math.prod(per_object.values())
  all_correct = sum(p_n * p_n * p_object**n / math.comb(NUM_CELLS, n) for n in counts)
  return {
    "position": position,
    **{k: position * p for k, p in per_object.items()},
    "count": p_n,
    "all_correct": all_correct,
  }


def chance_accuracy(
  judge: Predictor, images: np.ndarray, scenes: Sequence[synthetic.Scene], seed: int = 0
) -> dict[str, dict[str, float]]:
  """Chance levels: ``empirical`` scores ``images`` against the captions of other scenes
  of the set (a random permutation without fixed points), ``analytic`` is
  ``analytic_chance()``, what a perfect judge would score that way on average."""
  if len(scenes) < 2:
    raise EvaluationError("chance pairing needs at least 2 scenes.")
  order = np.random.default_rng(seed).permutation(len(scenes))
  others = np.empty_like(order)
  others[order] = np.roll(order, 1)  # image order[i] gets scene order[i - 1], never its own
  paired = [scenes[j] for j in others]
  return {"empirical": attribute_accuracy(judge, images, paired), "analytic": analytic_chance()}


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fit to two feature sets [n, d] (e.g. real and
  generated images' ``Judge.features``): |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2).

  The project's own measure on the judge's features, not COCO FID (see the module doc).
  tr (C_a C_b)^1/2 is the sum of the square roots of the eigenvalues of the symmetric
  C_a^1/2 C_b C_a^1/2, computed in float64 with two symmetric eigen-decompositions.
  """
  a, b = (np.asarray(f, np.float64) for f in (feats_a, feats_b))
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(
      f"frechet_distance needs two [n >= 2, d] feature sets of equal d; got "
      f"{list(a.shape)} and {list(b.shape)}."
    )
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  vals, vecs = np.linalg.eigh(cov_a)
  sqrt_a = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
  cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0.0, None)).sum()
  diff = a.mean(0) - b.mean(0)
  return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross, 0.0))


def degrade(images: np.ndarray, seed: int = 0) -> np.ndarray:
  """A fixed stand-in for a VQGAN reconstruction: each image bilinearly halved and restored
  (a blur of about a pixel) plus Gaussian noise of 6 grey levels. Reporting the judge on
  these shows how far it can be trusted on imperfect images; the damage is not one the
  augmentation draws (that works on the full-resolution image)."""
  rng = np.random.default_rng(seed)
  out = []
  for im in images:
    s = im.shape[0]
    small = Image.fromarray(im).resize((s // 2, s // 2), Image.Resampling.BILINEAR)
    out.append(np.asarray(small.resize((s, s), Image.Resampling.BILINEAR), np.float32))
  noisy = np.stack(out) + rng.normal(0.0, 6.0, images.shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def evaluate_on_world(
  judge: Predictor, seed: int = 0, num_scenes: int = 1000, image_size: int = 48
) -> dict[str, dict[str, float]]:
  """The judge on the first ``num_scenes`` validation scenes of the world ``seed``:
  ``{"accuracy": on their renders, "degraded": on ``degrade``d renders, "chance":
  chance_accuracy(...)["empirical"]}``."""
  scenes = world_scenes(seed, "validation", num_scenes)
  images = render(scenes, image_size)
  return {
    "accuracy": attribute_accuracy(judge, images, scenes),
    "degraded": attribute_accuracy(judge, degrade(images), scenes),
    "chance": chance_accuracy(judge, images, scenes)["empirical"],
  }


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
  """{row name: scores} -> a small text table, one column per score (in %)."""
  names = OBJECT_SCORES + IMAGE_SCORES
  width = max(len(r) for r in rows) + 2
  lines = ["".ljust(width) + "".join(n.rjust(12) for n in names)]
  for row, scores in rows.items():
    lines.append(row.ljust(width) + "".join(f"{100 * scores[n]:11.2f}%" for n in names))
  return "\n".join(lines)
