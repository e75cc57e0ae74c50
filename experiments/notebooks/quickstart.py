# ---
# jupyter:
#   accelerator: TPU
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator
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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/m6-jax/blob/main/experiments/notebooks/quickstart.ipynb)
#
# Trains the tiny base M6 (about 1M parameters, `configs/base.py`) on the embedded synthetic
# bilingual image-text world, plots its loss curves, captions a few held-out scenes and
# answers questions about them, then shows what the text-to-image recipe draws from a prompt.
#
# **Runtime.** The notebook asks Colab for a TPU runtime (one v5e or v6e chip); any CPU
# runtime works too (800 steps take 2 to 4 minutes on 2 cores). On Colab, set `REPO_URL`
# below to the repository's git URL (it is not on PyPI; replace `YOUR_ORG` in it and in the
# badge's link); the first cell clones it to `/content/m6-jax`. Then run the cells top to
# bottom.

# %% tags=["parameters"]
# Parameters (the test suite runs this notebook with small values: tests/experiments/).
REPO_URL = "https://github.com/YOUR_ORG/m6-jax.git"  # cloned on Colab; unused in a checkout
INSTALL = True  # pip install the pinned requirements from the checkout
WORKDIR = "/tmp/m6_quickstart"  # checkpoints, metrics.jsonl, tokenizer; a rerun resumes
STEPS = 800  # train.steps of the base config
OVERRIDES = {}  # more config overrides, e.g. {"train.lr": 1e-3}
NUM_SCENES = 8  # held-out scenes to caption and question

# %%
# The checkout: the one this notebook lives in (experiments/notebooks/), else a clone of
# REPO_URL in /content/m6-jax (Colab opens the notebook alone). It becomes the working
# directory (config paths are relative to it) and importable.
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
  return None


REPO = find_repo()
if REPO is None:
  if "YOUR_ORG" in REPO_URL:
    raise ValueError("set REPO_URL (the parameters cell) to the m6-jax repository's git URL")
  subprocess.run(["git", "clone", "--depth=1", REPO_URL, "/content/m6-jax"], check=True)
  REPO = find_repo()
os.chdir(REPO)
if REPO not in sys.path:
  sys.path.insert(0, REPO)
print(f"the checkout: {REPO}")

# %%
# Install the pinned requirements (the TPU ones where there is a TPU chip) and what the
# notebook adds (matplotlib); the runtime's own Jupyter packages stay as they are. Then the
# set-up every notebook shares: quiet library logging, a font for Chinese.
from experiments.notebooks import helpers
from m6_jax.cli import bootstrap

on_tpu = bootstrap.has_tpu_chip()
if INSTALL:
  requirements = "requirements-tpu.txt" if on_tpu else "requirements.txt"
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "-r", requirements, *helpers.pins("matplotlib")],
    check=True,
  )
bootstrap.choose_platform()  # CPU where libtpu is installed but there is no TPU chip
helpers.setup()

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
from m6_jax.train import loop

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

# %% [markdown]
# ## Text to image
# A VQGAN turns an image into a 12 x 12 grid of codes, M6 learns to generate the codes from
# a caption, and the VQGAN decodes them back into pixels
# ([docs/text_to_image.md](../../docs/text_to_image.md)). Training the two takes about 22
# minutes on 2 CPU cores, far longer than this notebook, so the grids below are the ones the
# recipe of that page drew and committed to `docs/text_to_image/`: for each prompt, the best
# 8 of 32 samples by the model's own image-to-text likelihood of the prompt, best first,
# read here through the index JSON that `--mode=generate` writes beside each grid. After the
# recipe's training commands, draw your own prompt with
#
# ```
# python -m m6_jax.main --mode=generate --workdir=/tmp/m6_t2i --prompt="一个红色的圆" \
#   --num_images=8 --guidance_scale=1 --rerank=32 --output_dir=/tmp/m6_t2i_images
# ```
#
# and show the grid it prints, as below.

# %%
import glob
import json

grids, titles = [], []
for path in sorted(glob.glob("docs/text_to_image/*/*.json")):
  with open(path, encoding="utf-8") as f:
    index = json.load(f)
  grids.append(os.path.join(os.path.dirname(path), index["grid"]))
  titles.append(
    f"{index['prompt']}\n(step {index['step']}, guidance {index['settings']['guidance_scale']},"
    f" best {len(index['files'])} of {index['num_candidates']})"
  )
helpers.show_images(grids, titles, cols=2, size=4.5, fontsize=9)
