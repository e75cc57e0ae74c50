"""Text-to-image judged against the scene's truth, on held-out captions of the synthetic world.

    python -m m6_jax.main --mode=text_to_image_eval --workdir=/tmp/m6_t2i --judge_dir=/tmp/judge

Every caption of the world states its objects' shape, colour, size and cell, so a generated
image can be checked against the scene it was asked for. The judge is the attribute
classifier of m6_jax/evaluation/scene_judge.py (trained on rendered scenes, or loaded from
--judge_dir); the scores are scene_scores.py's strict ones (an object counts as right in
shape or colour only in its stated cell). For the first --num_prompts scenes of the
validation split, or with --split=unseen_combinations of the scenes made only of
combinations no training scene holds (captions alternate Chinese and English), the table
shows:

  * real images: the judge on the renders themselves, the ceiling;
  * VQGAN reconstructions: encode -> decode of the renders, the ceiling of anything decoded
    from codes;
  * generated, for each --guidance_scales value, without and with --rerank N candidates
    (the best by the model's own image-to-text likelihood of the prompt);
  * chance: the renders judged against the captions of other scenes.

Each row also has a Fréchet distance between the judge's features of its images and those
of --reference_images real images of other held-out scenes (our own domain metric on the
judge's 288 features, not COCO FID; its floor, real vs real at the row's sample size, is
the first row's). A large reference leaves only the row's own sampling noise. The table is
printed and written, with the settings and timings, to <workdir>/text_to_image_eval.json
(text_to_image_eval_<split>.json for another split).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np

from m6_jax.data import synthetic
from m6_jax.evaluation import scene_scores
from m6_jax.infer import text_to_image as t2i

RESULTS_FILE = "text_to_image_eval.json"
SCORES = ("position", "shape", "color", "size", "count", "all_correct")


def results_file(split: str = "validation") -> str:
  return RESULTS_FILE if split == "validation" else f"text_to_image_eval_{split}.json"


def held_out(
  seed: int, num: int, image_size: int, split: str = "validation"
) -> tuple[list[synthetic.Scene], list[str]]:
  """The first `num` scenes of `split` and their captions (even: Chinese, odd: English)."""
  scenes = scene_scores.world_scenes(seed, split, num)
  captions = [
    synthetic.caption_zh(s) if i % 2 == 0 else synthetic.caption_en(s) for i, s in enumerate(scenes)
  ]
  return scenes, captions


def generate(
  model,
  vqgan,
  captions: Sequence[str],
  guidance: float,
  rerank: int,
  seed: int,
  batch: int,
  sampling: dict | None = None,
) -> np.ndarray:
  """One image per caption: sampled with the key of its index (rerank 0), or the best of
  `rerank` candidates by the model's likelihood of the caption."""
  candidates = max(rerank, 1)
  prompts = [caption for caption in captions for _ in range(candidates)]
  # Row r (caption r // candidates) samples with key r: a distinct key per candidate.
  _, images = t2i.draw_images(
    model, vqgan, prompts, range(len(prompts)), seed, guidance, batch, **(sampling or {})
  )
  images = images.reshape((len(captions), candidates) + images.shape[1:])
  if rerank <= 0:
    return images[:, 0]
  best = [
    t2i.prompt_log_likelihood(model, images[i], captions[i], batch).argmax()
    for i in range(len(captions))
  ]
  return images[np.arange(len(captions)), best]


def _row(judge, images: np.ndarray, scenes, reference: np.ndarray, seconds: float) -> dict:
  row = scene_scores.attribute_accuracy(judge, images, scenes)
  row["frechet"] = scene_scores.frechet_distance(judge.features(images), reference)
  row["seconds"] = seconds
  return row


def evaluate(
  workdir: str,
  judge,
  num_prompts: int,
  guidance_scales: Sequence[float],
  rerank: int,
  seed: int = 0,
  batch_size: int = 8,
  vqgan_workdir: str = "",
  log=print,
  image_tokenizer=None,
  sampling: dict | None = None,
  reference_images: int = 1000,
  split: str = "validation",
) -> dict[str, Any]:
  """{row name: scores} for the model of `workdir` on the scenes of `split` (validation or
  unseen_combinations; see the module docstring); the VQGAN is
  `image_tokenizer` when given, else loaded from `vqgan_workdir` or the model's codes;
  `sampling` holds temperature / top_k / top_p for `text_to_image.sample_codes`."""
  from m6_jax.infer import generate as gen

  log = log or (lambda line: None)
  model = gen.load_model(workdir)
  vqgan = image_tokenizer or t2i.load_image_tokenizer(
    *t2i.vqgan_location(model.config, vqgan_workdir)
  )
  t2i.check_image_tokenizer(vqgan, model.config.model, vqgan_workdir or "the model's codes")
  world_seed, size = int(model.config.seed), int(model.config.data.image_size)
  scenes, captions = held_out(world_seed, num_prompts, size, split)
  real = scene_scores.render(scenes, size)
  # The Fréchet reference: real images of the split's next reference_images scenes.
  others = scene_scores.world_scenes(world_seed, split, num_prompts + reference_images)
  others = others[num_prompts:]
  reference = judge.features(scene_scores.render(others, size))
  rows: dict[str, dict] = {}
  rows["real images (ceiling)"] = _row(judge, real, scenes, reference, 0.0)
  start = time.perf_counter()
  recon = np.asarray(vqgan.decode(vqgan.encode(real)), np.uint8)
  rows["VQGAN reconstructions"] = _row(judge, recon, scenes, reference, time.perf_counter() - start)
  for scale in guidance_scales:
    for n in (0, rerank) if rerank > 1 else (0,):
      name = f"generated, guidance {scale:g}" + (f", best of {n}" if n else "")
      log(f"{name}: {num_prompts} prompts ...")
      start = time.perf_counter()
      images = generate(model, vqgan, captions, scale, n, seed, batch_size, sampling)
      rows[name] = _row(judge, images, scenes, reference, time.perf_counter() - start)
      log(f"{name}: {_format_row(rows[name])}")
  chance = scene_scores.chance_accuracy(judge, real, scenes, seed)
  rows["chance (other captions)"] = dict(chance["empirical"], frechet=float("nan"), seconds=0.0)
  return {
    "workdir": os.path.abspath(workdir),
    "step": model.step,
    "split": split,
    "num_prompts": num_prompts,
    "guidance_scales": list(guidance_scales),
    "rerank": rerank,
    "seed": seed,
    "sampling": dict(sampling or {}),
    "reference_images": reference_images,
    "rows": rows,
  }


def _format_row(row: dict) -> str:
  return " | ".join(f"{k} {row[k]:.1%}" for k in SCORES) + f" | FD {row['frechet']:.1f}"


def format_table(rows: dict[str, dict]) -> str:
  header = ["images"] + list(SCORES) + ["Fréchet (judge features)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, row in rows.items():
    fd = "" if np.isnan(row["frechet"]) else f"{row['frechet']:.1f}"
    cells = [name] + [f"{100 * row[k]:.1f}%" for k in SCORES] + [fd]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
