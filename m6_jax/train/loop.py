"""The training loop, readable top to bottom:

mesh -> tokenizer + data -> model + optimizer -> sharded state -> jitted step -> restore ->
loop (progress, metrics, checkpoints, preemption) -> final save.

A run in a workdir that already holds a checkpoint resumes from its latest step, with the
data iterator where it was, and continues bit-exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from m6_jax import config as config_lib
from m6_jax.data import pipeline, sources
from m6_jax.data import tokenizer as tokenizer_lib
from m6_jax.data.tasks import TASK_NAMES
from m6_jax.model.m6 import M6, M6Config
from m6_jax.parallel import multihost, partitioning
from m6_jax.train import checkpointing, metrics_writer, optim
from m6_jax.train import state as state_lib
from m6_jax.train import step as step_lib


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. the loss diverged); the message says what was saved."""


@dataclasses.dataclass
class TrainResult:
  final_step: int
  first_metrics: dict[str, float]  # the first logged step of this run
  last_metrics: dict[str, float]  # averaged over the last logging interval
  history: list[dict[str, float]]  # every logged interval of this run
  losses: list[float]  # the per-step loss of every step this run executed
  state: Any = None


class PreemptionFlag:
  """SIGTERM (how clusters announce preemption) makes the loop save and exit cleanly.

  One process: our SIGTERM handler sets `requested`. Several processes: JAX's preemption
  service (started by jax.distributed) catches SIGTERM on any of them and all processes agree
  on the step to stop at (`multihost.preemption_sync_point`); our handler would replace
  JAX's, so it is not installed then.
  """

  def __init__(self):
    self.requested = False

  def stop_at(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    return self.requested or multihost.preemption_sync_point(step)

  def install(self) -> Callable[[], None]:
    if multihost.uses_preemption_service():
      return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
      logging.warning("SIGTERM received: saving a checkpoint at the end of this step.")
      self.requested = True

    try:
      signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a notebook worker)
      return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def summarize(sums: dict[str, np.ndarray]) -> dict[str, float]:
  """Turns metric sums accumulated over some steps into the averages we report."""
  out = {
    "loss": float(sums["loss_sum"] / max(sums["weight_sum"], 1.0)),
    "accuracy": float(sums["correct_sum"] / max(sums["weight_sum"], 1.0)),
    "grad_norm": float(sums["grad_norm"] / max(sums["steps"], 1)),
    "learning_rate": float(sums["learning_rate"]),
    "target_tokens": float(sums["weight_sum"]),
  }
  if "text_counts" in sums:  # real (non-pad) text tokens / text positions the step computed
    out["text_fill"] = float(sums["text_counts"][0] / max(sums["text_counts"][1], 1.0))
  for i, name in enumerate(TASK_NAMES):
    if sums["task_weight_sum"][i] > 0:
      out[f"{name}_loss"] = float(sums["task_loss_sum"][i] / sums["task_weight_sum"][i])
  for k in _MEAN_METRICS:  # MoE models only: averaged over the interval's steps
    if k in sums:
      out[k] = float(sums[k] / max(sums["steps"], 1))
  return out


# Step metrics that add up over a logging interval (grad_norm is averaged by the step count).
_SUMMED_METRICS = (
  "loss_sum",
  "weight_sum",
  "correct_sum",
  "task_loss_sum",
  "task_weight_sum",
  "grad_norm",
)
# Per-step means reported when the step returns them (MoE aux losses and drop rate).
_MEAN_METRICS = ("moe_load_balance_loss", "moe_router_z_loss", "moe_dropped_fraction")


def _accumulate(sums: dict | None, metrics: dict, counts: np.ndarray | None = None) -> dict:
  """Adds one step's metrics (and its `text_counts`, when given) to the interval's sums."""
  keys = _SUMMED_METRICS + tuple(k for k in _MEAN_METRICS if k in metrics)
  if sums is None:
    sums = {k: np.zeros_like(np.asarray(metrics[k], np.float64)) for k in keys}
    sums["steps"] = 0
  for k in keys:
    sums[k] = sums[k] + np.asarray(metrics[k], np.float64)
  if counts is not None:
    sums["text_counts"] = sums.get("text_counts", 0.0) + counts
  sums["steps"] += 1
  sums["learning_rate"] = float(metrics["learning_rate"])
  return sums


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


def text_counts(host_batch: dict[str, np.ndarray], process_count: int) -> np.ndarray:
  """[real text tokens, text positions computed] of the global batch: source tokens != 0
  plus target tokens with weight > 0, over batch * (source + target columns). With several
  processes the real tokens are this process's rows times the process count (an estimate)."""
  src, weights = host_batch["src_tokens"], host_batch["tgt_weights"]
  real = np.count_nonzero(src) + np.count_nonzero(weights)
  positions = src.shape[0] * (src.shape[1] + weights.shape[1])
  return np.array([real, positions], np.float64) * process_count


def _copy_tokenizer(init_from: str, workdir: str) -> None:
  """A fine-tuning run uses the tokenizer its initial checkpoint was trained with."""
  target = os.path.join(workdir, "tokenizer", "spm.model")
  if os.path.exists(target):
    return
  path = os.path.abspath(init_from)
  for root in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    source = os.path.join(root, "tokenizer", "spm.model")
    if os.path.exists(source):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.copyfile(source, target)
      logging.info("Using the tokenizer of %s", root)
      return
  logging.warning("No tokenizer/spm.model next to %s; training a new one.", init_from)


def _init_params_from(state: Any, shardings: Any, init_from: str) -> Any:
  """The state with its parameters from the latest checkpoint of `init_from` (fine-tuning:
  the optimizer state and step stay fresh)."""
  params, step, _ = checkpointing.load_params(init_from)
  checkpointing.check_param_shapes(state.params, params, f"{init_from} (step {step})")
  params = jax.tree.map(
    lambda x, p, s: jax.device_put(x.astype(p.dtype), s), params, state.params, shardings.params
  )
  logging.info("Initialised the parameters from %s (step %d)", init_from, step)
  return state.replace(params=params)


class _Evaluator:
  """Periodic evaluation (train.eval_every) that keeps the best checkpoint in <workdir>/best."""

  def __init__(self, config, workdir, model, tokenizer):
    from m6_jax.evaluation import evaluate
    from m6_jax.infer import generate

    self.config, self.workdir, self.evaluate, self.generate = config, workdir, evaluate, generate
    self.model, self.tokenizer = model, tokenizer
    metric = config.train.eval_metric
    self.metric = metric
    mode = "min" if metric.endswith("loss") else "max"
    self.manager = checkpointing.make_best_manager(workdir, metric, mode)
    self.writer = metrics_writer.MetricsWriter(workdir, enabled=jax.process_index() == 0)

  def __call__(self, step: int, state: Any) -> dict[str, float]:
    params = multihost.to_host(state.params)
    loaded = self.generate.LoadedModel(self.config, self.model, params, self.tokenizer, step, "")
    # Every process evaluates on its own first device (the same numbers everywhere).
    with multihost.process_local(partitioning.logical_rules(self.config)):
      metrics = self.evaluate.evaluate(loaded, int(self.config.train.eval_examples))
    if self.metric not in metrics:
      raise config_lib.ConfigError(
        f"train.eval_metric='{self.metric}' is not an eval metric; known: {sorted(metrics)}."
      )
    logging.info(
      "eval step %d | %s %.4f | %s",
      step,
      self.metric,
      metrics[self.metric],
      " | ".join(
        f"{k} {metrics[k]:.3f}" for k in ("loss", "vqa_accuracy", "cider") if k in metrics
      ),
    )
    self.writer.write(step, {f"eval_{k}": v for k, v in metrics.items()})
    checkpointing.save_best(self.manager, step, state, self.config, metrics)
    return metrics


def train(
  config: ml_collections.ConfigDict, workdir: str, should_stop: Callable[[int], bool] | None = None
) -> TrainResult:
  """Trains (or resumes) in `workdir` until `config.train.steps`.

  `should_stop(step)` lets a caller end the run early after a step (the state is saved
  first), exactly as a SIGTERM preemption does.
  """
  config_lib.validate(config, jax.device_count(), jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  t = config.train

  # Mesh and logical rules.
  mesh = partitioning.make_mesh(config)
  rules = partitioning.logical_rules(config)
  logging.info("Mesh: %s", dict(mesh.shape))

  # Tokenizer and data: each process reads its own slice of every global batch.
  def make_tokenizer() -> tokenizer_lib.Tokenizer:
    if config.get("init_from") and not config.data.tokenizer_path:
      _copy_tokenizer(config.init_from, workdir)
    return tokenizer_lib.get_or_train_tokenizer(
      workdir,
      vocab_size=config.model.vocab_size,
      seed=config.seed,
      num_corpus_examples=config.data.tokenizer_corpus_examples,
      model_path=config.data.tokenizer_path or None,
      # A user dataset trains the tokenizer on its own texts (read lazily, only if needed).
      corpus=sources.iter_dataset_text(config) if config.data.source == "tfds" else None,
    )

  try:  # process 0 trains (or copies) the workdir's tokenizer, then the others load it
    tokenizer = multihost.primary_first(make_tokenizer, "tokenizer")
  except ValueError as e:  # a tokenizer that does not fit model.vocab_size
    raise config_lib.ConfigError(f"{e} (key: model.vocab_size)") from e
  try:
    dataset = pipeline.make_dataset(
      config,
      tokenizer,
      split="train",
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  except ValueError as e:  # e.g. a task the prepared dataset has no records for
    raise config_lib.ConfigError(f"{e} (keys: data.*)") from e
  data_iter = iter(dataset)

  # Model, optimizer, sharded state and the jitted step.
  model = M6(M6Config.from_config(config))
  tx = optim.make_optimizer(t)
  schedule = optim.learning_rate_schedule(t)
  state, state_shardings = state_lib.create_sharded_state(model, tx, mesh, rules, config.seed)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("Model parameters: %s", f"{num_params:,}")

  example_batch = next(iter(dataset))  # a fresh iterator: shapes only, data_iter untouched
  batch_shardings = partitioning.batch_shardings(example_batch, mesh, rules)
  train_step = step_lib.jit_train_step(
    step_lib.make_train_step(model, tx, schedule, t, num_tasks=len(TASK_NAMES)),
    state_shardings,
    batch_shardings,
    partitioning.replicated(mesh),
  )

  # Checkpoints: resume when the workdir already has one.
  manager = checkpointing.make_manager(workdir, t.keep_checkpoints)
  start_step = 0
  if manager.latest_step() is not None:
    abstract = state_lib.abstract_state(model, tx, state_shardings)
    state = checkpointing.restore(manager, abstract, data_iter)
    start_step = int(state.step)
    logging.info("Resumed from step %d in %s", start_step, workdir)
  elif config.get("init_from"):
    state = _init_params_from(state, state_shardings, config.init_from)
  checkpointing.write_config(workdir, config)
  evaluator = _Evaluator(config, workdir, model, tokenizer) if t.eval_every else None

  writer = metrics_writer.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  preemption = PreemptionFlag()
  restore_signal = preemption.install()
  bucketing = config.data.length_bucket > 0
  max_shapes = (config.data.src_len // max(config.data.length_bucket, 1)) * (
    config.data.tgt_len // max(config.data.length_bucket, 1)
  )
  seen_shapes: set[tuple[int, int]] = set()

  result = TrainResult(start_step, {}, {}, [], [])
  step = start_step
  interval_sums, pending = None, None
  nan_streak = 0
  interval_start = time.perf_counter()
  interval_steps = 0
  run_start = time.perf_counter()

  def log_interval(at_step: int) -> None:
    nonlocal interval_sums, interval_start, interval_steps
    elapsed = time.perf_counter() - interval_start
    summary = summarize(interval_sums)
    summary["steps_per_sec"] = interval_steps / max(elapsed, 1e-9)
    summary["examples_per_sec"] = summary["steps_per_sec"] * config.data.batch_size
    # Real (non-pad) text tokens, so that the gain of length bucketing shows.
    summary["tokens_per_sec"] = float(interval_sums["text_counts"][0]) / max(elapsed, 1e-9)
    writer.write(at_step, summary)
    result.history.append(dict(summary, step=at_step))
    if not result.first_metrics:
      result.first_metrics = dict(summary, step=at_step)
    result.last_metrics = dict(summary, step=at_step)
    if at_step == start_step + 1:  # this interval is dominated by compilation
      speed = f"first step (with compilation) {elapsed:.1f}s"
    else:
      eta = (t.steps - at_step) / max(summary["steps_per_sec"], 1e-9)
      speed = (
        f"{summary['steps_per_sec']:.2f} steps/s | {summary['examples_per_sec']:,.0f} ex/s | "
        f"{summary['tokens_per_sec']:,.0f} real tok/s (fill {summary['text_fill']:.0%}) | "
        f"ETA {_format_duration(eta)}"
      )
    i2t = summary.get("image_to_text_loss")
    logging.info(
      "step %d/%d | loss %.4f | %sacc %.3f | grad_norm %.3f | lr %.2e | %s",
      at_step,
      t.steps,
      summary["loss"],
      f"image_to_text {i2t:.4f} | " if i2t is not None else "",
      summary["accuracy"],
      summary["grad_norm"],
      summary["learning_rate"],
      speed,
    )
    interval_sums, interval_steps = None, 0
    interval_start = time.perf_counter()

  def finish_step(metrics_on_device: Any, at_step: int, counts: np.ndarray) -> None:
    """Host-side bookkeeping for a step whose successor is already dispatched."""
    nonlocal interval_sums, nan_streak, interval_steps
    metrics = jax.device_get(metrics_on_device)
    result.losses.append(float(metrics["loss"]))
    if not bool(metrics["finite"]):
      nan_streak += 1
      if nan_streak > t.max_nan_steps:
        raise TrainingError(
          f"Non-finite loss at step {at_step} ({nan_streak} in a row, train.max_nan_steps="
          f"{t.max_nan_steps}); the update was skipped and the last good state was kept. "
          "Lower train.lr, raise train.warmup_steps or check the data."
        )
      return
    nan_streak = 0
    interval_sums = _accumulate(interval_sums, metrics, counts)
    interval_steps += 1
    # Log the very first step (the reference point for "did it learn") and every interval.
    if at_step == start_step + 1 or at_step % t.log_every == 0 or at_step == t.steps:
      log_interval(at_step)

  try:
    with partitioning.mesh_context(mesh, rules):
      while step < t.steps:
        host_batch = next(data_iter)
        if bucketing:
          host_batch = agree_text_lengths(host_batch)
          shape = (host_batch["src_tokens"].shape[1], host_batch["tgt_input"].shape[1])
          if shape not in seen_shapes:
            seen_shapes.add(shape)
            logging.info(
              "Length bucketing: new batch shape (source %d, target %d), compiling the train "
              "step for it (shape %d of at most %d).",
              *shape,
              len(seen_shapes),
              max_shapes,
            )
        counts = text_counts(host_batch, jax.process_count())
        batch = partitioning.host_batch_to_global(host_batch, batch_shardings)
        state, metrics = train_step(state, batch)
        step += 1
        # Fetch the previous step's metrics only now, so the device never waits on the host.
        if pending is not None:
          finish_step(*pending)
        pending = (metrics, step, counts)
        stop_now = preemption.stop_at(step) or (should_stop is not None and should_stop(step))
        if step % t.checkpoint_every == 0 or step == t.steps or stop_now:
          finish_step(*pending)
          pending = None
          checkpointing.save(manager, step, state, data_iter, config)
        if evaluator is not None and (step % t.eval_every == 0 or step == t.steps):
          evaluator(step, state)
        if stop_now:
          logging.info("Stopping at step %d (state saved); rerun to resume.", step)
          break
      if pending is not None:
        finish_step(*pending)
  except TrainingError:
    checkpointing.save(manager, step - 1, state, data_iter, config, force=True)
    raise
  finally:
    manager.wait_until_finished()
    writer.close()
    restore_signal()

  total = time.perf_counter() - run_start
  logging.info("Finished at step %d in %s.", step, _format_duration(total))
  result.final_step = step
  result.state = state
  return result
