"""The training loop, readable top to bottom:

validate -> set-up (mesh, model, optimizer, shardings, jitted step) -> tokenizer + data ->
state (resume, init_from, or fresh) -> loop (progress, checkpoints, evaluation, preemption)
-> final save.

A run in a workdir that already holds a checkpoint resumes from its latest step, with the
data iterator where it was, and continues bit-exactly as if it had never stopped (on the same
mesh; a checkpoint restores onto any other mesh too). The periodic evaluation is passed in
(`evaluator`, the family's: m6_jax/train/families/), so this module knows nothing of decoding
or metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from m6_jax import config as config_lib
from m6_jax.checkpoint import checkpoints
from m6_jax.data import pipeline, shard_source, sources
from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.errors import ConfigError, TrainingError
from m6_jax.parallel import multihost
from m6_jax.train import divergence, families, metrics_writer, preflight, progress
from m6_jax.train import recovery as recovery_lib
from m6_jax.train import setup as setup_lib
from m6_jax.train.preemption import PreemptionFlag

__all__ = ["PreemptionFlag", "TrainingError", "TrainResult", "train"]

Evaluator = families.Evaluator


@dataclasses.dataclass
class TrainResult:
  final_step: int
  first_metrics: dict[str, float]  # the first logged step of this run
  last_metrics: dict[str, float]  # averaged over the last logging interval
  history: list[dict[str, float]]  # every logged interval of this run
  losses: list[float]  # the per-step loss of every step this run executed
  resumed_from: int  # the step this run started at (0: a fresh run)
  state: Any = None


def agree_text_lengths(
  host_batch: dict[str, np.ndarray], allgather: Callable[[np.ndarray], Any] | None = None
) -> dict[str, np.ndarray]:
  """With length bucketing each process trims its rows on its own; the jitted step needs the
  same shapes everywhere, so pad every local batch to the longest text of any process.

  `allgather` defaults to process_allgather across the processes; with one process (and no
  `allgather` given) the batch comes back unchanged. Note that the gather is a collective the
  host waits for, once per step.
  """
  if allgather is None:
    if jax.process_count() == 1:
      return host_batch
    from jax.experimental import multihost_utils

    allgather = multihost_utils.process_allgather
  return pipeline.pad_to_common_lengths(host_batch, allgather)


def _tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """(tokenizer, its path): config.data.tokenizer_path, else the workdir's (copied from
  init_from, or trained on the data the first time). Process 0 makes it, the others wait.
  (None, "") for a model family without texts (the VQGAN)."""
  if not families.get(config).needs_tokenizer:
    return None, ""
  d = config.data
  if config.init_from and not d.tokenizer_path:
    if checkpoints.copy_tokenizer(config.init_from, workdir) is None:
      logging.warning("No tokenizer/spm.model next to %s; training a new one.", config.init_from)

  def make():
    return tokenizer_lib.get_or_train_tokenizer(
      workdir,
      vocab_size=config.model.vocab_size,
      seed=config.seed,
      num_corpus_examples=d.tokenizer_corpus_examples,
      model_path=d.tokenizer_path or None,
      corpus=_corpus(config),
      split_han=bool(d.tokenizer_split_han),
    )

  try:
    tokenizer = multihost.primary_first(make, "tokenizer")
  except ValueError as e:  # a tokenizer that does not fit model.vocab_size
    raise ConfigError(f"{e} (key: model.vocab_size)") from e
  return tokenizer, d.tokenizer_path or os.path.join(workdir, checkpoints.TOKENIZER_FILE)


def _corpus(config: ml_collections.ConfigDict):
  """The texts a new tokenizer is trained on: a user dataset's own (read lazily, only if a
  tokenizer is trained), or None for the synthetic world's."""
  source = config.data.source
  if source == "tfds":
    return sources.iter_dataset_text(config)
  if source == "shards":
    return shard_source.iter_text(config)
  return None


def _data_iterator(config: ml_collections.ConfigDict, tokenizer):
  """This process's slice of every global batch, as a checkpointable grain iterator."""
  try:
    return families.get(config).data_iterator(tokenizer)
  except ConfigError:
    raise
  except ValueError as e:  # e.g. a task the prepared dataset has no records for
    raise ConfigError(f"{e} (keys: data.*)") from e


def _start(setup, ckpts, tokenizer, tokenizer_path: str) -> tuple[Any, Any]:
  """(state, data iterator): the newest intact checkpoint's state with the iterator rewound
  to it (damaged steps are set aside), else a fresh state and iterator, the state with the
  parameters of `init_from` when given (fine-tuning: fresh optimizer and step). A resume at
  start-up and a rollback both start here."""
  config = setup.config
  data_iter = _data_iterator(config, tokenizer)
  state, step, _ = ckpts.restore_intact_train_state(
    setup.abstract_state(), data_iter, tokenizer, tokenizer_path
  )
  if state is not None:
    logging.info("Resumed from step %d in %s", step, ckpts.directory)
    return state, data_iter
  state = setup.init_state()
  if config.init_from:
    target = setup.abstract_state().params
    loaded = checkpoints.load_params(config.init_from, target, None, tokenizer, tokenizer_path)
    state = state.replace(params=loaded.params)
    logging.info("Initialised the parameters from %s", loaded.source)
  return state, data_iter


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  evaluator: Evaluator | None = None,
  should_stop: Callable[[int], bool] | None = None,
  preemption: PreemptionFlag | None = None,
) -> TrainResult:
  """Trains (or resumes) in `workdir` until `config.train.steps`.

  `evaluator(step, params)` runs every `train.eval_every` steps and at the end; the best step
  by `train.eval_metric` is kept in `<workdir>/best`. `should_stop(step)` lets a caller end
  the run early after a step (the state is saved first), exactly as SIGTERM preemption does.
  A divergence rolls back to the newest good checkpoint (m6_jax/train/recovery.py).
  `preemption`: the flag whose signal handlers the loop installs (default: a new one, whose
  handlers the loop replaces by the previous ones at the end); a caller's stays installed
  after the loop (the command line's, until the process exits).
  """
  config_lib.validate(config, jax.device_count(), jax.process_count())
  preflight.check_workdir(workdir)
  preflight.check_shards(config, jax.process_count())
  t = config.train
  setup = setup_lib.build(config)
  logging.info("Mesh: %s", dict(setup.mesh.shape))
  ckpts = checkpoints.Checkpoints(checkpoints.checkpoint_dir(workdir), t.keep_checkpoints)
  preflight.check_room_for_checkpoints(setup, ckpts.directory)
  tokenizer, tokenizer_path = _tokenizer(config, workdir)
  start = functools.partial(_start, setup, ckpts, tokenizer, tokenizer_path)
  state, data_iter = start()
  start_step = step = int(state.step)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("Model parameters: %s", f"{num_params:,}")
  checkpoints.write_config(workdir, config)
  best = None
  if evaluator is not None:
    mode = "min" if t.eval_metric.endswith("loss") else "max"
    best_dir = checkpoints.best_dir(workdir)
    best = checkpoints.Checkpoints(best_dir, 1, t.eval_metric, mode, async_save=False)

  writer = metrics_writer.MetricsWriter(workdir, start_step, enabled=multihost.is_primary())
  device = setup.mesh.devices.flat[0]
  peak = progress.peak_flops(device.device_kind, t.peak_flops)
  mesh_peak = peak * setup.mesh.devices.size if peak else None
  record = progress.Progress(setup.family, start_step, writer, mesh_peak)
  record.bad_records = getattr(data_iter, "bad_records", None)  # streamed shards only
  recovery = recovery_lib.Recovery.start(ckpts, writer, t, state)
  owns_flag = preemption is None
  preemption = PreemptionFlag() if owns_flag else preemption
  restore_signal = preemption.install()
  seen_shapes: set[tuple[int, int]] = set()
  poisoned = set(config_lib.parse_positions(t.debug_nonfinite_batches))  # fault injection

  began = time.perf_counter()
  try:
    while step < t.steps:
      try:
        with setup.mesh_context():
          host_batch = divergence.poison(next(data_iter), data_iter, poisoned)
          if record.bad_records is not None:  # past data.max_bad_fraction: one error line
            record.bad_records.check(float(config.data.max_bad_fraction))
          if config.data.length_bucket > 0:
            host_batch = agree_text_lengths(host_batch)
            _log_new_shape(host_batch, seen_shapes, config.data)
          state, metrics = setup.step(state, setup.put_batch(host_batch))
          step += 1
          record.dispatched(step, metrics, host_batch)  # books (and checks) the previous step
          recovery.confirm(booked=step - 1)
          stop_now = preemption.stop_at(step) or (should_stop is not None and should_stop(step))
          if step % t.checkpoint_every == 0 or step == t.steps or stop_now:
            record.close_interval(step)  # may raise Diverged: a diverging state is never saved
            ckpts.save(
              step,
              config=config,
              tokenizer=tokenizer,
              state=state,
              data_iter=data_iter,
              extra_meta=recovery.meta(),
            )
            recovery.saved(step)
          if evaluator is not None and (step % t.eval_every == 0 or step == t.steps):
            _evaluate(evaluator, step, state, best, writer, setup.family, tokenizer)
          if stop_now:
            ckpts.wait()
            preemption.end()
            logging.info("Stopping at step %d (state saved); rerun to resume.", step)
            break
      except divergence.Diverged as event:
        state, data_iter = recovery.roll_back(event, start)
        step = int(state.step)
        record.restart(step)
        record.bad_records = getattr(data_iter, "bad_records", None)
  finally:
    try:
      ckpts.wait()
      writer.close()
      preemption.end()
    finally:
      if owns_flag:
        restore_signal()

  logging.info(
    "Finished at step %d in %s.", step, progress.format_duration(time.perf_counter() - began)
  )
  return TrainResult(
    step, record.first, record.last, record.history, record.losses, start_step, state
  )


def _log_new_shape(host_batch, seen: set[tuple[int, int]], data) -> None:
  """Length bucketing: each new batch shape compiles the step once; say so."""
  shape = (host_batch["src_tokens"].shape[1], host_batch["tgt_input"].shape[1])
  if shape not in seen:
    seen.add(shape)
    max_shapes = (data.src_len // data.length_bucket) * (data.tgt_len // data.length_bucket)
    logging.info(
      "Length bucketing: new batch shape (source %d, target %d), compiling the train step "
      "for it (shape %d of at most %d).",
      *shape,
      len(seen),
      max_shapes,
    )


def _evaluate(evaluator, step, state, best, writer, family, tokenizer) -> None:
  """Runs the evaluator, logs and writes its metrics, and offers the step to `best`."""
  config = family.config
  metrics = evaluator(step, state.params)
  metric = config.train.eval_metric
  if metric not in metrics:
    raise ConfigError(
      f"train.eval_metric='{metric}' is not an eval metric; known: {sorted(metrics)}."
    )
  shown = " | ".join(
    f"{k} {metrics[k]:.3f}"
    for k in family.eval_line_metrics
    if k in metrics and k != metric  # the metric that picks `best` is shown first
  )
  logging.info("eval step %d | %s %.4f | %s", step, metric, metrics[metric], shown)
  writer.write(step, {f"eval_{k}": v for k, v in metrics.items()})
  best.save(step, config=config, tokenizer=tokenizer, params=state.params, metrics=metrics)
  best.wait()
