"""Generation from a trained workdir, on a mesh: captions, VQA answers, text continuations,
and the outputs of any registered task that generates text.

    model = load_model(workdir)                       # latest checkpoint + its config/tokenizer
    rows = generate(model, images=["cat.png"], questions=["what color is the circle?"])
    rows = generate(model, images=["cat.png"], texts=["what is red?"], task="vqa")

The parameters are restored straight into the shardings of the mesh the config describes
(`config.mesh.*`, the logical axis rules of training), so a model that needed many devices
to train decodes on many devices too: with `--config.mesh.tensor=4` each device holds about
a quarter of the parameters. Inputs are split over the mesh's batch axes.

A task of the registry (m6_jax/data/tasks.py) says what it generates from (`Task.generation`:
an image required / optional / none, a text required / none) and how its text becomes the
source text. Without a task the inputs pick the first registered task that takes them: an
image alone is captioned (image_to_text), an image and a question give the answer (vqa), a
text prompt (with or without an image) is continued (text_lm). Images are read by
the loader training uses (m6_jax/data/images.py), so they get the same pixels. Decoding is
greedy, beam search (`beam_size`, `length_penalty`, `no_repeat_ngram_size`), sampling
(`temperature`, `top_k`, `top_p`, `seed`) or ModelScope's OFA captioning (`ofa_caption`),
all with the KV cache of `m6_jax.infer.decoding`. Every text is in one language
(`language`: "en", "zh", or "auto": the one the model began it in, ofa_caption left as
ModelScope decodes it; m6_jax/data/scripts.py tells them apart).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from m6_jax import config as config_lib
from m6_jax.checkpoint import checkpoints
from m6_jax.data import images as images_lib
from m6_jax.data import scripts, tasks
from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.errors import CheckpointError, ConfigError, GenerationError
from m6_jax.infer import decoding
from m6_jax.model.m6 import M6, M6Config, dummy_batch
from m6_jax.parallel import axes, multihost, partitioning

DECODINGS = ("greedy", "beam", "sample", "ofa_caption")
LANGUAGES = ("auto", "any", *scripts.LANGUAGES)  # the `language` of `decode`

__all__ = ["GenerationError", "LoadedModel", "load_model", "generate", "decode"]


@dataclasses.dataclass
class LoadedModel:
  """A model ready to decode: its config, module, parameters (sharded over `mesh`) and
  tokenizer, and where they came from."""

  config: ml_collections.ConfigDict
  model: M6
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  step: int
  workdir: str
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  checkpoint_dir: str = ""  # the checkpoint directory the parameters came from

  def mesh_context(self):
    return partitioning.mesh_context(self.mesh, self.rules)


def workdir_config(workdir: str, step: int | None = None, best: bool = False):
  """The config a checkpoint of `workdir` was trained with (keys added since at their
  defaults), read without loading any parameters: what a caller checks before long work."""
  ckpts = checkpoints.open_steps(checkpoints.best_dir(workdir) if best else workdir)
  return config_lib.merged_with_defaults(checkpoints.saved_config(ckpts, step, workdir))


def inference_config(
  saved: dict, config: ml_collections.ConfigDict | None, num_devices: int
) -> ml_collections.ConfigDict:
  """The config to decode with: `config` when given (its mesh included), else the saved one
  on its training mesh, or on all devices over the batch when that mesh does not fit here."""
  if config is not None:
    config_lib.validate(config, num_devices, training=False)
    return config
  config = config_lib.merged_with_defaults(saved)
  try:
    config_lib.validate(config, num_devices, training=False)
  except ConfigError as e:
    default = config_lib.default_config().mesh
    with config.unlocked():
      for axis in axes.MESH_AXES:
        config.mesh[axis] = default[axis]
    config_lib.validate(config, num_devices, training=False)  # what is not the mesh still fails
    logging.info("The training mesh does not fit here (%s); decoding on all devices.", e)
  return config


def tokenizer_path(workdir: str, config: ml_collections.ConfigDict) -> str:
  """The tokenizer a workdir's model uses: its config's, or the one saved with it."""
  if config.data.get("tokenizer_path", ""):
    return config.data.tokenizer_path
  if config.data.get("tokenizer_kind", "sentencepiece") == "wordpiece":
    return os.path.join(workdir, checkpoints.WORDPIECE_FILE)
  return os.path.join(workdir, checkpoints.TOKENIZER_FILE)


def abstract_params(model: M6, mesh: Mesh, rules) -> Any:
  """The parameter tree as ShapeDtypeStructs carrying their shardings on `mesh`."""
  boxed = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), dummy_batch(model.config), deterministic=True)
  )["params"]
  shardings = partitioning.logical_to_shardings(boxed, mesh, rules)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )


def load_model(
  workdir: str,
  step: int | None = None,
  config: ml_collections.ConfigDict | None = None,
  best: bool = False,
  devices: Sequence[jax.Device] | None = None,
) -> LoadedModel:
  """The checkpoint `step` (None: the newest intact one; `best`: the kept best one) of
  `workdir` (a trained workdir or an export) with its tokenizer, its parameters on the
  config's mesh over `devices` (default: all). `config` None uses the checkpoint's own
  config; a given config must match the checkpoint's parameter shapes (else CheckpointError
  naming the first mismatch) and the tokenizer the checkpoint's fingerprint. A damaged
  latest step is one warning line and the step before it is loaded; a damaged `step` or
  best step is a DamagedCheckpoint (m6_jax/checkpoint/checkpoints.py)."""
  devices = list(devices if devices is not None else jax.devices())
  given = config

  def load(ckpts: checkpoints.Checkpoints, step: int) -> LoadedModel:
    saved = checkpoints.saved_config(ckpts, step, workdir)
    config = inference_config(saved, given, len(devices))
    mesh = partitioning.make_mesh(config, devices)
    rules = partitioning.logical_rules(config)
    model = M6(M6Config.from_config(config))
    path = tokenizer_path(workdir, config)
    if not os.path.exists(path):
      raise CheckpointError(
        f"no tokenizer at {path}: the workdir must hold the tokenizer its model was trained with."
      )
    tokenizer = tokenizer_lib.load_tokenizer(path, bool(config.data.clean_up_tokenization_spaces))
    target = abstract_params(model, mesh, rules)
    loaded = checkpoints.read_params(ckpts, step, target, tokenizer, path)
    return LoadedModel(
      config, model, loaded.params, tokenizer, loaded.step, workdir, mesh, rules, loaded.directory
    )

  if best:  # the best step is one step: nothing to fall back to
    instead = "load the workdir's latest intact step instead of the best one"
    loaded = checkpoints.load_intact(checkpoints.best_dir(workdir), load, step, False, instead)
  else:
    loaded = checkpoints.load_intact(workdir, load, step)
  logging.info("%s", partitioning.describe_placement(loaded.mesh, loaded.params))
  return loaded


def init_model(
  config: ml_collections.ConfigDict, tokenizer, seed: int = 0, mesh: Mesh | None = None
) -> LoadedModel:
  """Freshly initialised parameters (the "untrained model" baseline), on `mesh`."""
  mesh = mesh or partitioning.make_mesh(config)
  rules = partitioning.logical_rules(config)
  model = M6(M6Config.from_config(config))
  shardings = jax.tree.map(lambda a: a.sharding, abstract_params(model, mesh, rules))

  def init(rng):
    variables = model.init(rng, dummy_batch(model.config), deterministic=True)
    return nn.unbox(variables["params"])

  with partitioning.mesh_context(mesh, rules):
    params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
  return LoadedModel(config, model, params, tokenizer, 0, "", mesh, rules)


def make_inputs(
  model: LoadedModel, images: Sequence[np.ndarray | None], sources: Sequence[str]
) -> dict[str, np.ndarray]:
  """The decoding prefix features for rows (uint8 image or None, source text), built as
  the tasks build them in training (the source texts as `task_sources` makes them)."""
  d = model.config.data
  shape, src_len = (int(d.image_size), int(d.image_size), 3), int(d.src_len)
  rows = []
  for image, text in zip(images, sources):
    ids = model.tokenizer.encode_source(text)[:src_len] if text else []
    if image is None and not ids:
      raise GenerationError("a row has neither an image nor source text; nothing to condition on.")
    rows.append(tasks.prefix_features(image, shape, ids, src_len))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def task_sources(
  task: tasks.Task, texts: Sequence[str], config: ml_collections.ConfigDict
) -> list[str]:
  """The source texts of `task` for its text inputs (e.g. captioning's data.caption_prompt)."""
  return [task.generation.source(text, config.data) for text in texts]


def decode(
  model: LoadedModel,
  batch: dict[str, np.ndarray],
  decoding_method: str = "greedy",
  max_len: int = 0,
  beam_size: int = 4,
  length_penalty: float = 0.6,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  no_repeat_ngram_size: int = 0,
  row_seeds: Sequence[int] | None = None,
  language: str = "auto",
) -> list[str]:
  """Decodes every row of `batch` on the model's mesh; returns the texts (EOS and padding
  removed). Every process passes the whole batch and gets every text. Sampling draws the
  whole batch with the key of `seed`, or, given `row_seeds`, row i with the key of
  row_seeds[i] alone, so that its text does not depend on the rows beside it (a batch of one
  row samples the same with either).

  `language` keeps each text in one language: "en" or "zh" decode with that language's
  tokens and those of no script (punctuation, digits, EOS) only, from the first token;
  "auto" decodes freely, then decodes again the rows whose text mixes Han characters and
  Latin letters, restricted to the language of their first one (the model's own choice), and
  leaves the others as they were; "any" never decodes again (a converted OFA-CN model's
  "白色T恤" is one language). A preset that reproduces a decoder choosing among every
  token (ofa_caption) is left as that decoder makes it under "auto"."""
  if decoding_method not in DECODINGS:
    raise GenerationError(f"unknown decoding '{decoding_method}'; one of {DECODINGS}.")
  if language not in LANGUAGES:
    raise GenerationError(f"unknown language {language!r}; one of {', '.join(LANGUAGES)}.")
  strategy = decoding.STRATEGIES[decoding_method]
  tgt_len = int(model.config.data.tgt_len)
  max_len = int(max_len) or strategy.max_len or tgt_len
  if not 1 <= max_len <= tgt_len:
    raise GenerationError(
      f"--max_len={max_len} must be in [1, {tgt_len}]: the model has data.tgt_len={tgt_len} "
      "target positions."
    )
  tok = model.tokenizer
  vocab_size = model.model.config.total_vocab_size

  def allowed(lang: str | None) -> np.ndarray | None:
    """The tokens to choose from: never a special token, nor an image code (a preset
    reproducing a decoder that chooses among every token excepted), and those of `lang`."""
    mask = None if strategy.every_token else tok.text_token_mask(vocab_size)
    if lang is None:
      return mask
    in_lang = tok.language_token_masks(vocab_size)[lang]
    return in_lang if mask is None else mask & in_lang

  with model.mesh_context():
    inputs, rows = partitioning.put_full_batch(batch, model.mesh, model.rules)
    rng = jax.random.PRNGKey(seed)
    if row_seeds is not None:
      keys = np.stack([_seed_key(int(s)) for s in row_seeds])
      rng = partitioning.put_full_batch({"rng": keys}, model.mesh, model.rules)[0]["rng"]
    offered = dict(
      beam_size=beam_size,
      no_repeat_ngram_size=no_repeat_ngram_size,
      length_penalty=length_penalty,
      rng=rng,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
    )
    options = {k: v for k, v in offered.items() if k in strategy.options}

    def texts(lang: str | None) -> list[str]:
      output = decoding.decode(
        model.model,
        model.params,
        inputs,
        decoding_method,
        max_len,
        tok.bos_id,
        tok.eos_id,
        allowed(lang),
        **options,
      )
      ids = multihost.to_host(strategy.best(output))[:rows]
      return [tok.decode(row) for row in np.asarray(ids)]

    if language != "auto":
      return texts(None if language == "any" else language)
    out = texts(None)
    if strategy.every_token:
      return out
    # The rows that mixed, by the language they began in; the batch is decoded again (the
    # same shapes: no new compilation) once per language, and only those rows take its text.
    mixed = {i: scripts.first_language(t) for i, t in enumerate(out) if scripts.mixes_languages(t)}
    for lang in sorted(set(mixed.values())):
      again = texts(lang)
      out = [again[i] if mixed.get(i) == lang else text for i, text in enumerate(out)]
    return out


@functools.lru_cache(maxsize=4096)
def _seed_key(seed: int) -> np.ndarray:
  return np.asarray(jax.random.PRNGKey(seed))


def decode_in_batches(
  model: LoadedModel, images, sources, batch_size: int = 64, **decode_kwargs
) -> list[str]:
  """`decode` over any number of rows, in fixed-size batches (the last one padded with
  copies of its first row, so that every batch has the shape the first one compiled)."""
  out: list[str] = []
  for start in range(0, len(sources), batch_size):
    imgs, srcs = list(images[start : start + batch_size]), list(sources[start : start + batch_size])
    real = len(srcs)
    pad = batch_size - real if len(sources) > batch_size else 0
    imgs += [imgs[0]] * pad
    srcs += [srcs[0]] * pad
    out += decode(model, make_inputs(model, imgs, srcs), **decode_kwargs)[:real]
  return out


# The arguments of `generate` that give texts, by the name a task gives its text
# (`Generation.text_name`): --question and --prompt give those of that name, --text any.
TEXT_ARGUMENTS = ("question", "prompt", "text")


def _generating_tasks() -> list[str]:
  return [n for n in tasks.names() if tasks.get(n).generation is not None]


def named_task(config: ml_collections.ConfigDict, name: str, workdir: str = "") -> tasks.Task:
  """The task `--task=name` asks for, if the model of `config` was trained on it (a positive
  data.task_weights); GenerationError otherwise."""
  if name not in tasks.names():
    raise GenerationError(
      f"unknown --task {name!r}; the registered tasks are {list(tasks.names())} (a task "
      "defined outside m6_jax is registered by its module in data.task_modules)."
    )
  weights = dict(config.data.task_weights)
  if float(weights.get(name, 0.0)) <= 0:
    trained = [n for n, w in weights.items() if w > 0]
    raise GenerationError(
      f"the model{f' in {workdir}' if workdir else ''} was not trained on task {name!r} "
      f"(data.task_weights.{name}=0); it was trained on {trained}."
    )
  return tasks.get(name)


def _inputs_task(has_image: bool, text_arg: str | None) -> tasks.Task:
  """The first registered task that takes these inputs (no --task): the one whose text is
  named `text_arg` (no text: one that takes an image alone)."""
  if text_arg is None and not has_image:
    raise GenerationError(
      "nothing to generate from: pass --image (caption), --image and --question (VQA) "
      "or --prompt (text continuation)."
    )
  if text_arg == "text":
    raise GenerationError(f"--text is the text of a --task; name one of {_generating_tasks()}.")
  for name in _generating_tasks():
    g = tasks.get(name).generation
    if (g.text == "none") if text_arg is None else (g.text_name == text_arg):
      return tasks.get(name)
  raise GenerationError(f"no registered task generates from {text_arg or 'an image alone'}.")


def _check_inputs(task: tasks.Task, has_image: bool, text_arg: str | None, named: bool) -> None:
  """GenerationError when `task` does not take these inputs."""
  g = task.generation
  if g is None:
    raise GenerationError(
      f"task {task.name!r} does not generate text from an image or a text; the tasks that "
      f"do are {_generating_tasks()}."
    )
  subject = f"--task={task.name}" if named else f"--{text_arg}"
  what = "an image" + (f" and a {g.text_name}" if g.text != "none" else "")
  if g.image == "none":
    what = f"a {g.text_name} alone"
  if g.image == "required" and not has_image:
    raise GenerationError(f"{subject} needs an --image (task {task.name!r} generates from {what}).")
  if g.image == "none" and has_image:
    raise GenerationError(f"{subject} takes no --image (task {task.name!r} generates from {what}).")
  if g.text == "none" and text_arg is not None:
    raise GenerationError(f"--task={task.name} takes no text; drop --{text_arg}.")
  flags = f"--{g.text_name} or --text" if g.text_name in TEXT_ARGUMENTS[:-1] else "--text"
  if g.text != "none" and text_arg is None:
    raise GenerationError(f"--task={task.name} needs a {g.text_name}: pass it with {flags}.")
  if text_arg not in (None, "text", g.text_name):
    raise GenerationError(f"--task={task.name} takes a {g.text_name} ({flags}), not --{text_arg}.")


def inputs_task(
  model: LoadedModel, has_image: bool, text_arg: str | None, task: str | None = None
) -> tasks.Task:
  """The task that generates from these inputs (an image or not, a text named `text_arg`:
  question, prompt, text, or None): `task` when named (trained on and taking them), else the
  first registered task that takes them; GenerationError otherwise."""
  if task is None:
    chosen = _inputs_task(has_image, text_arg)
  else:
    chosen = named_task(model.config, task, model.workdir)
  _check_inputs(chosen, has_image, text_arg, named=task is not None)
  return chosen


def generate(
  model: LoadedModel,
  images: Sequence[str] = (),
  questions: Sequence[str] = (),
  prompt: str | None = None,
  *,
  texts: Sequence[str] = (),
  task: str | None = None,
  **decode_kwargs,
) -> list[dict[str, Any]]:
  """Rows {task, image, <the task's text name>, output} for the given inputs.

  `task` (a registry name the model was trained on) takes the inputs its `generation`
  says; its text comes from `texts`, or from `questions` / `prompt` when it names its text
  so. Without a task the inputs decide: images alone are captioned, images + questions
  answered, a prompt continued (conditioned on the images if any). Texts: one for all
  images or one per image (no image: one row per text).
  """
  if prompt is not None and not prompt.strip():
    raise GenerationError("the prompt is empty; pass some text with --prompt.")
  given = {"question": list(questions), "prompt": [] if prompt is None else [prompt]}
  given["text"] = list(texts)
  named = [arg for arg in TEXT_ARGUMENTS if given[arg]]
  if len(named) > 1:
    raise GenerationError(f"pass either --{named[0]} or --{named[1]}, not both.")
  text_arg = named[0] if named else None
  values = given[text_arg] if text_arg else []
  if any(not v.strip() for v in values):
    raise GenerationError(f"a {text_arg} is empty; pass some text with --{text_arg}.")
  chosen = inputs_task(model, bool(images), text_arg, task)
  if images and len(values) > 1 and len(values) != len(images):
    raise GenerationError(
      f"got {len(values)} {text_arg}s for {len(images)} images; pass one {text_arg} for all "
      "images or one per image."
    )
  size = int(model.config.data.image_size)
  pixels = [images_lib.load_image_file(p, size) for p in images]
  names: list[str | None] = list(images)
  if not images:
    pixels, names = [None] * len(values), [None] * len(values)
  row_texts = values * len(pixels) if len(values) == 1 else values or [""] * len(pixels)
  sources = task_sources(chosen, row_texts, model.config)
  outputs = decode(model, make_inputs(model, pixels, sources), **decode_kwargs)
  key = chosen.generation.text_name if chosen.generation.text != "none" else None
  rows = []
  for name, text, out in zip(names, row_texts, outputs):
    row: dict[str, Any] = {"task": chosen.name}
    if name is not None:
      row["image"] = name
    if key:
      row[key] = text
    row["output"] = out
    rows.append(row)
  return rows


def write_jsonl(rows: Sequence[dict], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
