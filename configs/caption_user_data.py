"""Image captioning on your own images and captions, prepared into a TFDS dataset or streamed
from WebDataset / Parquet shards.

The argument is the prepared dataset: ``DATA_DIR/NAME`` (a path, as written by step 1), or
``NAME`` alone for TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets); or a
folder with ``train/`` and ``validation/`` shard folders (``*.tar`` or ``*.parquet``, as
``--mode=prepare_data --output_format=webdataset`` writes them), streamed in place
(docs/your_data.md, "Training on WebDataset / Parquet shards"). Append ``,cpu`` for the
CPU-sized recipe below, or ``,runlocal`` for a 20-step smoke test.

1. Convert the data once (a folder of images + a JSONL of
   {"image": "rel/path.jpg", "caption": "..."}; see m6_jax/data/prepare.py for the MUGE TSV
   format, per-split files and the checks on bad records):

  python -m m6_jax.main --mode=prepare_data --input_format=image_folder_jsonl \\
    --input_path=/data/my_caps/captions.jsonl --validation_fraction=0.02 \\
    --data_dir=/data/tfds --name=my_caps

2. Train:

  python -m m6_jax.main --config=configs/caption_user_data.py:/data/tfds/my_caps \\
    --workdir=/tmp/m6_my_caps

Tasks: image-to-text (weight 1) and multimodal-to-text (0.5; image + caption with masked
spans -> caption); records without a caption are not used. 128 px images (64 patches of
16 px, linear patch projection), a 6-layer d_model 384 model (about 14M parameters with the 8k
vocabulary), texts up to 48 tokens (the default src_len / tgt_len). The sentencepiece model
is trained on the dataset's own texts (``tokenizer_corpus_examples`` of them) unless
data.tokenizer_path is set; Chinese one piece per character (data.tokenizer_split_han).
Sized for one accelerator; on TPU add --config.model.dtype=bfloat16.

Variant ``,cpu``: learns on 2 CPU cores. 48 px images (9 patches of 16 px), the base model's
size (4 layers, d_model 128, about 1.3M parameters with a 2k vocabulary), batch 32, 1500 steps
at lr 2e-3, captions and questions up to 48 pieces, length bucketing by 16. Should reach, on
the synthetic world's files (--mode=export_world): held-out caption BLEU-4 99.97 in under 19
minutes; the recipe and its table: docs/your_data.md.
"""

import os

from m6_jax.config import default_config


def _dataset(arg: str) -> tuple[str, str]:
  """``DATA_DIR/NAME[/VERSION]`` or ``NAME`` -> (data_dir, tfds_name)."""
  path = os.path.normpath(os.path.expanduser(arg.strip()))
  if os.sep not in path:
    return "", path
  head, tail = os.path.split(path)
  if tail.count(".") == 2 and tail.replace(".", "").isdigit():  # .../NAME/1.0.0
    head, name = os.path.split(head)
    return head, f"{name}:{tail}"
  return head, tail


def _shards(path: str) -> tuple[str, str] | None:
  """(train, validation) shard patterns of a folder of ``train/`` and ``validation/`` shards
  (as --mode=export_world --format=... and --mode=prepare_data --output_format=... write
  them), or None when ``path`` is not one."""
  train = os.path.join(path, "train")
  names = sorted(os.listdir(train)) if os.path.isdir(train) else []
  ext = next((e for e in (".tar", ".parquet") if any(n.endswith(e) for n in names)), None)
  if ext is None:
    return None
  return os.path.join(train, f"*{ext}"), os.path.join(path, "validation", f"*{ext}")


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError(
      "configs/caption_user_data.py needs the prepared dataset, e.g. "
      "--config=configs/caption_user_data.py:/data/tfds/my_caps (add ',runlocal' for a "
      "smoke test); create it with --mode=prepare_data."
    )
  dataset, _, variant = arg.partition(",")
  config = default_config()
  d, m, t = config.data, config.model, config.train
  shards = _shards(os.path.expanduser(dataset.strip()))
  if shards:
    d.source = "shards"
    d.shards, d.eval_shards = shards
  else:
    d.source = "tfds"
    d.data_dir, d.tfds_name = _dataset(dataset)
  d.task_weights = {
    "text_to_text": 0.0,
    "image_to_text": 1.0,
    "multimodal_to_text": 0.5,
    "vqa": 0.0,
  }
  d.image_size = 128
  d.batch_size = 64
  d.num_eval_examples = 1024
  d.tokenizer_corpus_examples = 20000

  m.vocab_size = 8192
  m.d_model = 384
  m.num_layers = 6
  m.num_heads = 6
  m.head_dim = 64
  m.mlp_dim = 1536
  m.image_stem = "linear"  # fastest; --config.model.image_stem=resnet for CNN patch features
  m.patch_size = 16
  m.dropout_rate = 0.1

  t.steps = 20000
  t.lr = 5e-4
  t.warmup_steps = 1000
  t.log_every = 100
  t.checkpoint_every = 1000

  if variant == "cpu":
    d.image_size = 48
    d.length_bucket = 16
    d.batch_size = 32
    d.num_eval_examples = 300
    d.task_weights.multimodal_to_text = 0.25
    m.vocab_size = 2048
    m.d_model = 128
    m.num_layers = 4
    m.num_heads = 4
    m.head_dim = 32
    m.mlp_dim = 512
    m.dropout_rate = 0.0
    t.steps = 1500
    t.lr = 2e-3
    t.warmup_steps = 100
    t.checkpoint_every = 500
  elif variant == "runlocal":
    d.image_size = 48
    d.batch_size = 8
    d.num_eval_examples = 64
    d.tokenizer_corpus_examples = 2000
    m.vocab_size = 4096
    m.d_model = 64
    m.num_layers = 2
    m.num_heads = 2
    m.head_dim = 32
    m.mlp_dim = 128
    m.dropout_rate = 0.0
    t.steps = 20
    t.warmup_steps = 5
    t.log_every = 5
    t.checkpoint_every = 10
  elif variant:
    raise ValueError(
      f"Unknown variant {variant!r} of configs/caption_user_data.py; known: cpu, runlocal."
    )
  return config
