"""A sweep's results: each run's final metrics, their mean, standard deviation and 95%
interval over seeds per configuration, and the files that report them:

  results.csv  one row per (configuration, metric): n, mean, std, ci95_low, ci95_high
  runs.csv     one row per run: id, configuration, seed, every final metric
  results.md   the headline metrics as mean ± std [95% interval], provenance (git commit,
               package versions, command), every run with its overrides and config files,
               and the plots (plots.py)

A run's metrics are, per train stage, the last record of its metrics.jsonl (an average over
that record's `steps_averaged` steps), named `<stage>/<key>`, and, per eval stage, the
`metrics` of eval_metrics.json, named `<stage>/<key>`. Timings are left out: they are not
results, and a rerun must give the same table.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import json
import math
import os
import platform
import subprocess
from typing import Any, Iterable

from experiments.sweeps.spec import SEED, Run, Sweep, Train, format_value

# Record keys that measure the machine, not the model, and bookkeeping.
NOT_RESULTS = frozenset(
  {"step", "time", "steps_per_sec", "examples_per_sec", "tokens_per_sec", "mfu", "steps_averaged"}
  | {"learning_rate", "target_tokens", "text_fill"}  # the schedule's and the batches' own
)
PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "grain",
  "numpy",
  "ml-collections",
)


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def read_records(workdir: str) -> list[dict]:
  """The metric records of a train stage's metrics.jsonl (events such as rollbacks left out)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if "event" not in r]


def final_metrics(run: Run, directory: str) -> dict[str, float]:
  out: dict[str, float] = {}
  for stage in run.stages:
    if isinstance(stage, Train):
      records = read_records(os.path.join(directory, stage.name))
      last = records[-1] if records else {}
      values = {k: v for k, v in last.items() if k not in NOT_RESULTS}
    else:
      with open(os.path.join(directory, stage.of, stage.metrics_file)) as f:
        values = json.load(f)["metrics"]
    out.update(
      {
        f"{stage.name}/{k}": float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not k.endswith("_seconds")  # eval_seconds: a timing
      }
    )
  return out


def stage_configs(run: Run, directory: str) -> dict[str, Any]:
  """The full config each train stage ran with (its workdir's config.json)."""
  configs = {}
  for stage in run.stages:
    if isinstance(stage, Train):
      with open(os.path.join(directory, stage.name, "config.json")) as f:
        configs[stage.name] = json.load(f)
  return configs


def t_quantile_975(df: int) -> float:
  """Student's t 97.5% quantile (scipy comes with jax)."""
  from scipy import stats

  return float(stats.t.ppf(0.975, df))


def summarize(values: list[float]) -> dict[str, float]:
  """n, mean, sample std and the t-based 95% interval of the mean (NaN where n < 2)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return {"n": n, "mean": mean, "std": math.nan, "ci95_low": math.nan, "ci95_high": math.nan}
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  half = t_quantile_975(n - 1) * std / math.sqrt(n)
  return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def varied_keys(finished: list[dict]) -> list[str]:
  """The override keys (seed aside) whose value differs between runs."""
  keys = sorted({k for r in finished for k in r["overrides"] if k != SEED})
  return [k for k in keys if len({repr(r["overrides"].get(k)) for r in finished}) > 1]


def labels(finished: list[dict]) -> dict[str, str]:
  """{configuration: its label}: the overrides that differ between configurations (the ones
  every run shares are said once, in results.md), or "all runs" where there is one."""
  varied, out = varied_keys(finished), {}
  for r in finished:
    items = [f"{k}={format_value(r['overrides'][k])}" for k in varied if k in r["overrides"]]
    out[r["configuration"]] = " ".join(items) or "all runs"
  return out


def shared_overrides(finished: list[dict]) -> dict[str, Any]:
  """The overrides (seed aside) that every run has, with the same value."""
  first = finished[0]["overrides"]
  return {
    k: v
    for k, v in sorted(first.items())
    if k != SEED and all(repr(r["overrides"].get(k)) == repr(v) for r in finished)
  }


def by_configuration(finished: list[dict]) -> dict[str, list[dict]]:
  """Finished runs grouped by configuration, in the sweep's order."""
  groups: dict[str, list[dict]] = {}
  for record in finished:
    groups.setdefault(record["configuration"], []).append(record)
  return groups


def summary_rows(finished: list[dict]) -> list[dict[str, Any]]:
  rows, label = [], labels(finished)
  for configuration, records in by_configuration(finished).items():
    names = sorted({k for r in records for k in r["metrics"]})
    for name in names:
      values = [r["metrics"][name] for r in records if name in r["metrics"]]
      rows.append({"configuration": label[configuration], "metric": name, **summarize(values)})
  return rows


def _csv(rows: list[dict], columns: list[str]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: _cell(row.get(k, "")) for k in columns})
  return out.getvalue()


def _cell(value: Any) -> Any:
  return repr(value) if isinstance(value, float) and not math.isnan(value) else value


def provenance() -> dict[str, Any]:
  """The git commit (and whether the tree had changes), the packages' and Python's versions."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  def git(*args: str) -> str:
    try:
      out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
      return out.stdout.strip() if out.returncode == 0 else ""
    except OSError:
      return ""

  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  changed = git("status", "--porcelain", "--untracked-files=no")
  return {
    "git_commit": git("rev-parse", "HEAD") or "unknown (not a git checkout)",
    "git_changes": "uncommitted changes" if changed else "clean",
    "python": platform.python_version(),
    "platform": platform.platform(),
    "packages": versions,
  }


def _fmt(value: float, digits: int = 4) -> str:
  return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def headline_table(rows: list[dict], metrics: Iterable[str]) -> str:
  """Configurations x headline metrics: mean ± std [95% interval] (n)."""
  metrics = list(metrics)
  cells: dict[str, dict[str, str]] = {}
  for row in rows:
    if row["metric"] in metrics:
      cells.setdefault(row["configuration"], {})[row["metric"]] = (
        f"{_fmt(row['mean'])} ± {_fmt(row['std'])} "
        f"[{_fmt(row['ci95_low'])}, {_fmt(row['ci95_high'])}] (n={row['n']})"
      )
  configurations = list(dict.fromkeys(r["configuration"] for r in rows))
  lines = [
    "| configuration | " + " | ".join(metrics) + " |",
    "|" + " --- |" * (len(metrics) + 1),
  ]
  for c in configurations:
    lines.append(f"| {c} | " + " | ".join(cells.get(c, {}).get(m, "-") for m in metrics) + " |")
  return "\n".join(lines)


def write(sweep: Sweep, finished: list[dict], sweep_dir: str, command: str) -> list[str]:
  """results.csv, runs.csv, results.md and the plots, from the finished runs' records (in
  the sweep's order); returns the paths written."""
  rows = summary_rows(finished)
  stat_columns = ["configuration", "metric", "n", "mean", "std", "ci95_low", "ci95_high"]
  names = sorted({k for r in finished for k in r["metrics"]})
  label = labels(finished)
  run_rows = [
    {
      "run_id": r["id"],
      "configuration": label[r["configuration"]],
      "seed": r["seed"],
      **r["metrics"],
    }
    for r in finished
  ]
  files = {
    "results.csv": _csv(rows, stat_columns),
    "runs.csv": _csv(run_rows, ["run_id", "configuration", "seed", *names]),
  }
  from experiments.sweeps import plots  # matplotlib: only when writing

  images = plots.write(sweep, finished, sweep_dir)
  files["results.md"] = markdown(sweep, rows, finished, command, images)
  written = []
  for name, text in files.items():
    path = os.path.join(sweep_dir, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
    written.append(path)
  return written + [os.path.join(sweep_dir, i) for i in images]


def markdown(sweep: Sweep, rows, finished, command: str, images: list[str]) -> str:
  p = provenance()
  seeds = sorted({str(r["seed"]) for r in finished})
  lines = [
    f"# Sweep {sweep.name}",
    "",
    f"`{command}`",
    "",
    f"{len(finished)} runs, {len(by_configuration(finished))} configuration(s), seeds "
    f"{', '.join(seeds)}; mean ± standard deviation over seeds [95% interval of the mean, "
    "Student's t] (n = seeds).",
    "",
    headline_table(rows, sweep.metrics),
    "",
    "Every run: "
    + (" ".join(f"`{k}={format_value(v)}`" for k, v in shared_overrides(finished).items()) or "-"),
    "",
    *[f"![{i}]({i})" for i in images],
    "",
    "## Provenance",
    "",
    f"- git commit: {p['git_commit']} ({p['git_changes']})",
    f"- written: {datetime.datetime.now().isoformat(timespec='seconds')}",
    f"- Python {p['python']} on {p['platform']}",
    "- packages: " + ", ".join(f"{k} {v}" for k, v in p["packages"].items()),
    "",
    "## Every metric (results.csv)",
    "",
    "| configuration | metric | n | mean | std | 95% interval |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    lines.append(
      f"| {r['configuration']} | {r['metric']} | {r['n']} | {_fmt(r['mean'])} | "
      f"{_fmt(r['std'])} | [{_fmt(r['ci95_low'])}, {_fmt(r['ci95_high'])}] |"
    )
  lines += [
    "",
    "## Runs (runs.csv; each stage's full config: runs/<id>/<stage>/config.json)",
    "",
    "| run | seed | overrides | stages |",
    "| --- | --- | --- | --- |",
  ]
  for r in finished:
    stages = ", ".join(
      f"[{s['name']}](runs/{r['id']}/{s['name']}/config.json)"
      if s["kind"] == "train"
      else f"{s['name']} (eval of {s['of']})"
      for s in r["stages"]
    )
    overrides = " ".join(f"{k}={format_value(v)}" for k, v in sorted(r["overrides"].items()))
    lines.append(f"| {r['id']} | {r['seed']} | {overrides} | {stages} |")
  return "\n".join(lines) + "\n"
