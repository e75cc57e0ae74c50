"""The VQA recipe of vqa_seeds.py for the encoder-decoder (2 + 2 layers) over three seeds:
pretrain 1500 steps -> fine-tune VQA 9000 steps -> evaluate the best checkpoint, and the
pretrained checkpoint's captions on the validation split and on the unseen combinations.

  python -m experiments.sweeps.run experiments/sweeps/vqa_seeds_encoder_decoder.py \
    --workdir=/tmp/sweep_vqa_encdec

The fine-tune is twice the unified stack's: the encoder-decoder learns to answer "where"
later (docs/positions.md), between fine-tuning steps 3000 and 6000 by seed, where the unified
stack does by 3000. About 17 minutes a seed on 2 CPU cores.
"""

from experiments.sweeps.spec import Eval, Train

ENCODER_DECODER = {
  "model.architecture": "encoder_decoder",
  "model.num_encoder_layers": 2,
  "model.num_decoder_layers": 2,
}

STAGES = (
  Train("pretrain", "configs/base.py", {"train.steps": 1500, **ENCODER_DECODER}),
  Train("finetune", "configs/finetune_vqa.py", {"train.steps": 9000}, init_from="pretrain"),
  Eval("eval", of="finetune", args=("--best",)),
  Eval("eval_pretrain", of="pretrain"),
  Eval("eval_pretrain_unseen", of="pretrain", split="unseen_combinations"),
)
METRICS = ("eval/vqa_accuracy", "eval/vqa_accuracy_position", "eval_pretrain/bleu4")


def get_hyper(hyper):
  return hyper.sweep("seed", [0, 1, 2])
