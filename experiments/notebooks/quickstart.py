# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # M6 in JAX: quickstart
#
# Trains the tiny base M6 (about 1M parameters, `configs/base.py`) on the embedded synthetic
# bilingual image-text world, plots its loss curves, then captions a few held-out scenes and
# answers questions about them.
#
# **Runtime.** On Colab choose a TPU runtime (one v5e or v6e chip) for speed; any CPU runtime
# works too (800 steps take 2 to 4 minutes on 2 cores). Clone the repository first (it is
# not on PyPI), e.g. `!git clone <the repository's URL> /content/m6-jax`, then run the cells
# top to bottom.
#
# **Text-to-image** (a grid of generated images) will be shown here once it has landed in
# the project; it has not yet.

# %% tags=["parameters"]
# Parameters (the test suite runs this notebook with small values: tests/experiments/).
INSTALL = True  # pip install the pinned requirements from the checkout
WORKDIR = "/tmp/m6_quickstart"  # checkpoints, metrics.jsonl, tokenizer; a rerun resumes
STEPS = 800  # train.steps of the base config
OVERRIDES = {}  # more config overrides, e.g. {"train.lr": 1e-3}
NUM_SCENES = 8  # held-out scenes to caption and question

# %%
# Set-up: find the checkout (this notebook lives in experiments/notebooks/), make it the
# working directory (config paths are relative to it) and importable, and install its pinned
# requirements: the TPU ones where there is a TPU chip.
import os
import subprocess
import sys


def find_repo():
  for start in (os.getcwd(), "/content/m6-jax"):
    path = os.path.abspath(start)
    while os.path.dirname(path) != path:
      if os.path.isfile(os.path.join(path, "m6_jax", "main.py")):
        return path
      path = os.path.dirname(path)
  raise FileNotFoundError("no m6-jax checkout here: clone it to /content/m6-jax first")


REPO = find_repo()
os.chdir(REPO)
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from m6_jax.cli import bootstrap

on_tpu = bootstrap.has_tpu_chip()
if INSTALL:
  requirements = "requirements-tpu.txt" if on_tpu else "requirements.txt"
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "-r", requirements]
    + ["-r", "requirements-experiments.txt"],
    check=True,
  )
bootstrap.choose_platform()  # CPU where libtpu is installed but there is no TPU chip

import jax

print(jax.devices())
if jax.default_backend() == "tpu":
  print(f"Running on {jax.device_count()} TPU device(s): {jax.devices()[0].device_kind}.")
else:
  print(
    f"No TPU here: running on {jax.default_backend().upper()} ({jax.device_count()} device(s))."
  )

# %% [markdown]
# ## Train
# The loop logs a progress line every `train.log_every` steps, writes `metrics.jsonl` and
# checkpoints to the workdir, and resumes from its latest checkpoint when rerun.

# %%
from absl import logging

from experiments.notebooks import helpers
from m6_jax.train import loop

logging.set_verbosity(logging.INFO)
config = helpers.load_config("configs/base.py", {"train.steps": STEPS, **OVERRIDES})
if jax.default_backend() == "tpu":
  config.model.dtype = "bfloat16"  # the MXU's type; parameters stay float32
result = loop.train(config, WORKDIR)
print(f"finished at step {result.final_step}")

# %%
helpers.plot_curves(
  WORKDIR,
  ["loss", "image_to_text_loss", "vqa_loss", "text_lm_loss"],
  title="training loss (each point: the mean since the previous one)",
)

# %% [markdown]
# ## Caption and question held-out scenes
# Scenes of the validation split (never trained on), saved as PNG files and read back by the
# loader training uses. Each title shows the model's caption, then one question with the
# model's answer and the true one.

# %%
from PIL import Image

from m6_jax.data import synthetic
from m6_jax.infer import generate

model = generate.load_model(WORKDIR)
scenes = [
  synthetic.make_example(int(config.seed), synthetic.split_index("validation", i))
  for i in range(NUM_SCENES)
]
paths = []
for i, scene in enumerate(scenes):
  paths.append(os.path.join(WORKDIR, f"scene_{i}.png"))
  Image.fromarray(scene["image"]).save(paths[-1])
captions = generate.generate(model, images=paths)
english = [[qa for qa in s["qa"] if qa["lang"] == "en"] for s in scenes]
questions = [qas[i % len(qas)] for i, qas in enumerate(english)]
answers = generate.generate(model, images=paths, questions=[q["question"] for q in questions])
helpers.show_images(
  [s["image"] for s in scenes],
  [
    f"{c['output']}\nQ: {q['question']}\nA: {a['output']} (true: {q['answer']})"
    for c, q, a in zip(captions, questions, answers)
  ],
)
