"""The M6 tasks: one registry entry per task, next to its example -> features function.

A task turns an example (the synthetic world's ``make_example`` format, which prepared user
data is read into: ``image`` uint8, ``caption_en`` / ``caption_zh``, a ``qa`` list, and the
columns of fields registered by task modules) into the feature contract of
``m6_jax/model/features.py``. Everything else about a task derives from its ``Task`` entry,
so adding one is a ``register(Task(...))`` call beside its function (docs/tasks.md):

  * config: the key ``data.task_weights.<name>`` and its default (``default_weight``); a
    task defined outside the package is registered by naming its module in
    ``data.task_modules`` (``task_modules.py``);
  * task ids and the task count: the registry order (per-task losses, the AOT report);
  * user data: the record fields it ``needs`` (``fields.py``: what ``prepare_data`` stores
    and reads), the records it can use (``sources.py``) and the per-task record counts
    ``prepare_data`` prints;
  * evaluation: its ``eval_kind``, a name in ``evaluation/eval_kinds.py`` (how held-out
    inputs are extracted and outputs scored, the metric names), and the most tokens to
    decode for it (``decode_len``);
  * generation: ``--mode=generate --task=<name>`` takes the inputs its ``generation`` says
    (an image: required / optional / none; a text: required / none) and builds the source
    as it says (``infer/generate.py``); without --task the inputs pick the first task that
    takes them;
  * image codes: a task that ``needs_codes`` reads ``example["image_codes"]`` (attached when
    ``data.image_codes_dir`` is set), config validation says so when it is not, and
    ``--mode=generate --task=<it>`` draws images.

A task function is ``fn(example, tokenizer, rng, cfg) -> features``. All randomness
(language, noise spans, question choice) comes from ``rng``, so a seeded generator makes it
reproducible. ``cfg`` is any attribute object (``TaskConfig``, an ml_collections ConfigDict,
...) with ``src_len``, ``tgt_len`` and optionally ``noise_density`` (0.15) and
``mean_noise_span_length`` (3.0); text-to-image also reads ``code_offset`` (the model's text
vocabulary size: code c is token id code_offset + c) and ``guidance_drop_rate`` (0.1).
Over-long texts are truncated so that the source fits ``src_len`` and the target fits
``tgt_len`` with room for BOS (in tgt_input) and EOS (in tgt_target).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from m6_jax.data import fields, span_corruption
from m6_jax.model import features

LANGUAGES = ("en", "zh")

# Classifier-free guidance training: the share of text-to-image captions dropped.
GUIDANCE_DROP_RATE = 0.1

TaskFn = Callable[[dict, Any, np.random.Generator, Any], dict]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The fields the tasks read (any object with these attributes works)."""

  src_len: int = 32
  tgt_len: int = 32
  noise_density: float = span_corruption.NOISE_DENSITY
  mean_noise_span_length: float = span_corruption.MEAN_NOISE_SPAN_LENGTH
  code_offset: int = 0  # model.vocab_size: image code c is token id code_offset + c
  guidance_drop_rate: float = GUIDANCE_DROP_RATE
  caption_prompt: str = ""  # captioning's source text (a converted OFA model's prompt)


def _text_as_source(text: str, data_cfg) -> str:
  return text


@dataclasses.dataclass(frozen=True)
class Generation:
  """What a task generates from (``--mode=generate --task=<name>``, evaluation): an image
  ("required", "optional" or "none"), a text ("required" or "none") named ``text_name`` (the
  --question / --prompt flag of that name gives it, --text gives any; the key of the output
  row), and how the text becomes the source text, given the config's ``data`` section."""

  image: str = "required"
  text: str = "required"
  text_name: str = "text"
  source: Callable[[str, Any], str] = _text_as_source

  def __post_init__(self):
    if self.image not in ("required", "optional", "none") or self.text not in ("required", "none"):
      raise ValueError(
        f"bad generation inputs {self}: image required/optional/none, text required/none"
      )
    if self.text == "none" and self.image != "required":
      raise ValueError("a task that generates from no text needs an image: image='required'")


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: its name (the key of ``data.task_weights``), its example function, the record
  fields it needs (and whether it needs the images' codes), the eval kind that scores its
  generations, what it generates from, and its default mixture weight."""

  name: str
  build: TaskFn
  needs: tuple[str, ...] = ("caption",)
  eval_kind: str | None = None  # a name of evaluation/eval_kinds.py's registry
  default_weight: float = 0.0
  decode_len: int = 0  # most tokens to generate for it, EOS included (0: data.tgt_len)
  needs_codes: bool = False  # reads example["image_codes"] (data.image_codes_dir)
  generation: Generation | None = None  # None: not a task to generate text with


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
  """Adds a task (its id is its position in registration order); returns it."""
  if not task.name.isidentifier() or task.name in _REGISTRY:
    raise ValueError(f"task name {task.name!r} must be a new identifier; have {names()}")
  unknown = set(task.needs) - set(fields.names())
  if unknown:
    raise ValueError(
      f"task {task.name!r} needs unknown record fields {sorted(unknown)}: {fields.names()} "
      "(register a new one with m6_jax.data.fields.register)"
    )
  if task.eval_kind is not None and task.generation is None:
    raise ValueError(f"task {task.name!r} has eval_kind {task.eval_kind!r} but no generation")
  _REGISTRY[task.name] = task
  return task


def unregister(name: str) -> None:
  """Removes a task (tests that register their own use this to clean up)."""
  del _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered task names; a task's id is its index here."""
  return tuple(_REGISTRY)


def get(name: str) -> Task:
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; the registered tasks are {list(names())}")
  return _REGISTRY[name]


def task_id(name: str) -> int:
  return names().index(get(name).name)


def default_weights() -> dict[str, float]:
  """{task: default weight}: the default ``data.task_weights``."""
  return {t.name: float(t.default_weight) for t in _REGISTRY.values()}


# --------------------------------------------------------------------------------------
# Feature assembly
# --------------------------------------------------------------------------------------


def _pad(ids: Sequence[int], length: int, what: str) -> np.ndarray:
  if len(ids) > length:  # the task functions truncate first; this guards the contract
    raise ValueError(f"{what} has {len(ids)} tokens, more than its length {length}")
  out = np.zeros(length, dtype=np.int32)
  out[: len(ids)] = ids
  return out


def prefix_features(
  image: np.ndarray | None, image_shape: Sequence[int], src: Sequence[int], src_len: int
) -> dict[str, np.ndarray]:
  """The prefix part of the features (image uint8 or None, source ids): what the model
  reads before the target, in training and in generation alike."""
  return {
    "image": np.zeros(image_shape, np.float32) if image is None else features.pixels(image),
    "has_image": np.int32(image is not None),
    "src_tokens": _pad(src, int(src_len), "source"),
  }


def make_features(
  image: np.ndarray | None,
  image_shape: Sequence[int],
  src: Sequence[int],
  tgt: Sequence[int],
  task_name: str,
  tokenizer,
  cfg,
) -> dict[str, np.ndarray]:
  """Assembles the feature dict; ``tgt`` gets BOS (input) and EOS (target) added here."""
  tgt_len = int(cfg.tgt_len)
  tgt = list(tgt)
  return {
    **prefix_features(image, image_shape, src, int(cfg.src_len)),
    "tgt_input": _pad([tokenizer.bos_id] + tgt, tgt_len, "target input"),
    "tgt_target": _pad(tgt + [tokenizer.eos_id], tgt_len, "target"),
    "tgt_weights": (np.arange(tgt_len) < len(tgt) + 1).astype(np.float32),
    "task_id": np.int32(task_id(task_name)),
  }


def empty_features(image_shape: Sequence[int], cfg) -> dict[str, np.ndarray]:
  """All-zero features with zero weights: padding rows for a last, partial eval batch."""
  shapes = features.feature_shapes(int(image_shape[0]), int(cfg.src_len), int(cfg.tgt_len))
  return features.zeros(shapes)


def _pick_language(rng: np.random.Generator) -> str:
  return LANGUAGES[int(rng.integers(len(LANGUAGES)))]


def _caption_ids(example, tokenizer, rng) -> list[int]:
  return tokenizer.encode(example[f"caption_{_pick_language(rng)}"])


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------


def text_to_text(example, tokenizer, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Text-only span in-filling: corrupted caption -> sentinel-delimited missing spans."""
  density, mean_span = span_corruption.noise_params(cfg)
  ids = _caption_ids(example, tokenizer, rng)
  # Longest prefix whose corruption fits: the source is never longer than the text, the
  # target is num_noise + num_spans tokens plus EOS; both are known before sampling.
  length = min(len(ids), int(cfg.src_len))
  while length > 0:
    num_noise, num_spans = span_corruption.span_counts(
      length, density, mean_span, tokenizer.num_sentinels
    )
    if num_noise + num_spans + 1 <= int(cfg.tgt_len):
      break
    length -= 1
  ids = ids[:length]
  mask = span_corruption.random_spans_noise_mask(
    length, density, mean_span, rng, tokenizer.num_sentinels
  )
  source, target = span_corruption.corrupt_spans(ids, mask, tokenizer)
  return make_features(None, example["image"].shape, source, target, "text_to_text", tokenizer, cfg)


def caption_source(text: str, cfg) -> str:
  """Captioning's source text: data.caption_prompt (usually none; a converted OFA model is
  prompted as OFA prompts it), in training and generation alike."""
  return str(getattr(cfg, "caption_prompt", "") or "")


def image_to_text(example, tokenizer, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Captioning: image -> caption (source text: data.caption_prompt, usually none)."""
  ids = _caption_ids(example, tokenizer, rng)[: int(cfg.tgt_len) - 1]
  prompt = caption_source("", cfg)
  src = tokenizer.encode_source(prompt)[: int(cfg.src_len)] if prompt else []
  return make_features(
    example["image"], example["image"].shape, src, ids, "image_to_text", tokenizer, cfg
  )


def multimodal_to_text(example, tokenizer, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Image + caption with spans replaced by <mask> -> the whole original caption."""
  density, mean_span = span_corruption.noise_params(cfg)
  ids = _caption_ids(example, tokenizer, rng)
  ids = ids[: min(int(cfg.src_len), int(cfg.tgt_len) - 1)]
  mask = span_corruption.random_spans_noise_mask(len(ids), density, mean_span, rng)
  source = span_corruption.replace_spans(ids, mask, tokenizer.mask_id)
  return make_features(
    example["image"], example["image"].shape, source, ids, "multimodal_to_text", tokenizer, cfg
  )


def vqa(example, tokenizer, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Visual question answering: image + question -> answer (in the question's language)."""
  lang = _pick_language(rng)
  candidates = [qa for qa in example["qa"] if qa["lang"] == lang]
  if not candidates:
    raise ValueError(f"example {example.get('index')} has no {lang} question")
  qa = candidates[int(rng.integers(len(candidates)))]
  question = tokenizer.encode(qa["question"])[: int(cfg.src_len)]
  answer = tokenizer.encode(qa["answer"])[: int(cfg.tgt_len) - 1]
  return make_features(
    example["image"], example["image"].shape, question, answer, "vqa", tokenizer, cfg
  )


def text_lm(example, tokenizer, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Text generation (prefix language modelling on text alone): the first pieces of a caption
  -> the rest of it. What `--prompt` asks of the model: continue a text."""
  ids = _caption_ids(example, tokenizer, rng)
  if len(ids) < 2:
    source, target = ids, []
  else:
    cut = int(rng.integers(1, len(ids)))  # at least one piece on each side
    source, target = ids[:cut], ids[cut:]
  source = source[-int(cfg.src_len) :]  # the pieces nearest the cut matter most
  target = target[: int(cfg.tgt_len) - 1]
  return make_features(None, example["image"].shape, source, target, "text_lm", tokenizer, cfg)


def text_to_image(example, tokenizer, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Text-to-image: caption -> the h x w image codes, row-major, as token ids
  ``code_offset + code`` (no image in the prefix). With probability ``guidance_drop_rate``
  the caption is dropped (empty source): the unconditional model that classifier-free
  guidance needs, learned by the same weights."""
  if "image_codes" not in example:
    raise ValueError(
      f"example {example.get('index')} has no image codes; text_to_image needs "
      "data.image_codes_dir, a directory of VQGAN codes of the images"
    )
  offset = int(getattr(cfg, "code_offset", 0))
  if offset <= 0:  # codes at ids 0.. would be read as text pieces
    raise ValueError("text_to_image needs cfg.code_offset = model.vocab_size > 0")
  codes = np.asarray(example["image_codes"]).reshape(-1)
  target = (offset + codes.astype(np.int64)).tolist()
  if len(target) + 1 > int(cfg.tgt_len):
    raise ValueError(
      f"text_to_image targets {len(target)} codes and EOS, more than data.tgt_len={cfg.tgt_len}"
    )
  caption = _caption_ids(example, tokenizer, rng)[: int(cfg.src_len)]
  drop_rate = float(getattr(cfg, "guidance_drop_rate", GUIDANCE_DROP_RATE))
  source = [] if rng.random() < drop_rate else caption
  image_shape = example["image"].shape
  return make_features(None, image_shape, source, target, "text_to_image", tokenizer, cfg)


CAPTIONING = Generation(image="required", text="none", source=caption_source)
QUESTION = Generation(image="required", text="required", text_name="question")
PROMPT = Generation(image="optional", text="required", text_name="prompt")

register(Task("text_to_text", text_to_text, needs=("caption",), default_weight=1.0))
register(Task("image_to_text", image_to_text, ("caption",), "caption", 1.0, generation=CAPTIONING))
register(Task("multimodal_to_text", multimodal_to_text, ("caption",), default_weight=1.0))
# Answers are 1-3 pieces; 8 tokens (EOS included) is plenty.
register(Task("vqa", vqa, ("qa",), "vqa", 0.0, decode_len=8, generation=QUESTION))
# A prompt's continuation, conditioned on an image when one is given.
register(Task("text_lm", text_lm, ("caption",), "text", 0.0, generation=PROMPT))
# No generation metric here: the images are judged elsewhere; its teacher-forced loss and
# accuracy are evaluated like every task's. `--mode=generate --task=text_to_image` draws.
register(Task("text_to_image", text_to_image, ("caption",), needs_codes=True, default_weight=0.0))


def random_features_batch(batch_size: int, config, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of this feature contract, random but valid (for tests, benchmarks and
  compilation): some examples without an image, ragged source and target lengths, padding
  id 0, BOS first. `config` is a full config (reads model.vocab_size and data.*)."""
  rng = np.random.default_rng(seed)
  d, vocab = config.data, config.model.vocab_size
  src_lens = rng.integers(0, d.src_len + 1, batch_size)
  tgt_lens = rng.integers(1, d.tgt_len + 1, batch_size)
  src = rng.integers(4, vocab, (batch_size, d.src_len))
  tgt = rng.integers(4, vocab, (batch_size, d.tgt_len + 1))
  pos_s, pos_t = np.arange(d.src_len)[None], np.arange(d.tgt_len)[None]
  src = np.where(pos_s < src_lens[:, None], src, 0)
  tgt_input = np.where(pos_t < tgt_lens[:, None], tgt[:, :-1], 0)
  tgt_input[:, 0] = 2  # BOS
  tgt_target = np.where(pos_t < tgt_lens[:, None], tgt[:, 1:], 0)
  has_image = rng.integers(0, 2, batch_size)
  # Text-only examples need some source text so that every example has a real prefix.
  src[:, 0] = np.where(has_image == 0, rng.integers(4, vocab, batch_size), src[:, 0])
  image = rng.random((batch_size, d.image_size, d.image_size, 3), dtype=np.float32)
  return {
    "image": image * has_image[:, None, None, None].astype(np.float32),
    "has_image": has_image.astype(np.int32),
    "src_tokens": src.astype(np.int32),
    "tgt_input": tgt_input.astype(np.int32),
    "tgt_target": tgt_target.astype(np.int32),
    "tgt_weights": (pos_t < tgt_lens[:, None]).astype(np.float32),
    "task_id": rng.integers(0, len(names()), batch_size).astype(np.int32),
  }
