"""`--mode=eval`: held-out metrics of a checkpoint of --workdir, by its model family (M6:
loss and accuracy per task, BLEU-4 / CIDEr-D, VQA accuracy, text exact match; a VQGAN: PSNR,
codebook usage, perplexity). Writes <workdir>/eval_metrics.json(l) (eval_metrics_<split>.json(l)
with --split) and TensorBoard scalars.
"""

from __future__ import annotations

from absl import flags

from m6_jax.cli import checkpoint_flags, common

NUM_EVAL_EXAMPLES = flags.DEFINE_integer(
  "num_eval_examples", 0, "Validation scenes to decode (0: the config's data.num_eval_examples)."
)
BASELINES = flags.DEFINE_bool(
  "baselines", False, "Also score the untrained model and the most-frequent baseline."
)


def run() -> None:
  from m6_jax.train import families

  config = common.load_config("eval", required=False, workdir_hint="a trained workdir")
  workdir, best = common.WORKDIR.value, checkpoint_flags.BEST.value
  families.of_workdir(workdir, best).run_eval(
    workdir,
    checkpoint_flags.CHECKPOINT_STEP.value,
    config,
    best,
    NUM_EVAL_EXAMPLES.value,
    BASELINES.value,
    common.EVAL_SPLIT.value,
  )
