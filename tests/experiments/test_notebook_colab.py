"""The notebooks as Colab opens them: alone, from a link, in a runtime that has its own Jupyter
packages. Each has an "Open in Colab" badge, clones the repository from one `REPO_URL`
(nothing to do inside a checkout), installs only what it needs beyond requirements.txt, and
the two that train ask for a TPU runtime. Read from the files, nothing run (running them is
tests/experiments/test_notebooks.py)."""

import os
import re

import jupytext
import nbformat
import pytest

from experiments.notebooks import helpers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(REPO, "experiments", "notebooks")
NAMES = ("quickstart", "finetune_your_data", "pod_scale")
ON_TPU = {"quickstart": True, "finetune_your_data": True, "pod_scale": False}  # pod_scale: CPU


def _both(name):
  """The .ipynb and its .py twin."""
  return (
    nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4),
    jupytext.read(os.path.join(NOTEBOOKS, f"{name}.py")),
  )


def _code(notebook) -> str:
  return "\n".join(c.source for c in notebook.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NAMES)
def test_an_open_in_colab_badge_opens_this_notebook(name):
  for notebook in _both(name):
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    badge = re.search(r"\[!\[Open In Colab\]\(([^)]+)\)\]\(([^)]+)\)", first.source)
    assert badge, first.source[:300]
    assert badge.group(1) == "https://colab.research.google.com/assets/colab-badge.svg"
    assert badge.group(2).startswith("https://colab.research.google.com/github/")
    assert badge.group(2).endswith(f"/blob/main/experiments/notebooks/{name}.ipynb")


@pytest.mark.parametrize("name", NAMES)
def test_the_accelerator_colab_gives_it(name):
  for notebook in _both(name):
    assert (notebook.metadata.get("accelerator") == "TPU") == ON_TPU[name], notebook.metadata


@pytest.mark.parametrize("name", NAMES)
def test_one_repo_url_cloned_only_outside_a_checkout(name):
  ipynb, _ = _both(name)
  parameters = next(c for c in ipynb.cells if "parameters" in c.metadata.get("tags", []))
  assert re.search(r'^REPO_URL = "https://', parameters.source, flags=re.M)
  code = _code(ipynb)
  assert code.count("REPO_URL = ") == 1
  cells = [c.source for c in ipynb.cells if c.cell_type == "code"]
  clones = [i for i, source in enumerate(cells) if re.search(r"\"git\", \"clone\"", source)]
  assert clones == [1], "one clone cell, right after the parameters"
  assert "REPO_URL" in cells[1] and "if REPO is None:" in cells[1]  # find_repo() first


@pytest.mark.parametrize("name", NAMES)
def test_it_installs_only_what_it_needs_beyond_requirements_txt(name):
  """requirements-experiments.txt would replace Colab's ipykernel, jupyter-client and tornado
  inside the running kernel; the notebooks need matplotlib from it, and nothing else."""
  code = _code(_both(name)[0])
  assert "requirements-experiments.txt" not in code
  assert "pip" in code and "requirements.txt" in code
  assert ('helpers.pins("matplotlib")' in code) == (name != "pod_scale")  # pod_scale: no plot


def test_pins_reads_the_experiments_pins():
  (matplotlib,) = helpers.pins("matplotlib")
  assert re.fullmatch(r"matplotlib==[\d.]+", matplotlib)
  with pytest.raises(KeyError):
    helpers.pins("ipykernel-not-a-pin")
