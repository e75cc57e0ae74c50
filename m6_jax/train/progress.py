"""The train loop's bookkeeping: per-step metric sums over a logging interval, their averages
with throughput and MFU, the progress line, and `metrics.jsonl` / TensorBoard records.

MFU is the analytic model FLOPs of the steps (the family's `step_flops`: M6's at each batch's
text columns, m6_jax/model/param_count.py) over the interval's wall time and the mesh's peak: the
published dense bf16 peak of the device kind for TPUs and data-centre GPUs, or
`train.peak_flops` (per device) where it is set, e.g. on CPU. Unknown peak: no MFU.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from m6_jax.data import tasks
from m6_jax.train import divergence

# Published dense bf16 peak FLOP/s per chip (the vendors' data sheets; NVIDIA's "with
# sparsity" figures halved), by jax Device.device_kind prefix: the first that matches wins,
# so a kind that another's prefix also matches comes before it.
PEAK_FLOPS_BY_KIND = (
  ("TPU v6 lite", 918e12),  # v6e
  ("TPU v5 lite", 197e12),  # v5e
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),  # v5p reports itself as "TPU v5"
  ("TPU v4", 275e12),
  ("NVIDIA B200", 2250e12),
  ("NVIDIA GH200", 989e12),
  ("NVIDIA H200", 989e12),
  ("NVIDIA H100 PCIe", 756e12),
  ("NVIDIA H100 NVL", 835e12),
  ("NVIDIA H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
  ("NVIDIA A100", 312e12),
  ("NVIDIA L40S", 362e12),
  ("NVIDIA L40", 181e12),
  ("NVIDIA L4", 121e12),
)

# Step metrics that add up over a logging interval (grad_norm is averaged by the step count).
_SUMMED = ("loss_sum", "weight_sum", "correct_sum", "task_loss_sum", "task_weight_sum", "grad_norm")
# Per-step means reported when the step returns them (MoE aux losses and drop rate).
_MEANS = ("moe_load_balance_loss", "moe_router_z_loss", "moe_dropped_fraction")
# A step without token sums (the VQGAN's) returns per-step means: all are averaged over the
# interval, except these.
_NOT_AVERAGED = ("finite", "learning_rate")


def peak_flops(device_kind: str, configured: float) -> float | None:
  """Peak FLOP/s of one device: `configured` if > 0, else the table's, else None."""
  if configured > 0:
    return float(configured)
  for prefix, flops in PEAK_FLOPS_BY_KIND:
    if device_kind.startswith(prefix):
      return flops
  return None


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def text_counts(host_batch: dict[str, np.ndarray], process_count: int) -> np.ndarray:
  """[real text tokens, text positions computed] of the global batch: source tokens != 0
  plus target tokens with weight > 0, over batch * (source + target columns). With several
  processes the real tokens are this process's rows times the process count (an estimate)."""
  src, weights = host_batch["src_tokens"], host_batch["tgt_weights"]
  real = np.count_nonzero(src) + np.count_nonzero(weights)
  positions = src.shape[0] * (src.shape[1] + weights.shape[1])
  return np.array([real, positions], np.float64) * process_count


def _is_text_step(metrics: dict) -> bool:
  return "loss_sum" in metrics


def accumulate(sums: dict | None, metrics: dict, counts: np.ndarray | None = None) -> dict:
  """Adds one step's metrics (and its `text_counts`, when given) to the interval's sums."""
  if _is_text_step(metrics):
    keys = _SUMMED + tuple(k for k in _MEANS if k in metrics)
  else:
    keys = tuple(k for k in metrics if k not in _NOT_AVERAGED)
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


def summarize(sums: dict[str, Any]) -> dict[str, float]:
  """Turns metric sums accumulated over some steps into the averages we report."""
  if not _is_text_step(sums):  # per-step means: their mean over the interval's steps
    steps = max(sums["steps"], 1)
    out = {k: float(v / steps) for k, v in sums.items() if k not in ("steps", "learning_rate")}
    return dict(out, learning_rate=float(sums["learning_rate"]))
  out = {
    "loss": float(sums["loss_sum"] / max(sums["weight_sum"], 1.0)),
    "accuracy": float(sums["correct_sum"] / max(sums["weight_sum"], 1.0)),
    "grad_norm": float(sums["grad_norm"] / max(sums["steps"], 1)),
    "learning_rate": float(sums["learning_rate"]),
    "target_tokens": float(sums["weight_sum"]),
  }
  if "text_counts" in sums:  # real (non-pad) text tokens / text positions the step computed
    out["text_fill"] = float(sums["text_counts"][0] / max(sums["text_counts"][1], 1.0))
  for i, name in enumerate(tasks.names()):
    if i < len(sums["task_weight_sum"]) and sums["task_weight_sum"][i] > 0:
      out[f"{name}_loss"] = float(sums["task_loss_sum"][i] / sums["task_weight_sum"][i])
  for k in _MEANS:  # MoE models only: averaged over the interval's steps
    if k in sums:
      out[k] = float(sums[k] / max(sums["steps"], 1))
  return out


@dataclasses.dataclass
class Progress:
  """The bookkeeping of dispatched steps. `dispatched` books the previous step (so the host
  fetches step N's metrics only once step N+1 is queued, and the device never waits) and
  keeps this one pending; `flush` books the pending one. Booking sums the finished steps of
  the current logging interval; `log` turns them into one record (metrics.jsonl,
  TensorBoard, the progress line) and starts the next interval."""

  family: Any  # m6_jax/train/families/: the step's FLOPs and its part of the progress line
  start_step: int
  writer: Any  # metrics_writer.MetricsWriter
  mesh_peak_flops: float | None  # peak FLOP/s of all the mesh's devices together
  history: list[dict[str, float]] = dataclasses.field(default_factory=list)
  losses: list[float] = dataclasses.field(default_factory=list)  # every step booked

  def __post_init__(self):
    self.config: ml_collections.ConfigDict = self.family.config
    self._sums: dict | None = None
    self._steps, self._step_flops = 0, 0.0
    self._start = time.perf_counter()
    self._pending: tuple | None = None
    self._nonfinite = 0  # steps of this interval whose update was not applied
    self.monitor = divergence.Monitor.from_config(self.config.train)
    # Streamed shards: the bad records skipped so far (m6_jax/data/bad_records.py), or None.
    self.bad_records = None

  def dispatched(self, step: int, metrics: dict, host_batch: dict[str, np.ndarray]) -> None:
    """Step `step` (on `host_batch`) is queued on the device with these metrics."""
    self.flush()
    counts = None
    if "src_tokens" in host_batch:  # text: count its real tokens
      counts = text_counts(host_batch, jax.process_count())
    flops = self.family.step_flops(host_batch)
    self._pending = (step, metrics, counts, flops)

  def flush(self) -> None:
    """Books the pending step: fetches its metrics and raises divergence.Diverged if the
    step is one (divergence.Monitor); a non-finite step (not applied) is counted, not
    averaged."""
    if self._pending is None:
      return
    step, metrics, counts, flops = self._pending
    self._pending = None
    metrics = jax.device_get(metrics)
    loss, finite = float(metrics["loss"]), bool(metrics["finite"])
    self.losses.append(loss)
    reason = self.monitor.observe(loss, finite)
    if reason is not None:
      raise divergence.Diverged(step, reason)
    if finite:
      self.add(metrics, counts, flops)
    else:
      self._nonfinite += 1
    if self.due(step):
      self.log(step)

  def close_interval(self, step: int) -> None:
    """Logs the steps booked since the last record (at checkpoints and at a stop, so that
    truncating metrics.jsonl to a checkpoint's step keeps every step before it)."""
    self.flush()
    if self._steps or self._nonfinite:
      self.log(step)

  def restart(self, step: int) -> None:
    """After a rollback to `step`: drops the pending step, the interval and what the history
    holds after `step`, and starts watching the losses afresh."""
    self._pending, self._sums, self._steps, self._step_flops = None, None, 0, 0.0
    self._nonfinite = 0
    self.history = [h for h in self.history if h["step"] <= step]
    self.monitor.reset()
    self._start = time.perf_counter()

  def add(self, metrics: dict, counts: np.ndarray, flops: float) -> None:
    """One finished step's metrics (fetched from the device), text counts and FLOPs."""
    self._sums = accumulate(self._sums, metrics, counts)
    self._steps += 1
    self._step_flops += flops

  def due(self, step: int) -> bool:
    """Log the very first step (the reference point for "did it learn") and every interval."""
    t = self.config.train
    return step == self.start_step + 1 or step % t.log_every == 0 or step == t.steps

  def log(self, step: int) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    if self._sums is None:  # every step of the interval was non-finite
      summary = {"steps_averaged": 0, "steps_nonfinite": self._nonfinite}
      self.writer.write(step, summary)
      logging.warning("step %d | %d non-finite step(s), not applied", step, self._nonfinite)
      self._nonfinite, self._start = 0, time.perf_counter()
      return summary
    summary = summarize(self._sums)
    summary["steps_per_sec"] = self._steps / elapsed
    summary["examples_per_sec"] = summary["steps_per_sec"] * self.config.data.batch_size
    if "text_counts" in self._sums:  # real (non-pad) text tokens: the gain of bucketing shows
      summary["tokens_per_sec"] = float(self._sums["text_counts"][0]) / elapsed
    if self.mesh_peak_flops and self._step_flops:
      summary["mfu"] = self._step_flops / elapsed / self.mesh_peak_flops
    if self.bad_records is not None:
      summary.update(self.bad_records.metrics())
    summary["steps_averaged"] = self._steps  # finite steps; with the non-finite ones below,
    if self._nonfinite:  # every step since the previous record
      summary["steps_nonfinite"] = self._nonfinite
    self.writer.write(step, summary)
    self.history.append(dict(summary, step=step))
    logging.info(self._line(step, summary, elapsed))
    self._sums, self._steps, self._step_flops, self._nonfinite = None, 0, 0.0, 0
    self._start = time.perf_counter()
    return summary

  def _line(self, step: int, s: dict[str, float], elapsed: float) -> str:
    t = self.config.train
    if step == self.start_step + 1:  # this interval is dominated by compilation
      speed = f"first step (with compilation) {elapsed:.1f}s"
    else:
      eta = (t.steps - step) / max(s["steps_per_sec"], 1e-9)
      mfu = f"MFU {s['mfu']:.1%} | " if "mfu" in s else ""
      tokens = (
        f"{s['tokens_per_sec']:,.0f} real tok/s (fill {s['text_fill']:.0%}) | "
        if "tokens_per_sec" in s
        else ""
      )
      speed = (
        f"{s['steps_per_sec']:.2f} steps/s | {s['examples_per_sec']:,.0f} ex/s | {tokens}{mfu}"
        f"ETA {format_duration(eta)}"
      )
    terms = self.family.progress_terms(s)
    bad = self.bad_records.summary() if self.bad_records is not None else ""
    return (
      f"step {step}/{t.steps} | loss {s['loss']:.4f} | {terms} | "
      f"grad_norm {s['grad_norm']:.3f} | lr {s['learning_rate']:.2e} | {speed}"
      + (f" | {bad}" if bad else "")
    )

  @property
  def first(self) -> dict[str, float]:
    return self.history[0] if self.history else {}

  @property
  def last(self) -> dict[str, float]:
    return self.history[-1] if self.history else {}
