"""Runs a sweep, resumably, and writes its tables and plots:

  python -m experiments.sweeps.run experiments/sweeps/base_seeds.py --workdir=/tmp/sweep_base

Every run gets <workdir>/runs/<id> (the id: a hash of its overrides, seed included, and its
stages). Rerunning the same command skips finished runs and resumes interrupted ones from
their checkpoints; the tables are written when every run has finished (results.csv,
runs.csv, results.md, loss_curves.png, final_metrics.png in --workdir).

  --parallel=N        runs at a time (local pool; job-array width with submitit)
  --launcher=submitit one job per run through submitit: Slurm where there is one
                      (--slurm_partition, --slurm_nodes, --gpus_per_node, --cpus_per_task,
                      --timeout_min), or --submitit_cluster=local to run the jobs here
  --set KEY=VALUE     an extra override for every run (repeatable), e.g. --set train.steps=100
                      for a quick look; it is part of the runs' ids (not for a key the
                      sweep varies: that is an error)
  --report_only       write the tables from the runs finished so far, run nothing
  --dry_run           list the runs and their commands, run nothing

Exit status: 0 all runs finished (by this runner or another on the same workdir); 1 some run
failed (its error is printed; rerun to retry); 2 a bad sweep file, override or flag (one
`error:` line); 143 / 130 stopped by SIGTERM / Ctrl-C (the running stages saved; rerun to
resume).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from experiments.sweeps import execute, launch, results, spec


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, exit status 2, as m6_jax.main does
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="python -m experiments.sweeps.run",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("sweep", help="a sweep file, e.g. experiments/sweeps/base_seeds.py")
  p.add_argument("--workdir", required=True, help="the sweep's directory (runs, tables, plots)")
  p.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
  p.add_argument("--launcher", choices=("local", "submitit"), default="local")
  p.add_argument("--submitit_cluster", choices=("slurm", "local", "debug"), default=None)
  p.add_argument("--slurm_partition", default="")
  p.add_argument("--slurm_nodes", type=int, default=1, help="hosts per run (multi-host runs)")
  p.add_argument("--gpus_per_node", type=int, default=0)
  p.add_argument("--cpus_per_task", type=int, default=8)
  p.add_argument("--timeout_min", type=int, default=24 * 60)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
  p.add_argument("--report_only", action="store_true")
  p.add_argument("--dry_run", action="store_true")
  return p


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _extra_overrides(items: list[str]) -> dict:
  extra = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      _fail(f"--set {item!r} is not KEY=VALUE, e.g. --set train.steps=100")
    extra[key.strip()] = spec.parse_value(value)
  return extra


def _check_args(args) -> None:
  if args.parallel < 1:
    _fail(f"--parallel={args.parallel} must be at least 1")
  if args.slurm_nodes < 1:
    _fail(f"--slurm_nodes={args.slurm_nodes} must be at least 1")
  if not args.workdir.strip():
    _fail("--workdir is empty; give the sweep a directory, e.g. --workdir=/tmp/sweep")
  if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    _fail(f"--workdir={args.workdir} is a file, not a directory")
  if args.report_only and not os.path.isdir(args.workdir):
    _fail(f"--report_only: no sweep directory {args.workdir}")
  if args.launcher == "local" and (args.submitit_cluster or args.slurm_partition):
    _fail("--submitit_cluster / --slurm_partition need --launcher=submitit")
  if args.slurm_nodes > 1 and args.launcher != "submitit":
    _fail("--slurm_nodes > 1 (multi-host runs) needs --launcher=submitit")


def _reporter(runs: list[spec.Run]):
  """Prints one line per run as it ends; runs are named by the overrides that differ."""
  label = results.labels(
    [{"overrides": r.overrides, "configuration": r.configuration} for r in runs]
  )

  def report(run: spec.Run, outcome: execute.Outcome) -> None:
    i = runs.index(run)
    took = f" in {outcome.seconds / 60:.1f} min" if outcome.seconds else ""
    detail = f": {outcome.message}" if outcome.message else ""
    print(
      f"[{i + 1}/{len(runs)}] run {run.id} (seed {run.seed}, {label[run.configuration]}) "
      f"{outcome.status}{took}{detail}",
      flush=True,
    )

  return report


def _write_tables(sweep, runs, workdir: str, command: str, partial: bool) -> None:
  finished = [execute.read_finished(workdir, r) for r in runs if execute.is_finished(workdir, r)]
  if not finished:
    print("no run has finished yet: no tables written")
    return
  paths = results.write(sweep, finished, workdir, command)
  label = f" ({len(finished)} of {len(runs)} runs finished)" if partial else ""
  print(f"wrote {', '.join(os.path.basename(p) for p in paths)} in {workdir}{label}")
  rows = results.summary_rows(finished)
  print(results.headline_table(rows, sweep.metrics))


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  _check_args(args)
  try:
    sweep = spec.load(args.sweep, _extra_overrides(args.overrides))
  except spec.SweepError as e:
    _fail(str(e))
  workdir = os.path.abspath(args.workdir)
  runs = list(sweep.runs)
  command = "python -m experiments.sweeps.run " + " ".join(
    shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
  )
  if args.dry_run:
    for run in runs:
      print(f"run {run.id} (seed {run.seed}, {run.configuration})")
      for stage in run.stages:
        print("  " + " ".join(execute.command(run, stage, execute.run_dir(workdir, run))))
    return 0
  if args.report_only:
    _write_tables(sweep, runs, workdir, command, partial=True)
    return 0
  os.makedirs(workdir, exist_ok=True)
  todo = [r for r in runs if not execute.is_finished(workdir, r)]
  print(
    f"sweep {sweep.name}: {len(runs)} runs, {len(runs) - len(todo)} finished before, "
    f"{len(todo)} to run ({args.launcher}, {args.parallel} at a time) in {workdir}",
    flush=True,
  )
  report = _reporter(runs)
  for run in runs:
    if run not in todo:
      report(run, execute.Outcome(run.id, "skipped", "finished before"))
  start = time.time()
  try:
    if args.launcher == "local":
      outcomes = launch.run_local(todo, workdir, args.parallel, report)
    else:
      options = dict(vars(args), cluster=args.submitit_cluster)
      outcomes = launch.run_submitit(todo, workdir, options, report)
  except launch.Interrupted as stop:
    print(f"{stop.name}: stopped; the running stages saved. Rerun the same command to resume.")
    return 130 if stop.name == "SIGINT" else 143
  # "skipped": another runner on this workdir finished the run while this one waited for it.
  failed = [o for o in outcomes if o.status not in ("finished", "skipped")]
  by_others = sum(o.status == "skipped" for o in outcomes)
  print(
    f"{len(outcomes) - len(failed) - by_others} run(s) finished in "
    f"{(time.time() - start) / 60:.1f} min"
    + (f", {by_others} by another runner on this workdir" if by_others else "")
  )
  if failed:
    print(f"{len(failed)} run(s) did not finish (see runs/<id>/log.txt); rerun to retry them.")
    _write_tables(sweep, runs, workdir, command, partial=True)
    return 1
  _write_tables(sweep, runs, workdir, command, partial=False)
  return 0


if __name__ == "__main__":
  sys.exit(main())
