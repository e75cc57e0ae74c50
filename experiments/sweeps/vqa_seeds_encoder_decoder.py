"""The VQA recipe of vqa_seeds.py for the encoder-decoder (2 + 4 layers) over three seeds:
pretrain 1500 steps -> fine-tune VQA 4500 steps -> evaluate the best checkpoint, and the
pretrained checkpoint's captions on the validation split and on the unseen combinations.

  python -m experiments.sweeps.run experiments/sweeps/vqa_seeds_encoder_decoder.py \
    --workdir=/tmp/sweep_vqa_encdec

Four decoder layers, not two: with 2 + 2 some seeds learn to answer "where" and "what colour"
thousands of fine-tuning steps later than the unified stack (docs/positions.md). About 20
minutes a seed on 2 CPU cores.
"""

from experiments.sweeps.spec import Eval, Train

ENCODER_DECODER = {
  "model.architecture": "encoder_decoder",
  "model.num_encoder_layers": 2,
  "model.num_decoder_layers": 4,
}

STAGES = (
  Train("pretrain", "configs/base.py", {"train.steps": 1500, **ENCODER_DECODER}),
  Train("finetune", "configs/finetune_vqa.py", init_from="pretrain"),
  Eval("eval", of="finetune", args=("--best",)),
  Eval("eval_pretrain", of="pretrain"),
  Eval("eval_pretrain_unseen", of="pretrain", split="unseen_combinations"),
)
METRICS = ("eval/vqa_accuracy", "eval/vqa_accuracy_position", "eval_pretrain/bleu4")


def get_hyper(hyper):
  return hyper.sweep("seed", [0, 1, 2])
