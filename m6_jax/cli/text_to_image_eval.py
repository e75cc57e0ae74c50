"""`--mode=text_to_image_eval`: a text-to-image model of --workdir judged against the scene's
truth on held-out captions of the synthetic world, at several guidance scales, with and
without reranking, next to the real images, the VQGAN's reconstructions and chance
(m6_jax/evaluation/text_to_image_eval.py). Prints the table and writes it to
<workdir>/text_to_image_eval.json.

    python -m m6_jax.main --mode=text_to_image_eval --workdir=/tmp/m6_t2i --judge_dir=/tmp/judge
"""

from __future__ import annotations

import json
import os

from absl import flags

from m6_jax.cli import common
from m6_jax.data import drawings
from m6_jax.errors import exit_with

JUDGE_DIR = flags.DEFINE_string(
  "judge_dir", "/tmp/m6_scene_judge", "Where the scene judge is cached (trained once, ~1 min)."
)
NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 100, "Held-out captions to draw (>= 2).")
REFERENCE_IMAGES = flags.DEFINE_integer(
  "reference_images", 1000, "Real held-out images whose judge features are the Fréchet reference."
)
GUIDANCE_SCALES = flags.DEFINE_string(
  "guidance_scales", "1,3,10", "Classifier-free guidance scales to compare."
)
RERANK = flags.DEFINE_integer(
  "rerank", 8, "Also keep the best of N candidates per caption (0: no reranking rows)."
)
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (one key per caption and candidate).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images sampled per call.")
TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k likeliest codes (0: all).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
VQGAN_WORKDIR = flags.DEFINE_string(
  "vqgan_workdir", "", "The VQGAN (default: the one the model's codes came from)."
)


def _guidance_scales() -> list[float]:
  try:
    scales = [float(x) for x in GUIDANCE_SCALES.value.split(",") if x.strip()]
  except ValueError:
    scales = []
  if not scales or min(scales) < 0:
    exit_with(f"--guidance_scales={GUIDANCE_SCALES.value!r} must list scales >= 0, e.g. 1,3,10.")
  return scales


def run() -> None:
  workdir = common.WORKDIR.value
  if not workdir:
    exit_with("--workdir is required: a text-to-image workdir (configs/finetune_text_to_image.py).")
  guidance = _guidance_scales()
  if NUM_PROMPTS.value < 2:
    exit_with(f"--num_prompts={NUM_PROMPTS.value} must be at least 2 (chance pairs captions).")
  if REFERENCE_IMAGES.value < 2:
    exit_with(f"--reference_images={REFERENCE_IMAGES.value} must be at least 2.")
  if RERANK.value < 0 or BATCH_SIZE.value < 1:
    exit_with("--rerank must be >= 0 (0: no reranking) and --batch_size >= 1.")
  if TEMPERATURE.value <= 0 or TOP_K.value < 0 or not 0 < TOP_P.value <= 1:
    exit_with("--temperature must be > 0, --top_k >= 0 (0: off) and --top_p in (0, 1].")
  if common.EVAL_SPLIT.value == drawings.SPLIT:
    exit_with(
      "--split=drawings holds images to caption and question (--mode=eval); text-to-image "
      "evaluation prompts with the captions of validation or unseen_combinations."
    )
  if not os.path.isdir(workdir):
    exit_with(f"--workdir={workdir} does not exist; train a text-to-image model there first.")
  from m6_jax.evaluation import scene_judge, text_to_image_eval

  log = lambda line: print(line, flush=True)
  judge = scene_judge.load_or_train(JUDGE_DIR.value, log=log)
  results = text_to_image_eval.evaluate(
    workdir,
    judge,
    NUM_PROMPTS.value,
    guidance,
    RERANK.value,
    SEED.value,
    BATCH_SIZE.value,
    VQGAN_WORKDIR.value,
    log=log,
    sampling=dict(temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value),
    reference_images=REFERENCE_IMAGES.value,
    split=common.EVAL_SPLIT.value,
  )
  print(text_to_image_eval.format_table(results["rows"]))
  path = os.path.join(workdir, text_to_image_eval.results_file(common.EVAL_SPLIT.value))
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, ensure_ascii=False)
  print(f"wrote {path}")
