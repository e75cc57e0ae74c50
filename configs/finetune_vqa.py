"""Fine-tune a pretrained M6 on visual question answering (embedded synthetic world).

  # 1. pretrain (base model, VQA mixed in at weight 1 next to the three M6 tasks)
  python -m m6_jax.main --config=configs/base.py --workdir=/tmp/m6_pre \
    --config.data.task_weights.vqa=1.0 --config.train.steps=1500
  # 2. fine-tune on VQA only, evaluating every 1500 steps and keeping the best checkpoint
  python -m m6_jax.main --config=configs/finetune_vqa.py --workdir=/tmp/m6_vqa \
    --config.init_from=/tmp/m6_pre
  # 3. evaluate the best checkpoint against the baselines
  python -m m6_jax.main --mode=eval --workdir=/tmp/m6_vqa --best --baselines

`init_from` loads the parameters of the latest step of that workdir (fresh optimizer, step
0), its tokenizer and its model: this file leaves the `model.*` keys (and data.image_size,
src_len, tgt_len) to the checkpoint, e.g. a configs/caption_user_data.py:<data>,cpu run's
vocabulary of 2048 (m6_jax/checkpoint/init_from.py); a model key set on the command line is
kept, and one that changes a parameter's shape stops with that parameter and both shapes.
The best checkpoint by `train.eval_metric` is kept in <workdir>/best, the last
`keep_checkpoints` in checkpoints/.
Should reach: held-out VQA accuracy 98.5 +- 0.3% for the best checkpoint (3 seeds; position
99.8%), in about 5.5 minutes of fine-tuning on 2 quiet CPU cores; the recipe and its tables:
docs/generate_and_eval.md.

Variant `configs/finetune_vqa.py:runlocal`: 20 steps, evaluation every 10 (smoke test).
"""

from m6_jax.config import default_config


def get_config(arg: str | None = None):
  config = default_config()
  config.data.task_weights.text_to_text = 0.0
  config.data.task_weights.image_to_text = 0.0
  config.data.task_weights.multimodal_to_text = 0.0
  config.data.task_weights.vqa = 1.0
  config.data.length_bucket = 8  # answers and captions fill a fraction of tgt_len: trim
  config.train.steps = 4500
  config.train.lr = 5e-4
  config.train.warmup_steps = 50
  config.train.log_every = 100
  config.train.checkpoint_every = 1500
  config.train.eval_every = 1500
  config.train.eval_metric = "vqa_accuracy"
  config.train.eval_examples = 64
  if arg == "runlocal":
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.eval_every = 10
    config.train.eval_examples = 4
    config.train.warmup_steps = 5
  elif arg:
    raise ValueError(f"Unknown variant '{arg}' of configs/finetune_vqa.py; known: runlocal.")
  return config
