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
# # M6 in JAX: fine-tune on your own images
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/m6-jax/blob/main/experiments/notebooks/finetune_your_data.ipynb)
#
# Your data is a folder of images and a JSONL file, one line per image:
# `{"image": "rel/path.jpg", "caption": "...", "question": "...", "answer": "..."}`.
# This notebook makes a small such folder (replace it with yours), converts it with
# `--mode=prepare_data` (bad records are counted and skipped), fine-tunes M6 on captioning
# and visual question answering at once, and shows the metrics and a few predictions beside
# their images.
#
# Start from the quickstart's workdir (`PRETRAINED`; the same model and tokenizer) or, with
# `PRETRAINED = ""`, from scratch (a tokenizer is then trained on your texts). The notebook
# asks Colab for a TPU runtime; on Colab, set `REPO_URL` below to the repository's git URL
# (replace `YOUR_ORG` in it and in the badge's link): the first cell clones it.

# %% tags=["parameters"]
# Parameters (the test suite runs this notebook with small values: tests/experiments/).
REPO_URL = "https://github.com/YOUR_ORG/m6-jax.git"  # cloned on Colab; unused in a checkout
INSTALL = True  # pip install the pinned requirements from the checkout
DATA = "/tmp/m6_my_data"  # the image folder + JSONL (made below; point it at yours)
WORKDIR = "/tmp/m6_finetune"  # the fine-tune's checkpoints and metrics
PRETRAINED = "/tmp/m6_quickstart"  # a workdir to start from; "" = from scratch
NUM_IMAGES = 400  # images of the example folder (a tenth held out)
STEPS = 600  # fine-tuning steps (the first tenth warm the learning rate up)
OVERRIDES = {}  # more config overrides, e.g. {"train.lr": 5e-4}
NUM_SHOWN = 8  # held-out images shown with their predictions

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

if INSTALL:
  requirements = "requirements-tpu.txt" if bootstrap.has_tpu_chip() else "requirements.txt"
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "-r", requirements, *helpers.pins("matplotlib")],
    check=True,
  )
helpers.setup()

# %% [markdown]
# ## An image folder and its JSONL
# Rendered scenes with an English caption and one question each, written as JPEG files, with
# a training and a validation JSONL (`--validation_fraction` would instead hold out a share
# of one file by a hash of the image). Replace this cell with your own folder.

# %%
import json

from PIL import Image

from m6_jax.data import synthetic

os.makedirs(os.path.join(DATA, "images"), exist_ok=True)
records = []
for i in range(NUM_IMAGES):
  scene = synthetic.make_example(7, i)
  name = f"images/{i:05d}.jpg"
  Image.fromarray(scene["image"]).save(os.path.join(DATA, name), quality=95)
  qa = [q for q in scene["qa"] if q["lang"] == "en"][i % 7 % 4]
  records.append(
    {
      "image": name,
      "caption": scene["caption_en"],
      "question": qa["question"],
      "answer": qa["answer"],
    }
  )
held_out = max(2, NUM_IMAGES // 10)
splits = {"train": records[held_out:], "validation": records[:held_out]}
for split, lines in splits.items():
  with open(os.path.join(DATA, f"{split}.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in lines)
print({split: len(lines) for split, lines in splits.items()}, records[0])

# %% [markdown]
# ## Convert it into a TFDS dataset
# The command of docs/your_data.md ("Prepare, then train"). It needs no accelerator, so it
# runs on the CPU (JAX_PLATFORMS=cpu), leaving the TPU to this notebook.

# %%
prepare = [sys.executable, "-m", "m6_jax.main", "--mode=prepare_data"]
prepare += ["--input_format=image_folder_jsonl", "--overwrite", "--name=my_data"]
prepare += [f"--input_path=train={DATA}/train.jsonl,validation={DATA}/validation.jsonl"]
prepare += [f"--data_dir={DATA}/tfds"]
done = subprocess.run(
  prepare, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True
)
print(done.stdout[-3000:])
assert done.returncode == 0, done.stderr[-3000:]

# %% [markdown]
# ## Fine-tune on captioning and VQA
# `configs/caption_user_data.py` reads the prepared dataset; here with the base model (so that
# the quickstart's parameters fit) and both tasks.

# %%
import jax

from m6_jax.train import loop

bootstrap.choose_platform()
print(jax.devices())
model_keys = helpers.load_config("configs/base.py").model.to_dict()
config = helpers.load_config(f"configs/caption_user_data.py:{DATA}/tfds/my_data")
config.model.update(model_keys)  # the base model, as pretrained
config.data.image_size = 48
config.data.task_weights.update({"image_to_text": 1.0, "vqa": 1.0, "multimodal_to_text": 0.0})
# The warm-up of caption_user_data.py (1000 steps) is longer than this whole run: a tenth.
warmup = max(1, STEPS // 10)
config.train.update(
  {"steps": STEPS, "warmup_steps": warmup, "log_every": 20, "checkpoint_every": STEPS}
)
if PRETRAINED:
  config.init_from = PRETRAINED
helpers.apply_overrides(config, OVERRIDES)
result = loop.train(config, WORKDIR)
helpers.plot_curves(WORKDIR, ["loss", "image_to_text_loss", "vqa_loss"], title="fine-tuning")

# %% [markdown]
# ## Metrics and predictions on the held-out images
# `--mode=eval`'s evaluation, in process: on the dataset's validation split, captions scored
# by BLEU-4 and CIDEr-D against every caption of an image, answers by VQA accuracy against
# every answer given to the question; next to the last training record.

# %%
from m6_jax.evaluation import evaluate
from m6_jax.infer import generate

validation = splits["validation"]
m = evaluate.run_eval(WORKDIR, num_examples=len(validation))["metrics"]
last = helpers.read_metrics(WORKDIR)[-1]
helpers.markdown_table(
  [
    {
      "step": last["step"],
      "train loss": last["loss"],
      "caption BLEU-4 (held-out)": m["bleu4"],
      "caption CIDEr-D (held-out)": m["cider"],
      "VQA accuracy (held-out)": m["vqa_accuracy"],
      "held-out images": m["num_caption_inputs"],
    }
  ]
)

# %%
model = generate.load_model(WORKDIR)
paths = [os.path.join(DATA, r["image"]) for r in validation]
captions = [r["output"] for r in generate.generate(model, images=paths)]
answers = [
  r["output"]
  for r in generate.generate(model, images=paths, questions=[r["question"] for r in validation])
]

# %%
shown = range(min(NUM_SHOWN, len(validation)))
helpers.show_images(
  [paths[i] for i in shown],
  [
    f"{captions[i]}\n(true: {validation[i]['caption']})\nQ: {validation[i]['question']}\n"
    f"A: {answers[i]} (true: {validation[i]['answer']})"
    for i in shown
  ],
)
