"""The scene judge: it learns the attributes of unseen scenes, its features tell other images
from real ones, a saved judge is the same judge, and the cache and command line work."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from testing_utils import cpu_env

from m6_jax.errors import EvaluationError
from m6_jax.evaluation import scene_judge as sj
from m6_jax.evaluation import scene_scores as ss

# Multi-process / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Enough training to read colour and position reliably and shape far above chance.
SMALL = dict(seed=0, num_steps=300, batch_size=32, num_train_scenes=1000)


def _cli(*args, env=None):
  return subprocess.run(
    [sys.executable, "-m", "m6_jax.main", "--mode=scene_judge", *args],
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
  scenes = ss.world_scenes(0, "validation", 200)
  return ss.render(scenes), scenes


def test_the_judge_learns_the_attributes_of_unseen_scenes(judge, held_out):
  images, scenes = held_out
  scores = ss.attribute_accuracy(judge, images, scenes)
  chance = ss.chance_accuracy(judge, images, scenes)["empirical"]
  assert scores["num_images"] == 200 and scores["num_objects"] == sum(
    len(s.objects) for s in scenes
  )
  assert scores["position"] >= 0.95 and scores["color"] >= 0.95 and scores["count"] >= 0.9
  assert scores["shape"] >= 0.5, scores  # strict chance is 2/45; given the position, 1/5
  for name in ("position", "shape", "color", "size"):
    assert scores[name] > chance[name] + 0.4, (name, scores, chance)


def test_features_tell_other_images_from_real_ones(judge):
  # 256 images a set (one compiled batch): with fewer, the estimate's own noise (~1/n) would
  # hide the differences.
  n = 256
  images = ss.render(ss.world_scenes(0, "validation", 2 * n))
  real_a, real_b = judge.features(images[:n]), judge.features(images[n:])
  assert real_a.shape == (n, ss.NUM_CELLS * sj.JudgeNet.cell_features)
  recoloured = judge.features(images[n:, :, :, ::-1].copy())  # BGR: colours off the palette
  single = [s for s in ss.world_scenes(0, "train", 4 * n) if len(s.objects) == 1][:n]
  same = ss.frechet_distance(real_a, real_b)
  assert ss.frechet_distance(real_a, recoloured) > 2 * same
  assert ss.frechet_distance(real_a, judge.features(ss.render(single))) > 1.5 * same


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
