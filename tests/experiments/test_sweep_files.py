"""Sweep files without training: hyper's product / zip, run ids, the shipped sweeps, the
statistics, and the runner's user errors (one `error:` line, exit status 2)."""

import math

import pytest

from experiments.sweeps import execute, hyper, results, run, spec


def test_product_and_zip_combine_points_like_big_vision():
  points = hyper.product(
    [
      hyper.zip([hyper.sweep("train.lr", [1, 2]), hyper.sweep("train.steps", [10, 20])]),
      hyper.sweep("seed", [0, 1, 2]),
    ]
  )
  assert len(points) == 6 and points[0] == {"train.lr": 1, "train.steps": 10, "seed": 0}
  assert [p["seed"] for p in points[:3]] == [0, 1, 2]  # seeds vary fastest
  with pytest.raises(hyper.SweepError, match="different lengths"):
    hyper.zip([hyper.sweep("a", [1, 2]), hyper.sweep("b", [1])])
  with pytest.raises(hyper.SweepError, match="set twice"):
    hyper.product([hyper.fixed("a", 1), hyper.fixed("a", 2)])


def test_run_ids_hash_the_overrides_and_stages():
  stages = (spec.Train("train", "configs/base.py"),)
  a = spec.Run({"train.lr": 1e-3, "seed": 0}, stages)
  assert a.id == spec.Run({"seed": 0, "train.lr": 1e-3}, stages).id  # key order: same run
  assert a.id != spec.Run({"train.lr": 1e-3, "seed": 1}, stages).id
  assert a.id != spec.Run(a.overrides, (spec.Train("train", "configs/moe_base.py"),)).id
  assert a.configuration == spec.Run({"train.lr": 1e-3, "seed": 1}, stages).configuration
  assert spec.Run.from_dict(a.to_dict()) == a


def test_an_eval_stage_of_another_split_reads_its_own_metrics_file():
  validation, unseen = spec.Eval("e", of="train"), spec.Eval("u", of="train", split="unseen")
  assert (validation.metrics_file, unseen.metrics_file) == (
    "eval_metrics.json",
    "eval_metrics_unseen.json",
  )
  stages = (spec.Train("train", "configs/base.py"), validation, unseen)
  run_ = spec.Run({"seed": 0}, stages)
  assert execute.command(run_, unseen, "/r")[-1] == "--split=unseen"
  assert "--split=validation" not in execute.command(run_, validation, "/r")
  # The default split is left out of the stage's record: run ids from before it stay.
  assert "split" not in spec.stage_dict(validation)
  assert spec.Run.from_dict(run_.to_dict()) == run_


@pytest.mark.parametrize(
  "name, runs, configurations",
  [
    ("base_seeds", 3, 1),
    ("vqa_seeds", 3, 1),
    ("vqa_seeds_encoder_decoder", 3, 1),
    ("lr_warmup_grid", 18, 9),
  ],
)
def test_shipped_sweeps_load(name, runs, configurations):
  sweep = spec.load(f"experiments/sweeps/{name}.py")
  assert len(sweep.runs) == runs
  assert len({r.configuration for r in sweep.runs}) == configurations
  assert all(r.seed is not None for r in sweep.runs)


def test_summary_statistics():
  s = results.summarize([1.0, 2.0, 3.0])
  assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == 1.0
  half = 4.302652729749464 / math.sqrt(3)  # Student's t, 2 degrees of freedom, 97.5%
  assert s["ci95_low"] == pytest.approx(2.0 - half) and s["ci95_high"] == pytest.approx(2.0 + half)
  assert math.isnan(results.summarize([1.0])["std"])


BAD_SWEEP = "def get_hyper(hyper):\n  return hyper.sweep('seed', [0])\n"  # no CONFIG nor STAGES


@pytest.mark.parametrize(
  "args, message",
  [
    (["missing_sweep.py", "--workdir=W"], "no such sweep file: missing_sweep.py"),
    (["experiments/sweeps/base_seeds.py"], "the following arguments are required: --workdir"),
    (["experiments/sweeps/base_seeds.py", "--workdir=W", "--parallel=0"], "--parallel=0"),
    (["experiments/sweeps/base_seeds.py", "--workdir=W", "--set", "train.lrr=1"], "train.lr'?"),
    (["experiments/sweeps/base_seeds.py", "--workdir=W", "--set", "train.steps=x"], "bad value"),
    (["experiments/sweeps/base_seeds.py", "--workdir=W", "--set", "oops"], "KEY=VALUE"),
    (["BAD", "--workdir=W"], "defines neither STAGES nor CONFIG"),
  ],
)
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
  bad = tmp_path / "bad.py"
  bad.write_text(BAD_SWEEP)
  args = [str(bad) if a == "BAD" else a.replace("=W", f"={tmp_path / 'w'}") for a in args]
  with pytest.raises(SystemExit) as stop:
    run.main(args)
  err = capsys.readouterr().err.strip()
  assert stop.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
  assert message in err


def test_a_set_of_a_key_the_sweep_varies_names_the_set(capsys):
  with pytest.raises(SystemExit) as stop:
    run.main(
      ["experiments/sweeps/lr_warmup_grid.py", "--workdir=/nonexistent", "--set", "train.lr=0.01"]
    )
  err = capsys.readouterr().err.strip()
  assert stop.value.code == 2 and "\n" not in err, err
  assert err.startswith("error: --set train.lr=0.01 fixes a key the sweep varies"), err
  assert "0.001, 0.002, 0.004" in err
  # A key every run shares may be replaced (the docs' `--set train.steps=100`).
  sweep = spec.load("experiments/sweeps/lr_warmup_grid.py", {"train.steps": 100})
  assert len(sweep.runs) == 18 and {r.overrides["train.steps"] for r in sweep.runs} == {100}


ONE_RUN_SWEEP = """CONFIG = "configs/base.py:runlocal"


def get_hyper(hyper):
  return hyper.sweep("seed", [0])
"""


def test_a_run_finished_by_another_runner_is_no_failure(tmp_path, capsys):
  """Two runners on one workdir: the second finds the run unfinished, waits for the first's
  lock, and finds it finished; it exits 0 and writes the tables."""
  import fcntl
  import json
  import os
  import threading
  import time

  from experiments.sweeps import execute

  sweep_file = tmp_path / "one.py"
  sweep_file.write_text(ONE_RUN_SWEEP)
  workdir = tmp_path / "sweep"
  (the_run,) = spec.load(str(sweep_file)).runs
  directory = execute.run_dir(str(workdir), the_run)
  os.makedirs(os.path.join(directory, "train"))
  lock = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT)
  fcntl.flock(lock, fcntl.LOCK_EX)  # the other runner, at work on the run

  def other_runner_finishes():
    log = os.path.join(directory, "log.txt")
    deadline = time.time() + 60
    while "waiting for an earlier process" not in (open(log).read() if os.path.exists(log) else ""):
      assert time.time() < deadline
      time.sleep(0.02)
    with open(os.path.join(directory, "train", "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 20, "loss": 1.5}) + "\n")
    record = {**the_run.to_dict(), "seed": 0, "configuration": the_run.configuration}
    record.update(metrics={"train/loss": 1.5}, configs={}, finished_at=time.time())
    execute.write_json_atomically(os.path.join(directory, execute.FINISHED), record)
    os.close(lock)

  other = threading.Thread(target=other_runner_finishes)
  other.start()
  try:
    code = run.main([str(sweep_file), f"--workdir={workdir}"])
  finally:
    other.join()
  out = capsys.readouterr().out
  assert code == 0, out
  assert "did not finish" not in out and "skipped: finished before" in out, out
  assert os.path.exists(workdir / "results.csv")
