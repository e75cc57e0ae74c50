"""`--mode=train` (the default): train or resume in --workdir from --config.

    python -m m6_jax.main --config=configs/base.py --workdir=/tmp/m6_base

Ends with the family's headline loss at the first logged step and the last one.
"""

from __future__ import annotations

from m6_jax.cli import common


def run() -> None:
  from m6_jax.checkpoint import init_from
  from m6_jax.errors import CheckpointError
  from m6_jax.train import families, loop, preemption

  config = common.load_config("train", workdir_hint="e.g. --workdir=/tmp/m6_base")
  # Fine-tuning: the model is the checkpoint's, but for the keys the command line sets.
  starting = init_from.model_of_checkpoint(config, common.WORKDIR.value, common.config_overrides())
  config = starting.config
  family = families.get(config)
  evaluator = family.evaluator(common.WORKDIR.value) if config.train.eval_every else None
  # Ours, so that its handlers stay after the loop: a Ctrl-C once the run has saved and ended
  # is ignored while the process exits (the loop's own would put Python's default back).
  flag = preemption.PreemptionFlag()
  try:
    result = loop.train(config, common.WORKDIR.value, evaluator, preemption=flag)
  except CheckpointError as e:
    raise init_from.explain_shape_error(e, starting.kept) from e
  key = family.headline_loss
  first, last = result.first_metrics, result.last_metrics
  if key in first and key in last:
    start = (
      "step 0 (initial parameters)"
      if result.resumed_from == 0
      else f"step {first['step']} (the first logged step of this run, resumed at step "
      f"{result.resumed_from})"
    )
    print(
      f"{key.replace('_loss', '')} loss: {start}: {first[key]:.4f} -> step {last['step']}: "
      f"{last[key]:.4f} ({last[key] / first[key]:.2f}x)"
    )
