"""`--mode=generate`: caption --image(s), answer a --question about them, or continue a
--prompt, from a checkpoint of --workdir (latest, --checkpoint_step or --best); greedy, beam
or sampling (--decoding). --task=<name> picks a task of the registry that the model was
trained on (its inputs: an --image and/or a text, --text or the --question / --prompt it
names); without it the inputs pick as above. Prints each output and appends it to
<workdir>/generate.jsonl (or --output), each row naming its task. A text-to-image model
draws a --prompt into --output_dir instead (m6_jax/infer/text_to_image.py).

    python -m m6_jax.main --mode=generate --workdir=DIR --image=scene.png
    python -m m6_jax.main --mode=generate --workdir=DIR --image=scene.png --question="..."
    python -m m6_jax.main --mode=generate --workdir=DIR --prompt="a small red circle"
    python -m m6_jax.main --mode=generate --workdir=DIR --task=vqa --image=scene.png \\
      --text="what color is the circle?"
"""

from __future__ import annotations

import os

from absl import flags

from m6_jax.cli import checkpoint_flags, common
from m6_jax.errors import GenerationError, exit_with

IMAGE = flags.DEFINE_multi_string(
  "image", [], "Image file(s) to caption, or to ask --question about (repeatable)."
)
QUESTION = flags.DEFINE_multi_string(
  "question", [], "A question about the --image(s) (one for all, or one per image)."
)
PROMPT = flags.DEFINE_string("prompt", None, "Text whose continuation is generated (or drawn).")
TASK = flags.DEFINE_string(
  "task",
  None,
  "The task to generate with (a name of data.task_weights the model was trained on); "
  "default: the inputs decide (--image: image_to_text, + --question: vqa, --prompt: text_lm).",
)
TEXT = flags.DEFINE_multi_string(
  "text",
  [],
  "The text input of the --task (one for all --image(s), or one per image), for tasks whose "
  "text is not a --question or a --prompt (e.g. a phrase to locate).",
)
DECODING = flags.DEFINE_enum(
  "decoding",
  "greedy",
  ["greedy", "beam", "sample", "ofa_caption"],
  "How to decode (ofa_caption: ModelScope's OFA captioning, beam 5 over every token, no "
  "repeated trigram, at most 16 tokens, fairseq's scoring).",
)
MAX_LEN = flags.DEFINE_integer(
  "max_len",
  0,
  "Most tokens to generate, EOS included (0: the config's data.tgt_len; ofa_caption: 17).",
)
LANGUAGE = flags.DEFINE_enum(
  "language",
  "auto",
  ["auto", "any", "en", "zh"],
  "The language of every output: en or zh (its tokens and those of no script only), or auto "
  "(the one the model begins it in: an output that mixes Latin letters and Han characters is "
  "decoded again in the language of its first one), or any (as the model decodes it).",
)
BEAM_SIZE = flags.DEFINE_integer("beam_size", 4, "Beams for --decoding=beam.")
NO_REPEAT_NGRAM_SIZE = flags.DEFINE_integer(
  "no_repeat_ngram_size", 0, "--decoding=beam repeats no n-gram of this size (0: off)."
)
LENGTH_PENALTY = flags.DEFINE_float(
  "length_penalty", 0.6, "GNMT length penalty alpha for --decoding=beam."
)
TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k likeliest tokens (0: all).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
OUTPUT = flags.DEFINE_string(
  "output", None, "JSONL the outputs are appended to (default: <workdir>/generate.jsonl)."
)
# Drawing (a text-to-image model; also reads --prompt, --temperature, --top_k, --top_p, --seed)
NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Images to draw from --prompt.")
OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory for the drawn PNGs and index.")
GUIDANCE_SCALE = flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance (1: none).")
RERANK = flags.DEFINE_integer(
  "rerank", 0, "Draw N candidates, keep the --num_images the model scores best (0: off)."
)
VQGAN_WORKDIR = flags.DEFINE_string(
  "vqgan_workdir", None, "The VQGAN that decodes the codes (default: the model's)."
)
OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "Replace the files of an earlier drawing of the same --prompt in --output_dir (default: "
  "an error naming the existing file).",
)
# Flags that ask for images: with a --prompt on a model without image codes they are an
# error, not a text continuation.
_DRAWING = (NUM_IMAGES, OUTPUT_DIR, GUIDANCE_SCALE, RERANK, VQGAN_WORKDIR, OVERWRITE)


def _draws_images(config) -> bool:
  from m6_jax.infer import generate, text_to_image

  def saved_config():
    step, best = checkpoint_flags.CHECKPOINT_STEP.value, checkpoint_flags.BEST.value
    return config or generate.workdir_config(common.WORKDIR.value, step, best)

  def model_has_codes() -> bool:
    return int(saved_config().model.code_vocab_size) > 0

  drawing = [f"--{f.name}" for f in _DRAWING if flags.FLAGS[f.name].present]
  if TASK.value:  # a task that generates image codes draws them
    task = generate.named_task(saved_config(), TASK.value, common.WORKDIR.value)
    if drawing and not task.needs_codes:
      raise GenerationError(f"--task={task.name} generates text; {', '.join(drawing)} draw images.")
    return task.needs_codes

  return text_to_image.draws_images(
    bool(drawing),
    PROMPT.value,
    bool(IMAGE.value or QUESTION.value),
    model_has_codes,
  )


def _draw(config) -> None:
  from m6_jax.infer import image_outputs, text_to_image

  if IMAGE.value or QUESTION.value or TEXT.value:
    raise GenerationError(
      "--image / --question / --text ask for captions or answers; drawing takes a --prompt alone."
    )
  request = text_to_image.ImageRequest(
    prompt=PROMPT.value or "",
    num_images=NUM_IMAGES.value,
    output_dir=OUTPUT_DIR.value or "",
    guidance_scale=GUIDANCE_SCALE.value,
    rerank=RERANK.value,
    temperature=TEMPERATURE.value,
    top_k=TOP_K.value,
    top_p=TOP_P.value,
    seed=SEED.value,
    vqgan_workdir=VQGAN_WORKDIR.value or "",
    overwrite=OVERWRITE.value,
  )
  step, best = checkpoint_flags.CHECKPOINT_STEP.value, checkpoint_flags.BEST.value
  index = text_to_image.run(request, common.WORKDIR.value, config, step, best)
  if "files" not in index:  # not process 0: it wrote nothing
    return
  for name in index["files"]:
    print(os.path.join(request.output_dir, name))
  print(
    f"wrote {len(index['files'])} image(s) for {request.prompt!r}, the grid {index['grid']} "
    f"and {image_outputs.stem(request.prompt)}.json to {request.output_dir}"
  )
  if not index["prompt_drawn_on_grid"]:
    print(
      "neither an installed font nor the package's CJK subset has every glyph of the prompt, so "
      "the grid does not show it; it is in the JSON and in every PNG's text metadata."
    )


def run() -> None:
  config = common.load_config("generate", required=False, workdir_hint="a trained workdir")
  prompt = PROMPT.value if flags.FLAGS["prompt"].present else None
  if prompt is not None and not prompt.strip():
    exit_with("the prompt is empty; pass some text with --prompt.")
  if _draws_images(config):
    return _draw(config)
  from m6_jax.data import images
  from m6_jax.infer import generate
  from m6_jax.parallel import multihost

  for path in IMAGE.value:  # a bad image fails before the checkpoint is read
    images.load_image_file(path, 8)
  step, best = checkpoint_flags.CHECKPOINT_STEP.value, checkpoint_flags.BEST.value
  model = generate.load_model(common.WORKDIR.value, step, config, best=best)
  rows = generate.generate(
    model,
    images=IMAGE.value,
    questions=QUESTION.value,
    prompt=prompt,
    texts=TEXT.value,
    task=TASK.value,
    decoding_method=DECODING.value,
    max_len=MAX_LEN.value,
    beam_size=BEAM_SIZE.value,
    no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE.value,
    length_penalty=LENGTH_PENALTY.value,
    temperature=TEMPERATURE.value,
    top_k=TOP_K.value,
    top_p=TOP_P.value,
    seed=SEED.value,
    language=LANGUAGE.value,
  )
  output = OUTPUT.value or os.path.join(common.WORKDIR.value, "generate.jsonl")
  for row in rows:
    inputs = " | ".join(str(v) for k, v in row.items() if k not in ("task", "output"))
    print(f"{inputs} -> {row['output']}")
    row["step"] = model.step
  if multihost.is_primary():  # every process generates the same rows; one writes them
    generate.write_jsonl(rows, output)
    print(f"wrote {len(rows)} row(s) to {output}")
