"""The documentation holds together: every relative link resolves, every flag of every mode is
in docs/cli.md, the README keeps the two set-up commands that CI runs, and the results kept
under docs/ and experiments/ name no directory of the machine that made them.

The flags come from `python -m m6_jax.main --mode=<mode> --helpfull` in a subprocess, one per
mode: each mode module defines absl flags, and two of them define flags of the same name
(--seed), so no mode module is imported here."""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from m6_jax.main import MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_DOC = os.path.join(ROOT, "docs", "cli.md")
SETUP_COMMANDS = (
  "pip install -r requirements.txt && python -m m6_jax.main --config=configs/base.py "
  "--workdir=/tmp/m6_base",
  "pip install -r requirements-test.txt && python -m pytest -n 2 tests",
)


def doc_files() -> list[str]:
  """README.md, docs/**/*.md and experiments/README.md. Left out: the copies of sweep
  results under docs/sweeps/, whose `runs/` links point into the sweep's own workdir (their
  header says so)."""
  files = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "experiments", "README.md")]
  for path in sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)):
    if not os.path.relpath(path, ROOT).startswith(os.path.join("docs", "sweeps") + os.sep):
      files.append(path)
  return files


def _prose(text: str) -> str:
  """The text without fenced code blocks and inline code, where brackets are not links."""
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", text)


# [text](target) and ![alt](target); the target ends at whitespace or the closing bracket.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return LINK.findall(_prose(f.read()))


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, code marks and punctuation dropped, spaces to
  hyphens."""
  text = heading.strip().lower().replace("`", "")
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


@functools.cache
def anchors(path: str) -> frozenset[str]:
  with open(path, encoding="utf-8") as f:
    text = re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)
  seen: dict[str, int] = {}
  result = set()
  for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
    base = slug(heading)
    count = seen.get(base, 0)
    seen[base] = count + 1
    result.add(base if count == 0 else f"{base}-{count}")
  return frozenset(result)


def test_doc_files_exist():
  for path in doc_files():
    assert os.path.isfile(path), f"{os.path.relpath(path, ROOT)} is missing"


@pytest.mark.parametrize("doc", [os.path.relpath(p, ROOT) for p in doc_files()])
def test_relative_links_resolve(doc):
  path = os.path.join(ROOT, doc)
  broken = []
  for target in links(path):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
      continue
    file_part, _, anchor = target.partition("#")
    linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    if not os.path.exists(linked):
      broken.append(f"{target} (no such file)")
    elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
      broken.append(f"{target} (no heading #{anchor} in {os.path.relpath(linked, ROOT)})")
  assert not broken, f"{doc}: broken links: {broken}"


def test_slug_follows_github():
  assert slug("Judged against the scene's truth") == "judged-against-the-scenes-truth"
  assert slug("TPU (ahead-of-time compilation on this CPU)") == (
    "tpu-ahead-of-time-compilation-on-this-cpu"
  )
  assert slug("Recipe: pretrain -> fine-tune VQA -> eval") == (
    "recipe-pretrain---fine-tune-vqa---eval"
  )
  assert slug("`--mode=eval`") == "--modeeval"


def mode_flags(mode: str) -> list[str]:
  """The flags m6_jax defines for `mode` (its own, the shared and the start-up ones), from
  --helpfull's sections of m6_jax modules (absl's own sections left out)."""
  result = subprocess.run(
    [sys.executable, "-m", "m6_jax.main", f"--mode={mode}", "--helpfull"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  out = result.stdout
  assert result.returncode in (0, 1), result.stderr  # absl's help exits with status 1
  names, ours = [], False
  for line in out.splitlines():
    if line and not line.startswith(" "):  # a section header: a module name or a file path
      ours = line.rstrip(":").endswith("main.py") or line.startswith("m6_jax.")
    elif ours and (m := re.match(r"^  --(?:\[no\])?([\w.]+):", line)):
      names.append(m.group(1))
  assert "mode" in names, f"--mode={mode} --helpfull listed no m6_jax flags:\n{out}"
  return names


@pytest.mark.parametrize("mode", list(MODES))
def test_every_flag_of_every_mode_is_in_cli_doc(mode):
  with open(CLI_DOC, encoding="utf-8") as f:
    doc = f.read()
  assert re.search(rf"^## {mode}$", doc, flags=re.M), f"docs/cli.md has no '## {mode}' section"
  missing = [name for name in mode_flags(mode) if f"`--{name}`" not in doc]
  assert not missing, f"--mode={mode}: flags missing from docs/cli.md: {missing}"


def test_readme_keeps_the_setup_commands():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  for command in SETUP_COMMANDS:
    assert command in lines, f"README.md lost the set-up command line: {command}"
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    assert SETUP_COMMANDS[1] in f.read().splitlines()


def _strings(value):
  if isinstance(value, dict):
    for v in value.values():
      yield from _strings(v)
  elif isinstance(value, list):
    for v in value:
      yield from _strings(v)
  elif isinstance(value, str):
    yield value


def test_committed_results_record_no_machine_paths():
  """Results kept under docs/ and experiments/ (JSON, CSV; the notebooks are code, saved
  without outputs) name paths relative to a workdir or the repository, never a directory of
  the machine that made them."""
  found = []
  for folder in ("docs", "experiments"):
    for path in sorted(glob.glob(os.path.join(ROOT, folder, "**", "*"), recursive=True)):
      if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
          values = list(_strings(json.load(f)))
      elif path.endswith(".csv"):
        with open(path, encoding="utf-8") as f:
          values = f.read().replace("\n", ",").split(",")
      else:
        continue
      bad = [v for v in values if os.path.isabs(v) or "/tmp/" in v or v.startswith("~")]
      found += [f"{os.path.relpath(path, ROOT)}: {v}" for v in bad]
  assert not found, found
