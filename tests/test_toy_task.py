"""Adding a task takes one file: tests/toy_grounding.py registers a grounding task (its
record field, Task and EvalKind), and the real command line trains, evaluates and generates
with it by naming the module in data.task_modules, and prepares user data with its field."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from PIL import Image
from testing_utils import cpu_env

from m6_jax.data import synthetic

# Multi-process / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
TOY = "toy_grounding"
# A small model and short texts: the test is about the wiring, not the model.
SMALL = [
  "--config.model.vocab_size=512",
  "--config.model.d_model=32",
  "--config.model.num_layers=1",
  "--config.model.num_heads=2",
  "--config.model.head_dim=16",
  "--config.model.mlp_dim=64",
  "--config.data.batch_size=16",
  "--config.data.src_len=12",
  "--config.data.tgt_len=12",
  "--config.data.tokenizer_corpus_examples=300",
  "--config.data.num_eval_examples=4",
  "--config.train.lr=5e-3",
  "--config.train.steps=60",  # runlocal's 20 steps, and 40 more to say locations
  "--config.train.log_every=10",
]
OTHER_TASKS = ("text_to_text", "image_to_text", "multimodal_to_text", "vqa", "text_lm")


def _main(*args: str) -> subprocess.CompletedProcess:
  """`python -m m6_jax.main ARGS` with tests/ on PYTHONPATH (where the task module is)."""
  env = cpu_env()
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")]))
  proc = subprocess.run(
    [sys.executable, "-m", "m6_jax.main", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("grounding"))
  off = [f"--config.data.task_weights.{t}=0" for t in OTHER_TASKS]
  _main(
    "--config=configs/base.py:runlocal",
    f"--config.data.task_modules={TOY}",
    "--config.data.task_weights.grounding=1",
    *off,
    *SMALL,
    f"--workdir={path}",
  )
  return path


def test_the_toy_task_trains_evaluates_and_generates(workdir, tmp_path):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if "loss" in l]
  losses = [r["grounding_loss"] for r in rows if "grounding_loss" in r]
  assert len(losses) >= 4 and losses[-1] < 0.5 * losses[0], losses
  assert not any("image_to_text_loss" in r for r in rows)  # only the toy task trained

  # The saved config names the module, so eval (without --config) registers the task again.
  _main("--mode=eval", f"--workdir={workdir}", "--baselines")
  result = json.load(open(os.path.join(workdir, "eval_metrics.json")))
  m = result["metrics"]
  scenes = [synthetic.make_example(0, synthetic.split_index("validation", i)) for i in range(4)]
  assert m["num_grounding_phrases"] == sum(len(ex["objects"]) for ex in scenes)
  assert 0 <= m["grounding_accuracy"] <= 100 and "grounding_loss" in m
  assert "grounding_accuracy" in result["baselines"]["most_frequent"]
  assert "| grounding_accuracy |" in result["table"]

  scene = next(ex for ex in scenes if len(ex["objects"]) == 1)  # "the <color> <shape>"
  obj = scene["objects"][0]
  image = str(tmp_path / "scene.png")
  Image.fromarray(scene["image"]).save(image)
  phrase = f"the {obj['color']} {obj['shape']}"
  out = tmp_path / "rows.jsonl"
  _main(
    "--mode=generate",
    f"--workdir={workdir}",
    "--task=grounding",
    f"--image={image}",
    f"--text={phrase}",
    f"--output={out}",
  )
  (row,) = [json.loads(l) for l in out.read_text().splitlines()]
  assert row["task"] == "grounding" and row["phrase"] == phrase and row["image"] == image
  assert row["output"] in synthetic.CELLS, row  # a location, whether or not the right one


def test_prepared_data_stores_and_reads_the_toy_field(tmp_path):
  """--mode=prepare_data --task_modules stores the field's columns and mask; reading back
  gives the task its records and evaluation its held-out items."""
  (tmp_path / "img").mkdir()
  for split, first in (("train", 0), ("validation", 4)):
    lines = []  # per image: a caption record, then a phrase record
    for i in range(first, first + 4):
      ex = synthetic.make_example(5, i, image_size=32)
      Image.fromarray(ex["image"]).save(tmp_path / f"img/{i}.png")
      lines.append({"image": f"img/{i}.png", "caption": ex["caption_en"]})
      phrase, location = f"the {ex['objects'][0]['color']} thing", ex["objects"][0]["cell_name"]
      lines.append({"image": f"img/{i}.png", "phrase": phrase, "location": location})
    (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  data_dir = str(tmp_path / "tfds")
  _main(
    "--mode=prepare_data",
    f"--task_modules={TOY}",
    f"--input_path={tmp_path}",
    f"--data_dir={data_dir}",
    "--name=toy_phrases",
  )
  check = f"""
import json, {TOY}
from m6_jax.config import default_config
from m6_jax.data import sources
from m6_jax.evaluation import held_out
src = sources.PreparedSource({data_dir!r}, "toy_phrases", "validation", 32)
c = default_config()
c.data.update(source="tfds", data_dir={data_dir!r}, tfds_name="toy_phrases", image_size=32)
items = held_out.held_out(c, 4).items["grounding"]
print(json.dumps(dict(
  records=src.task_indices("grounding").tolist(),
  captions=src.task_indices("image_to_text").tolist(),
  example=src[1]["phrase"] + " | " + src[1]["location"],
  kinds=held_out.available_kinds(c),
  items=[(it.text, it.refs) for it in items],
)))
"""
  env = cpu_env()
  env["PYTHONPATH"] = str(REPO / "tests")
  proc = subprocess.run(
    [sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["records"] == [1, 3, 5, 7] and got["captions"] == [0, 2, 4, 6]
  assert got["example"] == f"{lines[1]['phrase']} | {lines[1]['location']}"
  assert "grounding" in got["kinds"] and "vqa" not in got["kinds"]
  assert got["items"] == [[l["phrase"], [l["location"]]] for l in lines[1::2]]


def test_the_toy_task_is_the_only_file_it_needed():
  """Nothing of the package or the shipped configs names the task or its module."""
  for root in ("m6_jax", "configs"):
    for path in (REPO / root).rglob("*.py"):
      text = path.read_text()
      assert "grounding" not in text and TOY not in text, path


def test_the_toy_module_imports_no_jax():
  """Task modules are imported while the flags are parsed, before JAX should be."""
  code = (
    f"import sys, {TOY}; print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))"
  )
  env = cpu_env()
  env["PYTHONPATH"] = str(REPO / "tests")
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
