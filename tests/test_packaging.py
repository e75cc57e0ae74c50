"""The package as `pip install .` makes it: its pins are requirements.txt's, each extra's
are its requirements file's, and the installed `m6-jax` command is the program."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# extra -> the requirements file holding its pins
EXTRA_FILES = {
  "tpu": "requirements-tpu.txt",
  "aot": "requirements-aot.txt",
  "experiments": "requirements-experiments.txt",
  "ofa": "requirements-ofa.txt",
  "bench": "requirements-bench.txt",
}


def _pins(name: str) -> set[str]:
  """The requirement lines of a requirements file, without comments and `-r` includes."""
  lines = (l.split("#", 1)[0].strip() for l in (REPO / name).read_text().splitlines())
  return {l for l in lines if l and not l.startswith("-r")}


def test_dependencies_are_the_pins_of_requirements_txt():
  assert set(PROJECT["dependencies"]) == _pins("requirements.txt")
  assert all(re.search(r"==", d) for d in PROJECT["dependencies"]), "pin every dependency"


@pytest.mark.parametrize("extra", sorted(EXTRA_FILES))
def test_each_extra_is_its_requirements_file(extra):
  assert set(PROJECT["optional-dependencies"][extra]) == _pins(EXTRA_FILES[extra])


def test_the_test_extra_is_what_the_readme_test_command_installs():
  """requirements-test.txt = requirements.txt + aot + experiments + ofa + the test tools."""
  text = (REPO / "requirements-test.txt").read_text()
  included = set(re.findall(r"^-r (\S+)", text, flags=re.M))
  assert included == {"requirements.txt", *(EXTRA_FILES[e] for e in ("aot", "experiments", "ofa"))}
  test = PROJECT["optional-dependencies"]["test"]
  assert set(test) == {"m6-jax[aot,experiments,ofa]", *_pins("requirements-test.txt")}


@pytest.mark.slow
def test_pip_install_gives_the_m6_jax_command(tmp_path):
  """`pip install .` (dependencies from this environment) installs every subpackage, the
  package data, and an `m6-jax` command that runs the program."""
  venv = tmp_path / "venv"
  subprocess.run(
    [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
  )
  # A copy of what the package is built from, so that the build writes nothing in the checkout.
  source = tmp_path / "source"
  shutil.copytree(REPO / "m6_jax", source / "m6_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  # This environment's pip and setuptools build and install into the venv: nothing downloaded.
  pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
  subprocess.run(
    [*pip, "--no-deps", "--no-build-isolation", str(source)], check=True, cwd=tmp_path, timeout=300
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

  def installed(program, *args):
    """A program of the venv, run outside the repository: the installed package, not the
    source tree."""
    return subprocess.run(
      [str(venv / "bin" / program), *args],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )

  out = installed("m6-jax", "--mode=export_world", "--helpshort")
  assert out.returncode == 0, out.stderr
  assert "--output_dir" in out.stdout and "--mode" in out.stdout
  run = installed(
    "m6-jax",
    "--mode=export_world",
    f"--output_dir={tmp_path / 'w'}",
    "--num_train=2",
    "--num_validation=1",
    "--nohuge_pages",
  )
  assert run.returncode == 0, run.stderr
  assert (tmp_path / "w" / "train.jsonl").read_text().count("\n") == 2
  # Package data: the CJK font subset (with its license) that draws Chinese prompts.
  font = installed("python", "-c", "from m6_jax.infer import fonts; print(fonts.CJK_SUBSET)")
  assert font.returncode == 0, font.stderr
  installed = pathlib.Path(font.stdout.strip())
  assert str(venv) in str(installed) and installed.is_file()
  assert (installed.parent / "OFL.txt").is_file() and (
    installed.parent / "characters.txt"
  ).is_file()
