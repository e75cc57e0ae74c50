"""The VQA recipe of docs/generate_and_eval.md (pretrain 1500 steps -> fine-tune VQA 4500 steps -> evaluate the
best checkpoint; the pretrained checkpoint's captioning figures too, on the validation split
and on the unseen combinations) over three seeds: the recipe table's figures as mean ± std
instead of one run.

  python -m experiments.sweeps.run experiments/sweeps/vqa_seeds.py --workdir=/tmp/sweep_vqa

About 20 minutes a seed, an hour in all, on 2 CPU cores (`--parallel=3` where there are
cores for it). The seed applies to both training stages (and so to the synthetic world they
train and are evaluated on).
"""

from experiments.sweeps.spec import Eval, Train

STAGES = (
  Train("pretrain", "configs/base.py", {"train.steps": 1500}),
  Train("finetune", "configs/finetune_vqa.py", init_from="pretrain"),
  Eval("eval", of="finetune", args=("--best",)),
  Eval("eval_pretrain", of="pretrain"),
  Eval("eval_pretrain_unseen", of="pretrain", split="unseen_combinations"),
)
METRICS = ("eval/vqa_accuracy", "eval_pretrain/bleu4", "eval_pretrain/cider")


def get_hyper(hyper):
  return hyper.sweep("seed", [0, 1, 2])
