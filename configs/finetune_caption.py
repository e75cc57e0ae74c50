"""Fine-tune a pretrained M6 on image captioning (embedded synthetic world).

  python -m m6_jax.main --config=configs/finetune_caption.py --workdir=/tmp/m6_caption \
    --config.init_from=/tmp/m6_pre
  python -m m6_jax.main --mode=eval --workdir=/tmp/m6_caption --best --baselines

Starts from the parameters of the latest checkpoint of `init_from` (fresh optimizer and
step; its tokenizer is reused, and its model: this file leaves the `model.*` keys and
data.image_size / src_len / tgt_len to the checkpoint, see m6_jax/checkpoint/init_from.py),
trains image-to-text only, evaluates every 500 steps and keeps the checkpoint with the best
CIDEr-D in <workdir>/best.

Variant `configs/finetune_caption.py:runlocal`: 20 steps, evaluation every 10.
"""

from m6_jax.config import default_config


def get_config(arg: str | None = None):
  config = default_config()
  config.data.length_bucket = 8  # answers and captions fill a fraction of tgt_len: trim
  config.data.task_weights.text_to_text = 0.0
  config.data.task_weights.image_to_text = 1.0
  config.data.task_weights.multimodal_to_text = 0.0
  config.data.task_weights.vqa = 0.0
  config.train.steps = 1000
  config.train.lr = 3e-4
  config.train.warmup_steps = 50
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.train.eval_every = 500
  config.train.eval_metric = "cider"
  config.train.eval_examples = 64
  if arg == "runlocal":
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.eval_every = 10
    config.train.eval_examples = 4
    config.train.warmup_steps = 5
  elif arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/finetune_caption.py; known: runlocal.")
  return config
