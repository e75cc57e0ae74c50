"""Validation of a whole config, before anything is built: one `ConfigError` line that names
the offending key and says how to fix it, so a typo never becomes a traceback twenty seconds
into a run.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import ml_collections

from m6_jax.config.defaults import (
  ADAM_MU_DTYPES,
  ARCHITECTURES,
  ATTENTION_IMPLS,
  DTYPES,
  FAMILIES,
  IMAGE_STEMS,
  MOE_DISPATCH_MODES,
  REMAT_POLICIES,
  SCHEDULES,
  TOKENIZER_KINDS,
  default_config,
)
from m6_jax.data import shard_files, splits, task_modules, tasks
from m6_jax.data.codes_info import codes_mismatch, read_codes_info
from m6_jax.errors import ConfigError
from m6_jax.errors import require as _require
from m6_jax.model import ofa_options as ofa
from m6_jax.parallel import axes


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat_keys(v, name + "."))
    else:
      out[name] = v
  return out


def _check_known_keys(config: ml_collections.ConfigDict) -> None:
  known = _flat_keys(default_config())
  for key in _flat_keys(config):
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f" Did you mean '{close[0]}'?" if close else ""
      section = key.rsplit(".", 1)[0] if "." in key else ""
      siblings = sorted(k for k in known if k.rsplit(".", 1)[0] == section and "." in k)
      raise ConfigError(
        f"Unknown config key '{key}'.{hint} Known keys"
        f"{' in ' + repr(section) if section else ''}: {', '.join(siblings) or '(top level)'}."
      )


def moe_layer_indices(model: ml_collections.ConfigDict) -> list[int]:
  """Indices of the MoE layers: every `moe_every`-th layer (none for a dense model)."""
  if model.moe_num_experts <= 0:
    return []
  return [i for i in range(model.num_layers) if (i + 1) % model.moe_every == 0]


def stack_depths(model: ml_collections.ConfigDict) -> dict[str, int]:
  """{stack: layers}: {"unified": num_layers}, or the encoder's and the decoder's."""
  if model.architecture != "encoder_decoder":
    return {"unified": model.num_layers}
  return {
    "encoder": model.num_encoder_layers or model.num_layers,
    "decoder": model.num_decoder_layers or model.num_layers,
  }


def _depth_text(stack: str, depth: int) -> str:
  """How a message names a stack's depth."""
  if stack == "unified":
    return f"model.num_layers={depth}"
  return f"the {stack}'s depth {depth} (model.num_{stack}_layers; 0: model.num_layers)"


def _validate_architecture(m: ml_collections.ConfigDict) -> None:
  _require(
    m.architecture in ARCHITECTURES,
    f"model.architecture='{m.architecture}' is not one of {ARCHITECTURES}.",
  )
  for key in ("num_encoder_layers", "num_decoder_layers"):
    _require(m[key] >= 0, f"model.{key}={m[key]} must be >= 0 (0: model.num_layers).")
    _require(
      m[key] == 0 or m.architecture == "encoder_decoder",
      f"model.{key}={m[key]} sizes a stack of model.architecture='encoder_decoder'; the "
      f"'{m.architecture}' model has model.num_layers layers (set {key}=0 or change the "
      "architecture).",
    )


def _validate_moe_and_stack(config: ml_collections.ConfigDict) -> None:
  m = config.model
  _validate_architecture(m)
  _require(
    m.remat_policy in REMAT_POLICIES,
    f"model.remat_policy='{m.remat_policy}' is not one of {REMAT_POLICIES}.",
  )
  _require(
    m.attention_impl in ATTENTION_IMPLS,
    f"model.attention_impl='{m.attention_impl}' is not one of {ATTENTION_IMPLS}.",
  )
  _require(
    not m.attention_interpret or m.attention_impl == "splash",
    "model.attention_interpret=True runs the splash kernel in Pallas interpret mode; it needs "
    f"model.attention_impl='splash' (got '{m.attention_impl}').",
  )
  e = m.moe_num_experts
  _require(e >= 0, f"model.moe_num_experts={e} must be >= 0 (0 = dense feed-forward).")
  if e == 0:
    return
  _require(
    m.moe_num_groups >= 1 and m.moe_top_k >= 1,
    f"model.moe_num_groups={m.moe_num_groups} and model.moe_top_k={m.moe_top_k} must be >= 1.",
  )
  _require(
    e % m.moe_num_groups == 0,
    f"model.moe_num_experts={e} is not divisible by model.moe_num_groups={m.moe_num_groups}; "
    "expert prototyping splits the experts into equal groups, pick a divisor.",
  )
  _require(
    m.moe_top_k <= e // m.moe_num_groups,
    f"model.moe_top_k={m.moe_top_k} exceeds the {e // m.moe_num_groups} experts of a group "
    f"(model.moe_num_experts / model.moe_num_groups); lower model.moe_top_k.",
  )
  _require(
    m.moe_capacity_factor > 0 and m.moe_eval_capacity_factor > 0,
    f"model.moe_capacity_factor={m.moe_capacity_factor} and model.moe_eval_capacity_factor="
    f"{m.moe_eval_capacity_factor} must be positive.",
  )
  _require(
    m.moe_dispatch in MOE_DISPATCH_MODES,
    f"model.moe_dispatch='{m.moe_dispatch}' is not one of {MOE_DISPATCH_MODES}.",
  )
  rows, micro = m.moe_group_rows, config.data.batch_size // max(config.train.grad_accum_steps, 1)
  _require(
    rows >= 1 and micro % rows == 0,
    f"model.moe_group_rows={rows} must be >= 1 and divide the {micro} rows of a (micro-)batch "
    "(data.batch_size / train.grad_accum_steps).",
  )
  depths = stack_depths(m)
  for stack, depth in depths.items():
    _require(
      1 <= m.moe_every <= depth,
      f"model.moe_every={m.moe_every} must be in [1, {_depth_text(stack, depth)}].",
    )
  _require(
    m.moe_aux_loss_weight >= 0 and m.moe_z_loss_weight >= 0,
    "model.moe_aux_loss_weight and model.moe_z_loss_weight must be >= 0.",
  )
  if m.scan_layers:
    for stack, depth in depths.items():
      _require(
        depth % m.moe_every == 0,
        f"model.scan_layers scans groups of model.moe_every={m.moe_every} layers (the last "
        f"one MoE), so {_depth_text(stack, depth)} must be a multiple of it.",
      )


def _validate_bucketing(d: ml_collections.ConfigDict) -> None:
  b = d.length_bucket
  _require(b >= 0, f"data.length_bucket={b} must be >= 0 (0 = no length bucketing).")
  _require(
    d.bucket_window >= 0,
    f"data.bucket_window={d.bucket_window} must be >= 0 (0 = no sorting by length).",
  )
  _require(
    d.bucket_window == 0 or b > 0,
    f"data.bucket_window={d.bucket_window} sorts by bucketed length and needs "
    "data.length_bucket > 0; set a bucket or data.bucket_window=0.",
  )
  if b > 0:
    _require(
      d.src_len % b == 0 and d.tgt_len % b == 0,
      f"data.src_len={d.src_len} and data.tgt_len={d.tgt_len} must be multiples of "
      f"data.length_bucket={b}; pick a bucket that divides both (or 0 to turn it off).",
    )


def _validate_source(d: ml_collections.ConfigDict) -> None:
  _require(d.source in splits.SOURCES, f"data.source='{d.source}' is not one of {splits.SOURCES}.")
  if d.source != "shards":
    return
  _require(
    bool(str(d.shards).strip()),
    "data.source='shards' needs data.shards, the train shards' pattern, e.g. "
    "--config.data.shards='/data/wds/train/{00000..00099}.tar'.",
  )
  shard_files.parse_sources(str(d.shards))  # the weights of a mixture of sources
  _require(
    ";" not in str(d.eval_shards),
    f"data.eval_shards={d.eval_shards!r} names several patterns; evaluation reads one (a "
    "mixture of weighted sources is for data.shards): give one pattern, e.g. with {a,b}.",
  )
  formats = ("auto", *shard_files.FORMATS)
  _require(
    d.shard_format in formats, f"data.shard_format='{d.shard_format}' is not one of {formats}."
  )
  _require(
    0.0 <= d.max_bad_fraction <= 1.0,
    f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1].",
  )
  _require(
    d.shuffle_buffer >= 0 and d.max_image_pixels >= 0,
    f"data.shuffle_buffer={d.shuffle_buffer} and data.max_image_pixels={d.max_image_pixels} "
    "must be >= 0.",
  )
  _require(
    d.bucket_window == 0,
    f"data.bucket_window={d.bucket_window} sorts a prepared dataset's records; streamed shards "
    "are shuffled by data.shuffle_buffer instead: set data.bucket_window=0.",
  )
  _require(
    not d.image_codes_dir,
    "data.image_codes_dir (text-to-image codes) reads a prepared dataset or the synthetic "
    "world; prepare the shards with --mode=prepare_data for text-to-image.",
  )


def parse_positions(text: str) -> tuple[int, ...]:
  """'30,31' -> (30, 31) (train.debug_nonfinite_batches)."""
  return tuple(int(x) for x in str(text).replace(" ", "").split(",") if x)


def _validate_optimizer_and_divergence(t: ml_collections.ConfigDict) -> None:
  float32_max = 3.4028234663852886e38
  _require(
    0 <= t.lr < float32_max,
    f"train.lr={t.lr} must be >= 0 and below float32's largest value ({float32_max:.3g}).",
  )
  _require(
    t.eps > 0,
    f"train.eps={t.eps} must be positive: Adam divides by sqrt(v) + eps, and a parameter "
    "with a zero gradient (e.g. an unused position) would get 0/0 = NaN.",
  )
  _require(
    min(t.max_nan_steps, t.max_rollbacks, t.rollback_skip_batches, t.checkpoint_confirm_steps) >= 0,
    "train.max_nan_steps, train.max_rollbacks, train.rollback_skip_batches and "
    "train.checkpoint_confirm_steps must be >= 0.",
  )
  _require(
    t.spike_factor == 0 or t.spike_factor > 1,
    f"train.spike_factor={t.spike_factor} must be 0 (off) or above 1.",
  )
  _require(t.spike_window > 0, f"train.spike_window={t.spike_window} must be positive.")
  _require(
    t.spike_min_increase >= 0,
    f"train.spike_min_increase={t.spike_min_increase} must be >= 0 (nats).",
  )
  _require(
    0 < t.rollback_lr_factor <= 1,
    f"train.rollback_lr_factor={t.rollback_lr_factor} must be in (0, 1].",
  )
  try:
    steps = parse_positions(t.debug_nonfinite_batches)
  except ValueError:
    steps = (-1,)
  _require(
    all(s >= 0 for s in steps),
    f"train.debug_nonfinite_batches='{t.debug_nonfinite_batches}' must be comma-separated "
    "batch positions (0, 1, ...).",
  )


def validate(
  config: ml_collections.ConfigDict,
  num_devices: int,
  process_count: int = 1,
  training: bool = True,
) -> None:
  """Raises ConfigError naming the first problem found, with the fix.

  `training=False` (generation, evaluation, export) leaves out the checks of the training
  batches (length bucketing, their split over the mesh and the processes); the model must
  still fit the mesh.
  """
  task_modules.import_all(config.data.get("task_modules", ""))  # their tasks' keys are known
  _check_known_keys(config)
  m, d, t = config.model, config.data, config.train

  _require(m.family in FAMILIES, f"model.family='{m.family}' is not one of {FAMILIES}.")
  _FAMILY_SECTION_CHECKS.get(m.family, lambda config: None)(config)
  _require(
    m.image_stem in IMAGE_STEMS, f"model.image_stem='{m.image_stem}' is not one of {IMAGE_STEMS}."
  )
  _require(m.dtype in DTYPES, f"model.dtype='{m.dtype}' is not one of {DTYPES}.")
  _require(t.schedule in SCHEDULES, f"train.schedule='{t.schedule}' is not one of {SCHEDULES}.")
  _require(
    t.get("adam_mu_dtype", "float32") in ADAM_MU_DTYPES,
    f"train.adam_mu_dtype='{t.get('adam_mu_dtype')}' is not one of {ADAM_MU_DTYPES}.",
  )
  for key in (
    "d_model",
    "num_layers",
    "num_heads",
    "head_dim",
    "mlp_dim",
    "vocab_size",
    "patch_size",
  ):
    _require(m[key] > 0, f"model.{key}={m[key]} must be positive.")
  for key in ("batch_size", "image_size", "src_len", "tgt_len"):
    _require(d[key] > 0, f"data.{key}={d[key]} must be positive.")
  _require(t.steps > 0, f"train.steps={t.steps} must be positive.")
  _require(0.0 <= m.dropout_rate < 1.0, f"model.dropout_rate={m.dropout_rate} must be in [0, 1).")
  _require(
    m.get("attention_dropout_rate") is None or 0.0 <= m.attention_dropout_rate < 1.0,
    f"model.attention_dropout_rate={m.get('attention_dropout_rate')} must be in [0, 1) or None.",
  )
  _require(
    d.image_size % m.patch_size == 0,
    f"data.image_size={d.image_size} is not divisible by model.patch_size={m.patch_size}; "
    "pick a patch size that tiles the image.",
  )
  _validate_moe_and_stack(config)
  ofa.validate(config, _require)
  _require(
    d.tokenizer_kind in TOKENIZER_KINDS,
    f"data.tokenizer_kind='{d.tokenizer_kind}' is not one of {TOKENIZER_KINDS}.",
  )
  _validate_source(d)
  validate_image_codes(config, training)
  axes.check_model_fits_mesh(config, num_devices)
  if training:
    _validate_bucketing(d)
    axes.check_batch_fits_mesh(config, num_devices, process_count)
  _require(t.peak_flops >= 0, f"train.peak_flops={t.peak_flops} must be >= 0 (0: unknown).")
  weights = dict(d.task_weights)
  _require(
    any(w > 0 for w in weights.values()),
    "data.task_weights gives no task a positive weight; set at least one, e.g. "
    "--config.data.task_weights.image_to_text=1.0.",
  )
  _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0.")
  _validate_optimizer_and_divergence(t)
  _require(
    t.eval_every >= 0 and t.eval_examples >= 0,
    f"train.eval_every={t.eval_every} and train.eval_examples={t.eval_examples} must be >= 0.",
  )
  _require(
    t.log_every > 0 and t.checkpoint_every > 0 and t.keep_checkpoints > 0,
    "train.log_every, train.checkpoint_every and train.keep_checkpoints must be positive.",
  )


def validate_for_counting(config: ml_collections.ConfigDict) -> None:
  """validate() for work that needs no devices (--mode=params): as if the mesh's fixed axes
  had exactly the devices they name (an axis of -1 gets one)."""
  validate(config, math.prod(max(int(config.mesh[a]), 1) for a in axes.MESH_AXES), training=False)


def validate_image_codes(config: ml_collections.ConfigDict, training: bool) -> None:
  """model.code_* and the tasks that generate image codes (registry flag `needs_codes`)."""
  m, d = config.model, config.data
  k, grid = m.code_vocab_size, tuple(m.code_grid)
  _require(k >= 0, f"model.code_vocab_size={k} must be >= 0 (0 = no image codes).")
  _require(
    k == 0 or (len(grid) == 2 and min(grid) > 0),
    f"model.code_grid={grid} must be (h, w) with h, w > 0 when model.code_vocab_size={k}, "
    "e.g. --config.model.code_grid='(6, 6)'.",
  )
  _require(
    0.0 <= d.guidance_drop_rate < 1.0,
    f"data.guidance_drop_rate={d.guidance_drop_rate} must be in [0, 1).",
  )
  weights = dict(d.task_weights)
  code_tasks = [n for n in tasks.names() if tasks.get(n).needs_codes and weights.get(n, 0) > 0]
  if not code_tasks:
    return
  name = code_tasks[0]
  _require(
    k > 0,
    f"{name} generates image codes and needs model.code_vocab_size > 0 (the VQGAN's codebook "
    f"size) and model.code_grid; or set data.task_weights.{name}=0.",
  )
  _require(
    d.tgt_len >= grid[0] * grid[1] + 1,
    f"data.tgt_len={d.tgt_len} must be >= {grid[0] * grid[1] + 1}: {name} targets are the "
    f"{grid[0]}x{grid[1]} codes of model.code_grid and EOS.",
  )
  _require(
    bool(d.image_codes_dir),
    f"{name} needs data.image_codes_dir (the VQGAN codes of the images), e.g. "
    "--config.data.image_codes_dir=/tmp/codes.",
  )
  if training:
    info = read_codes_info(d.image_codes_dir)
    mismatch = codes_mismatch(info["codebook_size"], info["grid"], m)
    _require(
      not mismatch,
      f"the image codes in data.image_codes_dir={d.image_codes_dir!r} do not fit the model: "
      f"{mismatch}.",
    )


def validate_vqgan(config: ml_collections.ConfigDict) -> None:
  v, size, t = config.vqgan, config.data.image_size, config.train
  f = v.downsample_factor
  _require(
    f >= 1 and f & (f - 1) == 0,
    f"vqgan.downsample_factor={f} must be a power of two (1, 2, 4, 8, ...).",
  )
  _require(
    size > 0 and size % f == 0,
    f"data.image_size={size} is not divisible by vqgan.downsample_factor={f}; pick a "
    "factor that tiles the image (48 px: 4 -> 12x12 codes, 8 -> 6x6, 16 -> 3x3).",
  )
  levels = f.bit_length()  # log2(f) + 1
  mults = tuple(v.channel_multipliers)
  _require(
    len(mults) == levels,
    f"vqgan.channel_multipliers={mults} needs {levels} entries for "
    f"vqgan.downsample_factor={f} (one per resolution level, log2(factor) + 1).",
  )
  _require(
    v.channels > 0 and all(m > 0 and v.channels * m % 8 == 0 for m in mults),
    f"vqgan.channels={v.channels} x vqgan.channel_multipliers={mults} must all be positive "
    "multiples of 8 (GroupNorm uses 8 groups).",
  )
  _require(
    2 <= v.codebook_size <= 65536,
    f"vqgan.codebook_size={v.codebook_size} must be in [2, 65536] (codes are stored as uint16).",
  )
  _require(v.code_dim >= 1, f"vqgan.code_dim={v.code_dim} must be >= 1.")
  _require(v.num_res_blocks >= 0, f"vqgan.num_res_blocks={v.num_res_blocks} must be >= 0.")
  _require(0 <= v.ema_decay < 1, f"vqgan.ema_decay={v.ema_decay} must be in [0, 1).")
  _require(
    v.dead_code_threshold >= 0,
    f"vqgan.dead_code_threshold={v.dead_code_threshold} must be >= 0 (assignments per step).",
  )
  _require(
    min(v.beta, v.l1_weight, v.l2_weight, v.disc_weight) >= 0 and v.l1_weight + v.l2_weight > 0,
    "vqgan.beta, vqgan.l1_weight, vqgan.l2_weight and vqgan.disc_weight must be >= 0, with "
    "a positive l1_weight or l2_weight.",
  )
  _require(v.disc_start >= 0, f"vqgan.disc_start={v.disc_start} must be >= 0.")
  _require(
    v.disc_channels > 0 and v.disc_channels % 8 == 0 and v.disc_layers >= 1,
    f"vqgan.disc_channels={v.disc_channels} must be a positive multiple of 8 and "
    f"vqgan.disc_layers={v.disc_layers} >= 1.",
  )
  _require(
    t.grad_accum_steps == 1,
    f"train.grad_accum_steps={t.grad_accum_steps}: the VQGAN trains without gradient "
    "accumulation (its codebook follows each batch); use 1 and a smaller data.batch_size.",
  )


# The config section a model family reads beyond model.*, data.* and train.*: checked only
# for that family.
_FAMILY_SECTION_CHECKS = {"vqgan": validate_vqgan}
