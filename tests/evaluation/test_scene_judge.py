"""The scene judge: it learns the world's attributes, its scores are exact on predictions we
control, chance pairing scores what the world's law says, the Fréchet distance behaves like
a distance, and a saved judge is the same judge."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from testing_utils import cpu_env

from m6_jax.data import synthetic
from m6_jax.errors import EvaluationError
from m6_jax.evaluation import scene_judge as sj

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Enough training to read colour and position reliably and shape far above chance.
SMALL = dict(seed=0, num_steps=300, batch_size=32, num_train_scenes=1000)


def _cli(*args, env=None):
  return subprocess.run(
    [sys.executable, "-m", "m6_jax.evaluation.scene_judge", *args],
    cwd=REPO,
    env=env or cpu_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("judges"))


@pytest.fixture(scope="module")
def cli_run(cache_dir):
  """The command line trains the module's judge into `cache_dir`: in a subprocess at XLA's
  default optimisation level, because the tests' fast-compile flag makes training ~6x slower."""
  env = dict(cpu_env(), XLA_FLAGS="")
  return _cli(
    f"--cache_dir={cache_dir}", "--num_eval=100", *[f"--{k}={v}" for k, v in SMALL.items()], env=env
  )


@pytest.fixture(scope="module")
def judge(cache_dir, cli_run):
  assert cli_run.returncode == 0, cli_run.stderr
  log = []
  judge = sj.load_or_train(cache_dir, log=log.append, **SMALL)
  assert log and "loaded the scene judge" in log[0]  # the CLI's judge, not a new one
  return judge


@pytest.fixture(scope="module")
def held_out():
  scenes = sj.world_scenes(0, "validation", 200)
  return sj.render(scenes), scenes


class Oracle:
  """A predictor that reads the true scenes, whatever the images: scores become exact."""

  def __init__(self, scenes):
    self.truth = sj.scene_targets(scenes)

  def predict(self, images):
    assert len(images) == len(self.truth["shape"])
    return self.truth


def test_the_judge_learns_the_attributes_of_unseen_scenes(judge, held_out):
  images, scenes = held_out
  scores = sj.attribute_accuracy(judge, images, scenes)
  chance = sj.chance_accuracy(judge, images, scenes)["empirical"]
  assert scores["num_images"] == 200 and scores["num_objects"] == sum(
    len(s.objects) for s in scenes
  )
  assert scores["position"] >= 0.95 and scores["color"] >= 0.95 and scores["count"] >= 0.9
  assert scores["shape"] >= 0.5, scores  # strict chance is 2/45; given the position, 1/5
  for name in ("position", "shape", "color", "size"):
    assert scores[name] > chance[name] + 0.4, (name, scores, chance)


def test_scores_are_exact_on_controlled_predictions():
  scenes = [
    synthetic.Scene(
      (
        synthetic.SceneObject("circle", "red", "small", 0),
        synthetic.SceneObject("star", "blue", "large", 4),
      ),
      (240, 240, 240),
    ),
    synthetic.Scene((synthetic.SceneObject("cross", "green", "large", 8),), (250, 250, 250)),
  ]
  perfect = sj.scene_targets(scenes)
  assert perfect["shape"][0, 4] == 1 + synthetic.SHAPES.index("star")
  assert sj.score_predictions(perfect, scenes) == dict(
    position=1.0, shape=1.0, color=1.0, size=1.0, count=1.0, all_correct=1.0,
    num_images=2, num_objects=3,
  )  # fmt: skip

  def score(*changes):
    """Scores `perfect` with (attribute, image, cell, value) changes."""
    pred = {k: v.copy() for k, v in perfect.items()}
    for attr, image, cell, value in changes:
      pred[attr][image, cell] = value
    return sj.score_predictions(pred, scenes)

  star = [perfect[k][0, 4] for k in ("shape", "color", "size")]
  # The star drawn one cell to the right: wrong position, hence wrong shape, colour, size.
  moved = score(("shape", 0, 4, sj.EMPTY), *[(k, 0, 5, v) for k, v in zip(perfect, star)])
  for name in ("position", "shape", "color", "size"):
    assert moved[name] == pytest.approx(2 / 3), name
  assert moved["count"] == 1.0 and moved["all_correct"] == 0.5

  # A wrong colour at the right cell: only colour (and all_correct) drop.
  recoloured = score(("color", 1, 8, sj.COLOR_NAMES.index("red")))
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
    sj.score_predictions({k: v[:1] for k, v in perfect.items()}, scenes)
  with pytest.raises(EvaluationError, match="one scene per image"):
    sj.attribute_accuracy(Oracle(scenes), np.zeros((3, 48, 48, 3), np.uint8), scenes)


def test_chance_pairing_scores_the_worlds_law():
  scenes = sj.world_scenes(0, "validation", 4000)
  images = np.zeros((len(scenes), 1), np.uint8)  # the oracle ignores them
  assert sj.attribute_accuracy(Oracle(scenes), images, scenes)["all_correct"] == 1.0
  chance = sj.chance_accuracy(Oracle(scenes), images, scenes, seed=1)
  analytic = chance["analytic"]
  assert analytic["position"] == pytest.approx(2 / 9) and analytic["shape"] == pytest.approx(2 / 45)
  assert analytic["color"] == pytest.approx(2 / 54) and analytic["size"] == pytest.approx(1 / 9)
  assert analytic["count"] == pytest.approx(1 / 3) and analytic["all_correct"] < 1e-3
  for name, value in analytic.items():
    assert chance["empirical"][name] == pytest.approx(value, abs=0.02), name
  with pytest.raises(EvaluationError, match="at least 2"):
    sj.chance_accuracy(Oracle(scenes[:1]), images[:1], scenes[:1])


def test_frechet_distance():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 6))
  a -= a.mean(0)
  b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 1.0
  assert sj.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
  assert sj.frechet_distance(a, b) > 1.0
  assert sj.frechet_distance(a, b) == pytest.approx(sj.frechet_distance(b, a), rel=1e-6)
  # Equal covariances: the squared distance of the means; C vs 4C: tr(C + 4C - 4C) = tr(C).
  shift = np.arange(6.0)
  assert sj.frechet_distance(a, a + shift) == pytest.approx(shift @ shift)
  assert sj.frechet_distance(a, 2 * a) == pytest.approx(np.trace(np.cov(a, rowvar=False)))
  with pytest.raises(ValueError, match="equal d"):
    sj.frechet_distance(a, b[:, :3])


def test_features_tell_other_images_from_real_ones(judge):
  # 300 images a set: with fewer the estimate's own noise (~1/n) hides the differences.
  images = sj.render(sj.world_scenes(0, "validation", 600))
  real_a, real_b = judge.features(images[:300]), judge.features(images[300:])
  assert real_a.shape == (300, sj.NUM_CELLS * sj.JudgeNet.cell_features)
  recoloured = judge.features(images[300:, :, :, ::-1].copy())  # BGR: colours off the palette
  single = [s for s in sj.world_scenes(0, "train", 1200) if len(s.objects) == 1][:300]
  same = sj.frechet_distance(real_a, real_b)
  assert sj.frechet_distance(real_a, recoloured) > 2 * same
  assert sj.frechet_distance(real_a, judge.features(sj.render(single))) > 1.5 * same


def test_augmentation_is_mild_and_random(held_out):
  images = jax.numpy.asarray(held_out[0][:16] / 255.0, np.float32)
  bank = jax.random.normal(jax.random.key(0), (8, 48, 48, 3))
  out = np.asarray(sj.augment(jax.random.key(1), images, bank))
  again = np.asarray(sj.augment(jax.random.key(2), images, bank))
  assert out.shape == images.shape and out.min() >= 0.0 and out.max() <= 1.0
  assert not np.allclose(out, again)
  assert 0.0 < np.abs(out - images).mean() < 0.1


def test_save_load_and_cache(judge, cache_dir, held_out, tmp_path, monkeypatch):
  images, _ = held_out
  judge.save(str(tmp_path / "j"))
  loaded = sj.Judge.load(str(tmp_path / "j"))
  assert loaded.settings == judge.settings
  for k, v in judge.predict(images).items():
    np.testing.assert_array_equal(loaded.predict(images)[k], v)
  np.testing.assert_allclose(loaded.features(images), judge.features(images), rtol=1e-6)

  # The cache: the same settings load (no training), other settings train anew elsewhere.
  trained = []

  def fake_train(**settings):
    trained.append(settings)
    return sj.Judge(sj.TrainSettings(**settings), judge.params)

  monkeypatch.setattr(sj, "train_judge", lambda log=None, **s: fake_train(**s))
  log = []
  again = sj.load_or_train(cache_dir, log=log.append, **SMALL)
  assert not trained and "loaded" in log[0] and again.settings == judge.settings
  other = dict(SMALL, num_steps=301)
  sj.load_or_train(cache_dir, **other)
  assert trained == [dataclasses.asdict(sj.TrainSettings(**other))]
  assert len([d for d in os.listdir(cache_dir) if d.startswith("judge_")]) == 2

  with pytest.raises(EvaluationError, match="cannot load"):
    sj.Judge.load(str(tmp_path / "missing"))
  with pytest.raises(EvaluationError, match=r"uint8 images \[batch, 48, 48, 3\]"):
    judge.predict(images[:, :32])
  with pytest.raises(EvaluationError, match="num_steps must be >= 1"):
    sj.load_or_train(cache_dir, **dict(SMALL, num_steps=0))


def test_cli_trains_reports_and_rejects_bad_flags(cli_run, cache_dir):
  assert cli_run.returncode == 0, cli_run.stderr
  out = cli_run.stdout
  assert "rendered 1000 train scenes" in out and "step 300/300 | loss" in out and "steps/s" in out
  assert f"saved the scene judge to {cache_dir}" in out
  rows = {l.split("  ")[0]: l.split()[-6:] for l in out.splitlines() if l.endswith("%")}
  assert set(rows) == {
    "judge", "judge, degraded images", "chance (other captions)", "chance (analytic)"
  }  # fmt: skip
  judge, analytic = (
    [float(v.rstrip("%")) for v in rows[k]] for k in ("judge", "chance (analytic)")
  )
  assert judge[0] > 90 and judge[2] > 90  # position, colour
  assert analytic[0] == pytest.approx(100 * 2 / 9, abs=0.01)

  bad = _cli("--cache_dir=/tmp/x", "--num_stepz=3")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error: Unknown command line flag")
