"""Three seeds of the base config, trained and evaluated held-out: what the base run's figures
(docs/training.md) look like as mean ± std, and a check that a seed reproduces its run (the same seed
gives the same metrics.jsonl, a different seed a different one; tests/experiments/).

  python -m experiments.sweeps.run experiments/sweeps/base_seeds.py --workdir=/tmp/sweep_base

About 3 x 6 minutes on 2 CPU cores (800 steps, then --mode=eval on 512 held-out scenes);
`--set train.steps=100` for a quick look, `--parallel=3` where there are cores for it.
The seed (config.seed) sets the initial parameters, the data order, the synthetic world
itself (its scenes, held-out ones included) and the tokenizer trained on it.
"""

from experiments.sweeps.spec import Eval, Train

STAGES = (Train("train", "configs/base.py"), Eval("eval", of="train"))
METRICS = ("train/image_to_text_loss", "eval/vqa_accuracy", "eval/bleu4", "eval/cider")


def get_hyper(hyper):
  return hyper.sweep("seed", [0, 1, 2])
