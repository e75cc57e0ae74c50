"""Scoring against the synthetic world: exact on readings we control, chance pairing as the
world's law says, and a Fréchet distance that behaves like a distance."""

import numpy as np
import pytest

from m6_jax.data import synthetic
from m6_jax.errors import EvaluationError
from m6_jax.evaluation import eval_kinds
from m6_jax.evaluation import scene_scores as ss


class Oracle:
  """A predictor that reads the true scenes, whatever the images: scores become exact."""

  def __init__(self, scenes):
    self.truth = ss.scene_targets(scenes)

  def predict(self, images):
    assert len(images) == len(self.truth["shape"])
    return self.truth


def _readings(captions):
  return ss.caption_readings([synthetic.read_caption(c) for c in captions])


def _two_scenes():
  """A red circle at the top left and a blue star in the centre; a green cross at the bottom
  right."""
  return [
    synthetic.Scene(
      (
        synthetic.SceneObject("circle", "red", "small", 0),
        synthetic.SceneObject("star", "blue", "large", 4),
      ),
      (240, 240, 240),
    ),
    synthetic.Scene((synthetic.SceneObject("cross", "green", "large", 8),), (250, 250, 250)),
  ]


def test_scores_are_exact_on_controlled_predictions():
  scenes = _two_scenes()
  perfect = ss.scene_targets(scenes)
  assert perfect["shape"][0, 4] == 1 + synthetic.SHAPES.index("star")
  assert ss.score_predictions(perfect, scenes) == dict(
    position=1.0, shape=1.0, color=1.0, size=1.0, count=1.0, all_correct=1.0,
    num_images=2, num_objects=3,
  )  # fmt: skip

  def score(*changes):
    """Scores `perfect` with (attribute, image, cell, value) changes."""
    pred = {k: v.copy() for k, v in perfect.items()}
    for attr, image, cell, value in changes:
      pred[attr][image, cell] = value
    return ss.score_predictions(pred, scenes)

  star = [perfect[k][0, 4] for k in ("shape", "color", "size")]
  # The star drawn one cell to the right: wrong position, hence wrong shape, colour, size.
  moved = score(("shape", 0, 4, ss.EMPTY), *[(k, 0, 5, v) for k, v in zip(perfect, star)])
  for name in ("position", "shape", "color", "size"):
    assert moved[name] == pytest.approx(2 / 3), name
  assert moved["count"] == 1.0 and moved["all_correct"] == 0.5

  # A wrong colour at the right cell: only colour (and all_correct) drop.
  recoloured = score(("color", 1, 8, ss.COLOR_NAMES.index("red")))
  assert recoloured["color"] == pytest.approx(2 / 3) and recoloured["all_correct"] == 0.5
  assert recoloured["position"] == recoloured["shape"] == recoloured["size"] == 1.0

  # A wrong shape at the right cell: the position holds, the shape does not.
  reshaped = score(("shape", 0, 0, 1 + synthetic.SHAPES.index("square")))
  assert reshaped["position"] == 1.0 and reshaped["shape"] == pytest.approx(2 / 3)

  # An extra object where the caption says nothing: every stated object is right, the
  # count is not.
  extra = score(("shape", 1, 0, 1))
  assert extra["position"] == extra["shape"] == extra["color"] == 1.0
  assert extra["count"] == 0.5 and extra["all_correct"] == 0.5

  with pytest.raises(EvaluationError, match="2 scenes"):
    ss.score_predictions({k: v[:1] for k, v in perfect.items()}, scenes)
  with pytest.raises(EvaluationError, match="one scene per image"):
    ss.attribute_accuracy(Oracle(scenes), np.zeros((3, 48, 48, 3), np.uint8), scenes)


def test_chance_pairing_scores_the_worlds_law():
  scenes = ss.world_scenes(0, "validation", 4000)
  images = np.zeros((len(scenes), 1), np.uint8)  # the oracle ignores them
  assert ss.attribute_accuracy(Oracle(scenes), images, scenes)["all_correct"] == 1.0
  chance = ss.chance_accuracy(Oracle(scenes), images, scenes, seed=1)
  analytic = chance["analytic"]
  assert analytic["position"] == pytest.approx(2 / 9) and analytic["shape"] == pytest.approx(2 / 45)
  assert analytic["color"] == pytest.approx(2 / 54) and analytic["size"] == pytest.approx(1 / 9)
  assert analytic["count"] == pytest.approx(1 / 3) and analytic["all_correct"] < 1e-3
  for name, value in analytic.items():
    assert chance["empirical"][name] == pytest.approx(value, abs=0.02), name
  with pytest.raises(EvaluationError, match="at least 2"):
    ss.chance_accuracy(Oracle(scenes[:1]), images[:1], scenes[:1])


def test_frechet_distance():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 6))
  a -= a.mean(0)
  b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 1.0
  assert ss.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
  assert ss.frechet_distance(a, b) > 1.0
  assert ss.frechet_distance(a, b) == pytest.approx(ss.frechet_distance(b, a), rel=1e-6)
  # Equal covariances: the squared distance of the means; C vs 4C: tr(C + 4C - 4C) = tr(C).
  shift = np.arange(6.0)
  assert ss.frechet_distance(a, a + shift) == pytest.approx(shift @ shift)
  assert ss.frechet_distance(a, 2 * a) == pytest.approx(np.trace(np.cov(a, rowvar=False)))
  with pytest.raises(ValueError, match="equal d"):
    ss.frechet_distance(a, b[:, :3])


def test_degrade_blurs_and_adds_noise_deterministically():
  images = ss.render(ss.world_scenes(0, "validation", 4))
  out = ss.degrade(images)
  assert out.dtype == np.uint8 and out.shape == images.shape
  np.testing.assert_array_equal(out, ss.degrade(images))
  change = np.abs(out.astype(float) - images).mean()
  assert 2 < change < 15, change


def test_captions_are_scored_as_images_are():
  scenes = _two_scenes()
  exact = [synthetic.caption_en(scenes[0]), synthetic.caption_zh(scenes[1])]
  assert ss.score_predictions(_readings(exact), scenes) == dict(
    position=1.0, shape=1.0, color=1.0, size=1.0, count=1.0, all_correct=1.0,
    num_images=2, num_objects=3,
  )  # fmt: skip
  # Scenes given as their objects alone score the same.
  objects = [s.objects for s in scenes]
  assert ss.score_predictions(_readings(exact), objects)["all_correct"] == 1.0

  wrong = [
    "a small red circle at the top left and a large red star in the center.",  # colour
    "a large green cross at the bottom and a small blue star at the top.",  # place; extra
  ]
  scores = ss.score_predictions(_readings(wrong), scenes)
  assert scores["position"] == pytest.approx(2 / 3) and scores["shape"] == pytest.approx(2 / 3)
  assert scores["color"] == pytest.approx(1 / 3) and scores["count"] == 0.5
  assert scores["all_correct"] == 0.0
  # A description that leaves out its colour, or a cell described twice, is not right.
  unsaid = ["a small circle at the top left and a large blue star in the center.",
            "a large green cross at the bottom right and a large red cross at the bottom right."]  # fmt: skip
  scores = ss.score_predictions(_readings(unsaid), scenes)
  assert scores["position"] == 1.0 and scores["color"] == pytest.approx(1 / 3)
  assert scores["shape"] == pytest.approx(2 / 3) and scores["all_correct"] == 0.0


def test_a_caption_names_an_object_wherever_it_puts_it():
  red = synthetic.SceneObject("circle", "red", "small", 0)
  blue = synthetic.SceneObject("star", "blue", "large", 4)
  items = [eval_kinds.Item(None, "", {"en": ["-"], eval_kinds.OBJECTS: (red, blue)})]
  scores = eval_kinds.caption_object_scores(
    items, ["a small red circle at the bottom right and a large blue circle in the center."]
  )
  assert scores["caption_named"] == 50.0  # the red circle, misplaced; not the blue star
  assert scores["caption_position"] == 50.0 and scores["caption_color"] == 50.0
  assert scores["caption_shape"] == 0.0 and scores["caption_count"] == 100.0
