"""The config schema: every key with its default, and the choices of the keys that name one.

Every config file in `configs/` starts from `default_config()` and changes values; it may not
invent keys (m6_jax/config/validation.py says which key is unknown and what is near it).
"""

from __future__ import annotations

import copy

import ml_collections

from m6_jax.data import task_modules, tasks
from m6_jax.model import ofa_options as ofa
from m6_jax.parallel import axes

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
ADAM_MU_DTYPES = ("float32", "bfloat16")
IMAGE_STEMS = ("linear", "resnet", "ofa_resnet")
TOKENIZER_KINDS = ("sentencepiece", "wordpiece")
# Model families the train loop, evaluation and checkpoints serve (m6_jax/train/families/).
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
ATTENTION_IMPLS = ("xla", "splash", "cudnn", "auto")  # m6_jax/model/attention.py IMPLS


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
  c.model.dropout_rate = 0.0  # embeddings, residual branches, FFN hidden, attention probs
  # Dropout on the attention probabilities alone; None: model.dropout_rate. Only the xla
  # kernel drops them, so splash / cudnn need 0 here (MaxText has no attention dropout).
  c.model.attention_dropout_rate = ml_collections.config_dict.placeholder(float)
  c.model.image_stem = "linear"  # linear patch projection or a small ResNet-style stem
  c.model.stem_channels = 32  # width of the ResNet-style stem
  c.model.patch_size = 16
  # Layer-normalise each patch's features before the 2-D position embeddings are added (off:
  # the patch projection's scale outgrows the positions', which the model then cannot use;
  # docs/positions.md). A saved config without this key was trained without it.
  c.model.patch_norm = True
  # encoder_decoder: add the prefix's position embeddings, layer-normed, to the encoder output
  # the decoder's cross-attention reads (off: the encoder's updates drown the positions before
  # the decoder sees them; docs/positions.md). A saved config without this key was trained
  # without it.
  c.model.memory_positions = True
  # encoder_decoder: add the encoder's input (the embedded image and source), layer-normed, to
  # the encoder output as well (off: the encoder's updates drown each patch's own features).
  # A saved config without this key was trained without it.
  c.model.memory_inputs = True
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
  # The attention kernel (m6_jax/model/attention.py): xla (masked softmax in XLA), splash
  # (Pallas, TPU), cudnn (jax.nn.dot_product_attention; cuDNN on GPU in bfloat16), auto (by
  # the devices' platform: splash on TPU, cudnn on GPU, xla on CPU and wherever attention
  # dropout is on). OFA's position-biased attention and decoding steps always run in XLA.
  # attention_interpret runs splash in Pallas interpret mode on any platform (slow; tests).
  c.model.attention_impl = "xla"
  c.model.attention_interpret = False
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
  # The synthetic world's scenes drawn in varied looks (m6_jax/data/synthetic.py,
  # sample_look): any offset in their cell, sizes up to the whole image for a lone object,
  # each colour name's range of hues, white / tinted / grey backgrounds, canvases resized,
  # aliased edges, JPEG. The texts are the same; so are the validation split's looks.
  c.data.world_variety = False
  # Comma-separated importable modules that register tasks (and their record fields and eval
  # kinds) beyond the built-in ones, imported before a config is built or checked
  # (m6_jax/data/task_modules.py, docs/tasks.md); e.g. "my_project.my_tasks".
  c.data.task_modules = ""
  # One weight per registered task (m6_jax/data/tasks.py); 0 leaves the task out.
  c.data.task_weights = ml_collections.ConfigDict(tasks.default_weights())
  c.data.noise_density = 0.15
  c.data.mean_noise_span_length = 3.0
  c.data.tokenizer_path = ""  # a sentencepiece .model; empty: train one in the workdir
  # "sentencepiece" (tokenizer/spm.model) or "wordpiece": a BERT-style vocab.txt
  # (tokenizer/vocab.txt; OFA-CN's, m6_jax/data/wordpiece.py), never trained here.
  c.data.tokenizer_kind = "sentencepiece"
  # wordpiece: decoding removes the spaces BERT's joining leaves before punctuation ("1 , 1" ->
  # "1, 1"), as OFA's evaluation and ModelScope's pipeline (transformers < 4.45) do; False: as
  # ModelScope's pipeline under later transformers (docs/ofa.md).
  c.data.clean_up_tokenization_spaces = True
  # The source text of captioning in --mode=generate and evaluation ("": none; a converted
  # OFA-CN model is prompted as OFA prompts it).
  c.data.caption_prompt = ""
  c.data.tokenizer_corpus_examples = 2000
  # Every Han character of the corpus is a piece of its own and no piece spans two (M6's
  # character-level Chinese); False lets sentencepiece learn multi-character Chinese pieces.
  c.data.tokenizer_split_han = True
  c.data.read_threads = 2  # grain threads that decode and tokenize examples
  c.data.prefetch_batches = 4
  # "synthetic" (embedded world), "tfds" (--mode=prepare_data) or "shards" (WebDataset /
  # Parquet shards read in place; m6_jax/data/shard_source.py, docs/your_data.md).
  c.data.source = "synthetic"
  c.data.tfds_name = ""  # source="tfds": the prepared dataset's name (as given to prepare_data)
  c.data.data_dir = ""  # source="tfds": its TFDS data_dir; empty: TFDS default location
  # source="shards": the train and validation shards, each a path with brace ranges / lists
  # and glob wildcards, e.g. "/data/wds/train/{00000..00099}.tar" (m6_jax/data/shard_files.py).
  # data.shards may mix several sources by weight: "/data/a/*.tar,0.7;/data/b/*.parquet,0.3".
  c.data.shards = ""
  c.data.eval_shards = ""
  c.data.shard_format = "auto"  # "auto" (by extension: .tar, .parquet), "webdataset", "parquet"
  # Parquet shards: the column of the image bytes and of the caption ("": the first present of
  # jpg, png, webp, jpeg, image, img, image_bytes / txt, caption, text, TEXT, Caption).
  c.data.parquet_image_column = ""
  c.data.parquet_text_column = ""
  c.data.shuffle_buffer = 1000  # records shuffled together as shards stream (<= 1: none)
  # Shard records that cannot feed training (corrupt or oversized image, no caption, a cut tar,
  # null bytes) are skipped and counted; more than this share of the records read stops the
  # run with one error line.
  c.data.max_bad_fraction = 0.1
  c.data.max_image_pixels = 8192 * 8192  # larger shard images are skipped (0: no limit)
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
  # dtype of Adam's first moment (optax.adamw's mu_dtype): "bfloat16" halves that state's
  # memory and HBM traffic (the second moment stays float32, as in MaxText).
  c.train.adam_mu_dtype = "float32"
  c.train.weight_decay = 0.01
  c.train.decay_embeddings = False
  c.train.decay_norms_and_biases = False
  c.train.grad_clip_norm = 1.0
  c.train.grad_accum_steps = 1
  c.train.label_smoothing = 0.0
  c.train.log_every = 20
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  # Divergence (m6_jax/train/divergence.py, recovery.py): a step whose loss, gradients, new
  # parameters or optimizer state are not finite is not applied; more than `max_nan_steps` of
  # them in a row, or a loss above `spike_factor` x the median of the last `spike_window`
  # losses (0: no spike check) and more than `spike_min_increase` above it, rolls back to the
  # newest good checkpoint (one the following steps confirmed), skips the next
  # `rollback_skip_batches` batches, multiplies the learning rate by `rollback_lr_factor`, and
  # continues; after `max_rollbacks` rollbacks the run stops.
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

  c.vqgan = vqgan_defaults()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1  # MoE experts are split over this axis; the batch is split over it too
  c.mesh.logical_axis_rules = axes.default_logical_axis_rules()  # m6_jax/parallel/axes.py
  return c


def vqgan_defaults() -> ml_collections.ConfigDict:
  """The VQGAN image tokenizer (model.family="vqgan"; m6_jax/model/vqgan.py). Images are
  data.image_size px; compute in model.dtype."""
  v = ml_collections.ConfigDict()
  v.channels = 8  # base width of the encoder / decoder convolutions
  # Width multiplier of each resolution level; a stride-2 convolution (encoder) or an
  # upsampling (decoder) between levels, so there are log2(downsample_factor) + 1 entries.
  # Every width must be a multiple of 8 (GroupNorm groups).
  v.channel_multipliers = (1, 2, 4, 8)
  v.num_res_blocks = 1  # residual blocks per level (encoder and decoder)
  # Image side / code grid side: 48 px / 8 -> 6x6 codes per image, / 4 -> 12x12.
  v.downsample_factor = 8
  v.codebook_size = 256  # codes; at most 65536 (code grids are stored as uint16)
  v.code_dim = 16  # dimension of the code vectors the lookup compares
  v.l2_normalize = True  # ViT-VQGAN lookup: unit-length encoder outputs and codes
  v.beta = 0.25  # commitment loss weight: mean (z - stop_gradient(code))^2
  v.ema_decay = 0.99  # the codebook is an exponential moving average of its assigned z
  # A code whose EMA count falls below this many assignments per step is restarted on a
  # random encoder output of the batch, with this count (0: never restart).
  v.dead_code_threshold = 0.25
  v.l1_weight = 1.0  # reconstruction loss: l1_weight * |x' - x| + l2_weight * (x' - x)^2,
  v.l2_weight = 0.0  # means over pixels, images in [-1, 1] scale
  # Patch-GAN discriminator (hinge loss, taming-transformers' adaptive weight on the
  # decoder's last layer). 0: no discriminator (no parameters, no compute).
  v.disc_weight = 0.0
  v.disc_start = 0  # train step from which the GAN terms count (both networks)
  v.disc_channels = 32  # width of the discriminator's first convolution (a multiple of 8)
  v.disc_layers = 2  # stride-2 convolutions of the discriminator
  return v


# Keys added since whose default would change a model saved without them: such a config
# reads them at the value it was trained with.
TRAINED_WITHOUT = {
  ("model", "patch_norm"): False,
  ("model", "memory_positions"): False,
  ("model", "memory_inputs"): False,
}


def as_trained(saved: dict) -> dict:
  """A copy of a saved config dict with the TRAINED_WITHOUT keys it lacks at those values."""
  saved = copy.deepcopy(saved)
  for (section, key), value in TRAINED_WITHOUT.items():
    if isinstance(saved.get(section), dict):
      saved[section].setdefault(key, value)
  return saved


def merged_with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A saved config dict, with the keys added since it was written at their defaults (after
  importing the task modules it names, so that their tasks are known), or at the value the
  model was trained with (TRAINED_WITHOUT)."""
  task_modules.import_all(saved.get("data", {}).get("task_modules", ""))
  saved = as_trained(saved)

  def merge(base: dict, saved: dict) -> dict:
    for k, v in saved.items():
      base[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base

  return ml_collections.ConfigDict(merge(default_config().to_dict(), saved))
