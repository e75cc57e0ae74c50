"""A sweep file, read into runs: stages, overrides, run ids, and the checks that a sweep can
run at all (known config keys, values of the right type) before anything is started.

A sweep file defines
  get_hyper(hyper) -> list of points           (required; see hyper.py)
  CONFIG = "configs/base.py"                    (the config of the one stage "train"), or
  STAGES = (Train(...), Train(...), Eval(...))  (several stages run one after the other)
  METRICS = ("eval/vqa_accuracy", ...)          (optional: the headline metrics of results.md
                                                 and the final-metric plot)
  CURVE = "loss"                                (optional: the metrics.jsonl key plotted)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import re
from typing import Any, Mapping

from experiments.sweeps import hyper as hyper_lib
from experiments.sweeps.hyper import SweepError

SEED = "seed"
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Train:
  """`python -m m6_jax.main --config=<config> --workdir=<run>/<name> --config.<k>=<v>...`;
  `init_from` names an earlier stage whose workdir initialises this one (fine-tuning)."""

  name: str
  config: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  init_from: str = ""


@dataclasses.dataclass(frozen=True)
class Eval:
  """`python -m m6_jax.main --mode=eval --workdir=<run>/<of> [--split=<split>] <args>`:
  held-out metrics of the train stage `of` (eval_metrics.json in its workdir, or
  eval_metrics_<split>.json for another split than the validation split)."""

  name: str
  of: str
  args: tuple[str, ...] = ()
  split: str = "validation"

  @property
  def metrics_file(self) -> str:
    return "eval_metrics.json" if self.split == "validation" else f"eval_metrics_{self.split}.json"


Stage = Train | Eval


def stage_dict(stage: Stage) -> dict[str, Any]:
  d = {"kind": type(stage).__name__.lower(), **dataclasses.asdict(stage)}
  if d.get("split") == "validation":  # the default: run ids of sweeps from before it stay
    del d["split"]
  return d


def stage_from_dict(d: Mapping[str, Any]) -> Stage:
  d = dict(d)
  kind = d.pop("kind")
  if kind == "eval":
    d["args"] = tuple(d["args"])
  return {"train": Train, "eval": Eval}[kind](**d)


@dataclasses.dataclass(frozen=True)
class Run:
  """One run: its stages and overrides (a point of the sweep plus the runner's --set)."""

  overrides: Mapping[str, Any]
  stages: tuple[Stage, ...]

  @property
  def id(self) -> str:
    """A hash of everything that decides what the run computes: its overrides (seed
    included) and its stages (config files, their fixed overrides and eval flags). So a
    restarted sweep finds its runs again, and an edited sweep file gets new runs instead of
    reusing results that no longer match it."""
    return _hash(
      {"overrides": dict(self.overrides), "stages": [stage_dict(s) for s in self.stages]}
    )

  @property
  def seed(self) -> Any:
    return self.overrides.get(SEED)

  @property
  def configuration(self) -> str:
    """The run's overrides without the seed: runs that share it are averaged over seeds."""
    items = sorted((k, v) for k, v in self.overrides.items() if k != SEED)
    return " ".join(f"{k}={format_value(v)}" for k, v in items) or "(sweep defaults)"

  def stage_overrides(self, stage: Train) -> dict[str, Any]:
    """The stage's fixed overrides, then the run's (plain keys for every train stage,
    `<stage>:<key>` for this one)."""
    out = dict(stage.overrides)
    for key, value in self.overrides.items():
      name, _, plain = key.rpartition(":")
      if not name or name == stage.name:
        out[plain] = value
    return out

  def to_dict(self) -> dict[str, Any]:
    return {
      "id": self.id,
      "overrides": dict(self.overrides),
      "stages": [stage_dict(s) for s in self.stages],
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Run":
    return cls(dict(d["overrides"]), tuple(stage_from_dict(s) for s in d["stages"]))


@dataclasses.dataclass(frozen=True)
class Sweep:
  path: str
  runs: tuple[Run, ...]
  metrics: tuple[str, ...]
  curve: str

  @property
  def name(self) -> str:
    return os.path.splitext(os.path.basename(self.path))[0]


def _hash(obj: Any) -> str:
  text = json.dumps(obj, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def format_value(value: Any) -> str:
  """A value as `--config.<key>=` takes it."""
  if isinstance(value, bool):
    return "true" if value else "false"
  return repr(value) if isinstance(value, (float, tuple, list)) else str(value)


def parse_value(text: str) -> Any:
  """`--set key=VALUE`: a number, true/false, or else the text itself."""
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _load_module(path: str):
  if not os.path.isfile(path):
    raise SweepError(f"no such sweep file: {path}")
  spec = importlib.util.spec_from_file_location(f"_m6_sweep_{_hash(os.path.abspath(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 (any error in a user's file is reported in one line)
    raise SweepError(f"sweep file {path} failed to load: {type(e).__name__}: {e}") from e
  return module


def _stages(module, path: str) -> tuple[Stage, ...]:
  stages = getattr(module, "STAGES", None)
  if stages is None:
    config = getattr(module, "CONFIG", None)
    if not isinstance(config, str):
      raise SweepError(f"sweep file {path} defines neither STAGES nor CONFIG (a config file)")
    stages = (Train("train", config),)
  stages = tuple(stages)
  if not stages or not all(isinstance(s, (Train, Eval)) for s in stages):
    raise SweepError(f"sweep file {path}: STAGES must be a non-empty tuple of Train / Eval")
  names: list[str] = []
  for s in stages:
    if not _STAGE_NAME.match(s.name) or s.name in names:
      raise SweepError(f"sweep file {path}: stage name {s.name!r} is not a unique [a-z0-9_] name")
    earlier = getattr(s, "of", None) or getattr(s, "init_from", None)
    trains = [t.name for t in stages[: len(names)] if isinstance(t, Train)]
    if earlier and earlier not in trains:
      raise SweepError(
        f"sweep file {path}: stage {s.name!r} refers to {earlier!r}, which is not an earlier "
        f"train stage ({', '.join(trains) or 'none'})"
      )
    names.append(s.name)
  evaluated = [(s.of, s.split) for s in stages if isinstance(s, Eval)]
  if len(set(evaluated)) != len(evaluated):  # each writes <of>/<its metrics_file>
    raise SweepError(f"sweep file {path}: two eval stages of one train stage on one split")
  return stages


def load(path: str, extra: Mapping[str, Any] | None = None) -> Sweep:
  """The sweep file's runs, with `extra` overrides (the runner's --set) added to each; every
  run's config is built here once, so a bad key or value fails before any run starts."""
  module = _load_module(path)
  get_hyper = getattr(module, "get_hyper", None)
  if not callable(get_hyper):
    raise SweepError(f"sweep file {path} has no get_hyper(hyper) function")
  stages = _stages(module, path)
  try:
    points = get_hyper(hyper_lib)
  except SweepError:
    raise
  except Exception as e:  # noqa: BLE001
    raise SweepError(f"get_hyper of {path} failed: {type(e).__name__}: {e}") from e
  if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
    raise SweepError(f"get_hyper of {path} must return a non-empty list of points (dicts)")
  _check_extra(points, extra or {})
  runs = tuple(Run({**p, **(extra or {})}, stages) for p in points)
  ids = [r.id for r in runs]
  if len(set(ids)) != len(ids):
    raise SweepError(f"sweep file {path} gives the same run more than once")
  stage_names = {s.name for s in stages}
  for run in runs:
    for key in run.overrides:
      prefix = key.rpartition(":")[0]
      if prefix and prefix not in stage_names:
        raise SweepError(f"override {key!r}: no stage {prefix!r} (stages: {sorted(stage_names)})")
    for stage in stages:
      if isinstance(stage, Train):
        check_overrides(stage.config, run.stage_overrides(stage), f"stage {stage.name!r}")
  last_train = [s.name for s in stages if isinstance(s, Train)][-1]
  metrics = tuple(getattr(module, "METRICS", (f"{last_train}/loss",)))
  return Sweep(path, runs, metrics, str(getattr(module, "CURVE", "loss")))


def _check_extra(points: list[dict], extra: Mapping[str, Any]) -> None:
  """An extra override (--set) may replace a key every point shares, not one the sweep varies:
  that would collapse the sweep's runs into one."""
  for key, value in extra.items():
    values = list(dict.fromkeys(format_value(p[key]) if key in p else "(default)" for p in points))
    if len(values) > 1:
      raise SweepError(
        f"--set {key}={format_value(value)} fixes a key the sweep varies ({key}: "
        f"{', '.join(values)}); leave out the --set, or edit the sweep file"
      )


_CONFIGS: dict[str, Any] = {}


def _base_config(config: str):
  """get_config(variant) of a config file (`configs/x.py[:variant]`), loaded once."""
  if config not in _CONFIGS:
    path, _, variant = config.partition(":")
    if not os.path.isfile(path):
      raise SweepError(f"no such config file: {path}")
    spec = importlib.util.spec_from_file_location(f"_m6_config_{_hash(path)}", path)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
      _CONFIGS[config] = module.get_config(variant or None)
    except Exception as e:  # noqa: BLE001
      raise SweepError(f"config {config} failed to load: {type(e).__name__}: {e}") from e
  return _CONFIGS[config]


def check_overrides(config: str, overrides: Mapping[str, Any], where: str) -> None:
  """Raises SweepError unless every key exists in `config` and takes its value's type (the
  config's ConfigDict type checks do the latter)."""
  cfg = _base_config(config).copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
      if part not in node or not hasattr(node[part], "keys"):
        node = None
        break
      node = node[part]
    if node is None or leaf not in node:
      known = _flat_keys(cfg)
      close = difflib.get_close_matches(key, known, n=1)
      hint = f"; did you mean '{close[0]}'?" if close else ""
      raise SweepError(f"unknown config key '{key}' ({where}, {config}){hint}")
    try:
      setattr(node, leaf, value)
    except (TypeError, ValueError) as e:
      raise SweepError(f"bad value {value!r} for '{key}' ({where}, {config}): {e}") from e


def _flat_keys(cfg, prefix: str = "") -> list[str]:
  out = []
  for k, v in cfg.items():
    out += _flat_keys(v, f"{prefix}{k}.") if hasattr(v, "keys") else [f"{prefix}{k}"]
  return out
