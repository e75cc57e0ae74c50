"""The Colab notebooks: each .ipynb is the twin of its jupytext .py (same cells), is saved
without outputs, and runs top to bottom on CPU in small form.

Executed with nbclient: it runs the saved .ipynb in a real Jupyter kernel, as Colab does, and
raises on the first cell error. Small form: a cell after the one tagged `parameters` sets
small values, as papermill injects parameters, in a few lines here instead of papermill's
extra dependencies (and its own notebook rewriting) for that one feature.
"""

import json
import os

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from testing_utils import TINY_RUN, cpu_env

# Multi-process / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(REPO, "experiments", "notebooks")
NAMES = ("quickstart", "finetune_your_data", "pod_scale")
# A tiny model and a tokenizer trained once per session (tests/conftest.py).
TINY = {
  **TINY_RUN,
  "data.length_bucket": 0,
  "train.log_every": 2,
}


def _cells(notebook):
  return [(c.cell_type, c.source.strip()) for c in notebook.cells]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_pairs_are_in_sync_and_saved_without_outputs(name):
  ipynb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  script = jupytext.read(os.path.join(NOTEBOOKS, f"{name}.py"))
  assert _cells(ipynb) == _cells(script), (
    f"run: jupytext --to ipynb experiments/notebooks/{name}.py"
  )
  for cell in ipynb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
  assert any("parameters" in c.metadata.get("tags", []) for c in ipynb.cells)
  # The TPU set-up helper that no longer exists must never be called.
  assert "colab_tpu" not in "".join(source for _, source in _cells(script))


def _execute(name, parameters, devices=1, timeout=300):
  notebook = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  at = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
  source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
  notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(source))
  client = NotebookClient(
    notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
  )
  client.execute(env=cpu_env(devices))  # raises CellExecutionError on a failing cell
  return notebook


def _text(notebook):
  out = []
  for cell in notebook.cells:
    for o in cell.get("outputs", []):
      data = o.get("data", {})
      out.append(o.get("text", "") + data.get("text/markdown", data.get("text/plain", "")))
  return "\n".join(out)


def _images(notebook):
  return sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))


def _assert_quiet(text):
  """No checkpoint-library INFO lines (the command line's filter) and no missing glyphs."""
  noisy = [l for l in text.splitlines() if "orbax" in l.lower() or "CheckpointManager" in l]
  assert not noisy, noisy[:5]
  assert "missing from font" not in text


def test_quickstart_then_finetune_your_data_from_its_workdir(tmp_path, tokenizer_path):
  """One test: the fine-tune starts from the quickstart's workdir (init_from), as a user
  running both would."""
  overrides = {**TINY, "data.tokenizer_path": tokenizer_path}
  pretrained = str(tmp_path / "quickstart")
  nb = _execute(
    "quickstart",
    {"INSTALL": False, "WORKDIR": pretrained, "STEPS": 4, "OVERRIDES": overrides, "NUM_SCENES": 2},
  )
  text = _text(nb)
  assert "CpuDevice" in text and "No TPU here: running on CPU" in text
  assert "finished at step 4" in text
  assert f"the checkout: {REPO}" in text  # found, not cloned
  assert _images(nb) == 3  # the loss curves, the captioned scenes, the text-to-image grids
  _assert_quiet(text)

  parameters = {
    "INSTALL": False,
    "DATA": str(tmp_path / "data"),
    "WORKDIR": str(tmp_path / "finetune"),
    "PRETRAINED": pretrained,
    "NUM_IMAGES": 12,
    "STEPS": 4,
    "OVERRIDES": overrides,
    "NUM_SHOWN": 2,
  }
  nb = _execute("finetune_your_data", parameters)
  text = _text(nb)
  assert "VQA accuracy (held-out)" in text and "caption BLEU-4" in text
  assert os.path.isdir(tmp_path / "data" / "tfds" / "my_data")
  assert _images(nb) == 2  # the fine-tuning curves and the predictions
  _assert_quiet(text)
  with open(tmp_path / "finetune" / "config.json") as f:
    saved = f.read()
  assert saved.count(pretrained) == 1  # init_from
  train = json.loads(saved)["train"]
  assert 0 < train["warmup_steps"] < train["steps"] == 4  # the learning rate peaks in the run


def test_pod_scale(tmp_path):
  tiny_model = {k: v for k, v in TINY.items() if k.startswith(("model.", "data."))}
  parameters = {
    "INSTALL": False,
    "AOT_CONFIG": "configs/base.py",  # a paper config takes minutes to compile
    "AOT_TOPOLOGY": "v5e:2x2",
    "AOT_OVERRIDES": tiny_model,
    "WORKDIR": str(tmp_path),
    "SHARDING_OVERRIDES": tiny_model,
  }
  text = _text(_execute("pod_scale", parameters))
  _assert_quiet(text)
  assert "v5e:2x2 (4 x TPU v5 lite)" in text and "MFU estimate" in text
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2" in text
  assert "device 7: [" in text
