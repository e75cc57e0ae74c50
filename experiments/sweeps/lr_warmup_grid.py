"""Learning rate x warmup of the base config, two seeds each: the final training losses with
their 95% intervals, one line per warmup against the learning rate (final_metrics.png).

  python -m experiments.sweeps.run experiments/sweeps/lr_warmup_grid.py --workdir=/tmp/sweep_lr

18 runs of about 4 minutes on 2 CPU cores (about 75 minutes; `--parallel=N` where there are
cores, `--set train.steps=200` for a quick look). The losses are the last metrics.jsonl
record of each run: the training loss averaged over the last train.log_every (20) steps.
"""

CONFIG = "configs/base.py"
METRICS = ("train/image_to_text_loss", "train/loss")


def get_hyper(hyper):
  return hyper.product(
    [
      hyper.sweep("train.lr", [1e-3, 2e-3, 4e-3]),
      hyper.sweep("train.warmup_steps", [10, 50, 200]),
      hyper.sweep("seed", [0, 1]),
    ]
  )
