"""The config schema, its defaults, and validation with clear messages.

Every config file in `configs/` starts from `default_config()` and changes values; it may not
invent keys. `validate()` runs before anything is built and raises `ConfigError` with one line
that names the offending key and says how to fix it, so a typo never becomes a traceback
twenty seconds into a run.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import ml_collections

from m6_jax import config_images
from m6_jax.config_images import CODES_INFO_FILE, codes_mismatch, read_codes_info
from m6_jax.data import tasks
from m6_jax.errors import ConfigError
from m6_jax.errors import require as _require
from m6_jax.model import ofa_options as ofa
from m6_jax.parallel import axes

__all__ = [
  "CODES_INFO_FILE",
  "ConfigError",
  "codes_mismatch",
  "default_config",
  "moe_layer_indices",
  "read_codes_info",
  "validate",
]

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
IMAGE_STEMS = ("linear", "resnet", "ofa_resnet")
TOKENIZER_KINDS = ("sentencepiece", "wordpiece")
# Model families the train loop, evaluation and checkpoints serve (m6_jax/train/family.py).
FAMILIES = ("m6", "vqgan")
DTYPES = ("float32", "bfloat16")
ARCHITECTURES = ("unified", "encoder_decoder")
REMAT_POLICIES = (
  "none",
  "full",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "dots_and_attention_saveable",
)
MOE_DISPATCH_MODES = ("einsum", "sorted")  # m6_jax/model/moe_dispatch.py (no jax import here)


def default_config() -> ml_collections.ConfigDict:
  """All known keys with their defaults (a small model that runs on a laptop CPU)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Fine-tuning: a workdir or checkpoint directory whose latest step's parameters initialise
  # the model (fresh optimizer and step 0); ignored when the workdir already has a checkpoint.
  c.init_from = ""

  c.model = ml_collections.ConfigDict()
  # "m6": the multimodal Transformer (the keys below); "vqgan": the image tokenizer of
  # text-to-image (the `vqgan` section; configs/vqgan.py).
  c.model.family = "m6"
  c.model.vocab_size = 1024  # embedding rows; >= the tokenizer's piece count
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.head_dim = 32
  c.model.mlp_dim = 512
  c.model.dropout_rate = 0.0
  c.model.image_stem = "linear"  # linear patch projection or a small ResNet-style stem
  c.model.stem_channels = 32  # width of the ResNet-style stem
  c.model.patch_size = 16
  c.model.tie_embeddings = True
  c.model.dtype = "float32"  # compute dtype; parameters stay float32
  c.model.layer_norm_epsilon = 1e-6
  # Sparse Mixture-of-Experts feed-forward (M6-100B, M6-T); see m6_jax/model/moe.py.
  c.model.moe_num_experts = 0  # 0: dense; E experts in every `moe_every`-th layer
  c.model.moe_num_groups = 1  # M6-T expert prototypes; 1 = plain top-k routing
  c.model.moe_top_k = 1  # experts per token within each prototype
  c.model.moe_capacity_factor = 1.25  # expert capacity slack in training
  c.model.moe_eval_capacity_factor = 2.0  # ... when deterministic (eval, decoding)
  # How tokens reach the experts: "einsum" (GShard one-hot dispatch / combine matmuls) or
  # "sorted" (a sort by expert id and gathers; same routing, dropping and results, no
  # [tokens, experts, capacity] tensors); see m6_jax/model/moe_dispatch.py.
  c.model.moe_dispatch = "einsum"
  # Batch rows per routing group in training (capacity over group_rows * length tokens; a
  # divisor of the rows each device holds); evaluation and decoding route each row alone.
  # See m6_jax/model/moe.py.
  c.model.moe_group_rows = 1
  c.model.moe_every = 1  # layers i with (i + 1) % moe_every == 0 are MoE (1: all of them)
  c.model.moe_aux_loss_weight = 0.01  # load-balance loss weight in the objective
  c.model.moe_z_loss_weight = 0.001  # router z-loss weight in the objective
  # Layer stack: nn.scan over layers (one compiled layer; params get a leading `layers` axis)
  # and rematerialisation: none, full (save nothing), dots_saveable (save matmul outputs),
  # dots_with_no_batch_dims_saveable (save weight matmuls only).
  c.model.scan_layers = False
  c.model.remat_policy = "none"
  # Text-to-image: K discrete image codes (a VQGAN's codebook) appended to the vocabulary
  # (code c is token id vocab_size + c; see m6_jax/model/m6.py), generated as a grid of
  # h x w codes with learned row / column embeddings. 0: a text-only model.
  c.model.code_vocab_size = 0
  c.model.code_grid = (0, 0)  # (h, w) of the code grid; (0, 0) when code_vocab_size is 0
  # "unified": M6's one Transformer stack over [image ; source ; target] with the prefix-LM
  # mask (num_layers layers). "encoder_decoder" (OFA / OFA-CN style): an encoder stack
  # (bidirectional over [image ; source]) and a decoder stack (causal over the target, with
  # cross-attention to the encoder output in every layer); same embeddings, batch, logits,
  # loss and decoding. num_encoder_layers / num_decoder_layers are their depths, 0 meaning
  # model.num_layers; they must stay 0 with "unified". MoE, scan_layers and remat_policy
  # apply to each stack (MoE layers: every moe_every-th layer of each stack).
  c.model.architecture = "unified"
  c.model.num_encoder_layers = 0
  c.model.num_decoder_layers = 0
  # OFA's architecture (position biases, embedding scale and norms, NormFormer, post-norm,
  # head scales, activation, its ResNet stem's depth): options of the encoder_decoder model,
  # off by default; each key is described in m6_jax/model/ofa.py. `--mode=convert
  # --from=ofa` sets them from an OFA checkpoint's config.json.
  c.model.update(ofa.MODEL_DEFAULTS)

  c.data = ml_collections.ConfigDict()
  c.data.batch_size = 32  # global batch, split over processes and the (data, fsdp) axes
  c.data.image_size = 48
  # Chinese is one piece per character (data.tokenizer_split_han): the synthetic world's
  # Chinese captions take up to 42 pieces (English: 27), so 48 holds every caption whole.
  c.data.src_len = 48  # maximum source tokens (size of the position table with tgt_len)
  c.data.tgt_len = 48  # maximum target tokens, BOS / EOS included
  # Length bucketing (train split; m6_jax/data/pipeline.py): each batch's source and target
  # columns are trimmed to the smallest multiple of `length_bucket` that holds its longest
  # real text, so the step computes less padding. 0: off (every batch src_len x tgt_len).
  # Every new (source, target) shape compiles the step once, at most
  # (src_len / length_bucket) x (tgt_len / length_bucket) shapes. Positions do not move, so a
  # trimmed batch gives the padded batch's loss exactly for a dense model; with dropout the
  # masks differ (their shape does), and a MoE layer's expert capacity scales with the
  # sequence length, so it may drop other tokens than on the padded batch.
  c.data.length_bucket = 0
  # With length_bucket > 0: sort records by length within windows of bucket_window global
  # batches (batch order within a window shuffled), so batches are tighter. 0: no sorting.
  # Each process then computes every record of a window (not only its own rows).
  c.data.bucket_window = 0
  c.data.num_train_examples = 20000
  c.data.num_eval_examples = 512
  # One weight per registered task (m6_jax/data/tasks.py); 0 leaves the task out.
  c.data.task_weights = ml_collections.ConfigDict(tasks.default_weights())
  c.data.noise_density = 0.15
  c.data.mean_noise_span_length = 3.0
  c.data.tokenizer_path = ""  # a sentencepiece .model; empty: train one in the workdir
  # "sentencepiece" (tokenizer/spm.model) or "wordpiece": a BERT-style vocab.txt
  # (tokenizer/vocab.txt; OFA-CN's, m6_jax/data/wordpiece.py), never trained here.
  c.data.tokenizer_kind = "sentencepiece"
  # The source text of captioning in --mode=generate and evaluation ("": none; a converted
  # OFA-CN model is prompted as OFA prompts it).
  c.data.caption_prompt = ""
  c.data.tokenizer_corpus_examples = 2000
  # Every Han character of the corpus is a piece of its own and no piece spans two (M6's
  # character-level Chinese); False lets sentencepiece learn multi-character Chinese pieces.
  c.data.tokenizer_split_han = True
  c.data.read_threads = 2  # grain threads that decode and tokenize examples
  c.data.prefetch_batches = 4
  c.data.source = "synthetic"  # "synthetic" (embedded world) or "tfds" (--mode=prepare_data)
  c.data.tfds_name = ""  # source="tfds": the prepared dataset's name (as given to prepare_data)
  c.data.data_dir = ""  # source="tfds": its TFDS data_dir; empty: TFDS default location
  # Code grids written by --mode=encode_images (m6_jax/data/image_codes.py; codes_info.json:
  # codebook_size, grid, image_size, vqgan_workdir, vqgan_step): every example of the data
  # source then carries `image_codes` int32 [h, w]. Needed by the tasks that generate codes
  # (text_to_image). Empty: none.
  c.data.image_codes_dir = ""
  # Classifier-free guidance training: the share of text_to_image examples whose caption is
  # dropped (empty source), so that one model also learns the unconditional code
  # distribution that guided sampling (infer/text_to_image.py) extrapolates away from.
  c.data.guidance_drop_rate = 0.1

  c.train = ml_collections.ConfigDict()
  c.train.steps = 600
  c.train.lr = 1e-3
  c.train.warmup_steps = 50
  c.train.schedule = "cosine"
  c.train.end_lr_fraction = 0.1  # final lr = lr * end_lr_fraction (cosine / linear)
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.eps = 1e-8
  c.train.weight_decay = 0.01
  c.train.decay_embeddings = False
  c.train.decay_norms_and_biases = False
  c.train.grad_clip_norm = 1.0
  c.train.grad_accum_steps = 1
  c.train.label_smoothing = 0.0
  c.train.log_every = 20
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  # Divergence (m6_jax/train/divergence.py): a step whose loss, gradients, new parameters or
  # optimizer state are not finite is not applied; more than `max_nan_steps` of them in a
  # row, or a loss above `spike_factor` x the median of the last `spike_window` losses (0:
  # no spike check) and more than `spike_min_increase` above it, rolls back to the newest good checkpoint (one the following steps
  # confirmed), skips the next `rollback_skip_batches` batches, multiplies the learning rate
  # by `rollback_lr_factor`, and continues; after `max_rollbacks` rollbacks the run stops.
  c.train.max_nan_steps = 0
  c.train.checkpoint_confirm_steps = 20
  c.train.spike_factor = 10.0
  c.train.spike_window = 50
  # A per-token loss is a few nats while learning; near zero (a model that knows its
  # captions by heart) it moves by factors of 10 and more without diverging.
  c.train.spike_min_increase = 1.0
  c.train.rollback_skip_batches = 20
  c.train.rollback_lr_factor = 1.0
  c.train.max_rollbacks = 3
  # Testing aid: batches of the data stream (e.g. "30,31"; 0 is the first) whose images are
  # replaced by NaN, as corrupt data would be, to exercise the above.
  c.train.debug_nonfinite_batches = ""
  # Peak FLOP/s of one device, for the MFU in the progress line and metrics.jsonl. 0: the
  # published bf16 peak of a known TPU / GPU kind (train/progress.py), none on CPU.
  c.train.peak_flops = 0.0
  # Periodic evaluation on the validation split (m6_jax/evaluation/evaluate.py) and keeping
  # the best checkpoint by `eval_metric` in <workdir>/best (the last N stay in checkpoints/).
  c.train.eval_every = 0  # 0: no evaluation during training
  c.train.eval_metric = "vqa_accuracy"  # e.g. vqa_accuracy, cider, bleu4 (max); *_loss (min)
  c.train.eval_examples = 64  # validation scenes decoded per evaluation (0: num_eval_examples)

  c.vqgan = config_images.vqgan_defaults()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1  # MoE experts are split over this axis; the batch is split over it too
  c.mesh.logical_axis_rules = axes.default_logical_axis_rules()  # m6_jax/parallel/axes.py
  return c


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
  _check_known_keys(config)
  m, d, t = config.model, config.data, config.train

  _require(m.family in FAMILIES, f"model.family='{m.family}' is not one of {FAMILIES}.")
  if m.family == "vqgan":
    config_images.validate_vqgan(config)
  _require(
    m.image_stem in IMAGE_STEMS, f"model.image_stem='{m.image_stem}' is not one of {IMAGE_STEMS}."
  )
  _require(m.dtype in DTYPES, f"model.dtype='{m.dtype}' is not one of {DTYPES}.")
  _require(t.schedule in SCHEDULES, f"train.schedule='{t.schedule}' is not one of {SCHEDULES}.")
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
  config_images.validate_image_codes(config, training)
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
