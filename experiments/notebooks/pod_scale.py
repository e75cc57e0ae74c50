# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # M6 in JAX: pod scale
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/m6-jax/blob/main/experiments/notebooks/pod_scale.ipynb)
#
# 1. **Ahead-of-time report** for a paper config on a TPU topology: the real train step,
#    compiled by libtpu's compiler on this machine's CPU (no TPU needed), with its memory per
#    chip, FLOPs, collectives and an MFU estimate (`--mode=aot`, `m6_jax/aot/report.py`).
# 2. **Sharding** of a tiny model over 8 devices (a 2 x 2 x 2 data x fsdp x tensor mesh),
#    simulated on the CPU: which slice of each parameter every device holds.
#
# Everything here runs on the CPU, so the notebook asks Colab for no accelerator. On Colab,
# set `REPO_URL` below to the repository's git URL (replace `YOUR_ORG` in it and in the
# badge's link): the first cell clones it.

# %% tags=["parameters"]
# Parameters (the test suite runs this notebook with small values: tests/experiments/).
REPO_URL = "https://github.com/YOUR_ORG/m6-jax.git"  # cloned on Colab; unused in a checkout
INSTALL = True  # pip install the pinned requirements (and libtpu's compiler) from the checkout
AOT_CONFIG = "configs/m6_base.py"  # a paper config: m6_base, m6_large, m6_10b, m6_100b, ...
AOT_TOPOLOGY = ""  # e.g. "v5p:4x4x4"; "" = the config file's TOPOLOGY
AOT_OVERRIDES = {}  # config overrides for the AOT compile, e.g. {"data.batch_size": 256}
WORKDIR = "/tmp/m6_pod_scale"
SHARDING_OVERRIDES = {}  # overrides of the tiny model of the sharding demo

# %%
# The checkout: the one this notebook lives in (experiments/notebooks/), else a clone of
# REPO_URL in /content/m6-jax (Colab opens the notebook alone). It becomes the working
# directory (config paths are relative to it) and importable.
import os
import subprocess
import sys


def find_repo():
  for start in (os.getcwd(), "/content/m6-jax"):
    path = os.path.abspath(start)
    while os.path.dirname(path) != path:
      if os.path.isfile(os.path.join(path, "m6_jax", "main.py")):
        return path
      path = os.path.dirname(path)
  return None


REPO = find_repo()
if REPO is None:
  if "YOUR_ORG" in REPO_URL:
    raise ValueError("set REPO_URL (the parameters cell) to the m6-jax repository's git URL")
  subprocess.run(["git", "clone", "--depth=1", REPO_URL, "/content/m6-jax"], check=True)
  REPO = find_repo()
os.chdir(REPO)
if REPO not in sys.path:
  sys.path.insert(0, REPO)
print(f"the checkout: {REPO}")

# %%
# Install the pinned requirements with libtpu's compiler (requirements-aot.txt); the
# runtime's own Jupyter packages stay as they are. Then the set-up every notebook shares
# (quiet library logging). JAX runs on 8 simulated CPU devices: set before JAX starts.
from experiments.notebooks import helpers

if INSTALL:
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"]
    + ["-r", "requirements-aot.txt"],
    check=True,
  )
helpers.setup()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
import jax

print(jax.devices())

# %% [markdown]
# ## Ahead-of-time compile for a TPU topology
# The command-line form is
# `python -m m6_jax.main --mode=aot --config=configs/m6_base.py --aot_output=aot.json`
# (`python benchmarks/aot_table.py` does every paper config: `docs/performance.md`).
# It runs in a subprocess, where JAX sees the TPU topology instead of the 8 CPU devices.

# %%
import json

aot_json = os.path.join(WORKDIR, "aot.json")
command = [sys.executable, "-m", "m6_jax.main", "--mode=aot", f"--config={AOT_CONFIG}"]
command += [f"--aot_output={aot_json}"] + ([f"--topology={AOT_TOPOLOGY}"] if AOT_TOPOLOGY else [])
command += [f"--config.{k}={v}" for k, v in AOT_OVERRIDES.items()]
env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
done = subprocess.run(command, env=env, capture_output=True, text=True)
print(done.stdout)
assert done.returncode == 0, done.stderr[-3000:]
with open(aot_json) as f:
  report = json.load(f)
memory, flops, roofline = (
  report["memory_per_chip_gib"],
  report["flops_per_step"],
  report["roofline"],
)
helpers.markdown_table(
  [
    {
      "": "topology",
      "value": f"{report['topology']} ({report['chips']} x {report['device_kind']})",
    },
    {"": "parameters", "value": f"{report['params']:,}"},
    {"": "memory per chip (GiB)", "value": f"{memory['total']:.2f} of {memory['hbm']}"},
    {"": "fits", "value": "yes" if memory["fits"] else "NO"},
    {"": "model FLOPs per step", "value": f"{flops['model_analytic_total']:.3e}"},
    {"": "compiled FLOPs per chip", "value": f"{flops['compiled_per_chip']:.3e}"},
    {"": "MFU estimate (no overlap)", "value": f"{100 * roofline['mfu_estimate']:.1f}%"},
    {"": "MFU upper bound (overlap)", "value": f"{100 * roofline['mfu_upper_bound']:.1f}%"},
  ]
  + [
    {
      "": f"{kind} (count / GB per chip)",
      "value": f"{n} / {report['collective_bytes_per_chip'][kind] / 1e9:.2f}",
    }
    for kind, n in report["collectives"].items()
  ]
)

# %% [markdown]
# ## A tiny model sharded over 8 devices
# The base model on a data=2 x fsdp=2 x tensor=2 mesh: parameters are split over `fsdp`
# along their embedding axis and over `tensor` along heads / mlp / vocab (logical axis
# rules, `m6_jax/parallel/axes.py`), replicated over `data`. The state is initialised
# straight into these shardings.

# %%
from m6_jax import config as config_lib
from m6_jax.train import setup as setup_lib

config = helpers.load_config("configs/base.py", {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
helpers.apply_overrides(config, SHARDING_OVERRIDES)
config_lib.validate(config, jax.device_count())
setup = setup_lib.build(config)
state = setup.init_state()
rows = []
for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
  name = "/".join(str(getattr(p, "key", p)) for p in path)
  shard = leaf.addressable_shards[0].data.shape
  rows.append(
    {"parameter": name, "shape": leaf.shape, "spec": leaf.sharding.spec, "per device": shard}
  )
print(f"mesh {dict(setup.mesh.shape)}; {len(rows)} parameter arrays")
helpers.markdown_table(rows[:12])

# %%
# Which block of one 2-D parameter each device holds (rows x columns of the matrix).
array = next(leaf for leaf in jax.tree.leaves(state.params) if leaf.ndim == 2)
for device, index in sorted(
  array.sharding.devices_indices_map(array.shape).items(), key=lambda kv: kv[0].id
):
  blocks = ", ".join(f"{s.start or 0}:{s.stop or n}" for s, n in zip(index, array.shape))
  print(f"device {device.id}: [{blocks}]")
total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state.params))
per_device = sum(
  s.data.nbytes
  for leaf in jax.tree.leaves(state.params)
  for s in leaf.addressable_shards
  if s.device == jax.devices()[0]
)
print(f"parameters: {total / 2**20:.2f} MiB in all, {per_device / 2**20:.2f} MiB on device 0")
