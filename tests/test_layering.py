"""The package's layering, checked on its source: no import cycles, data flows one way, and
mesh axis names appear only under m6_jax/parallel/."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "m6_jax"
MESH_AXIS_NAMES = ("fsdp", "tensor", "expert")  # "data" is also a plain word (config.data)


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """The m6_jax modules `path` imports, at module level or inside functions (a lazy import
  hides a cycle from Python, not from the reader)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("m6_jax"):
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        exists = (ROOT.parent / (candidate.replace(".", "/") + ".py")).exists()
        out.add(candidate if exists else node.module)
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("m6_jax")}
  return out


MODULES = {_module(p): p for p in ROOT.rglob("*.py")}


def test_no_import_cycles():
  graph = {m: _imports(p) & set(MODULES) for m, p in MODULES.items()}
  done, active = set(), []

  def visit(m):
    if m in active:
      raise AssertionError("import cycle: " + " -> ".join(active[active.index(m) :] + [m]))
    if m in done:
      return
    active.append(m)
    for dep in sorted(graph[m]):
      visit(dep)
    active.pop()
    done.add(m)

  for m in sorted(graph):
    visit(m)


@pytest.mark.parametrize(
  "package, forbidden",
  [
    ("m6_jax.model", ("m6_jax.data", "m6_jax.train", "m6_jax.infer", "m6_jax.evaluation")),
    ("m6_jax.infer", ("m6_jax.train", "m6_jax.evaluation")),
    ("m6_jax.evaluation", ("m6_jax.train",)),
    ("m6_jax.train", ("m6_jax.infer", "m6_jax.evaluation")),
    ("m6_jax.parallel", ("m6_jax.data", "m6_jax.model", "m6_jax.train", "m6_jax.infer")),
  ],
)
def test_data_flows_one_way(package, forbidden):
  for module, path in MODULES.items():
    if module.startswith(package):
      bad = {i for i in _imports(path) if i.startswith(forbidden)}
      assert not bad, f"{module} imports {sorted(bad)}"


def test_mesh_axis_names_only_under_parallel():
  for module, path in MODULES.items():
    if module.startswith("m6_jax.parallel"):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Constant) and node.value in MESH_AXIS_NAMES:
        raise AssertionError(f"{path}:{node.lineno} names the mesh axis {node.value!r}")


def test_no_module_over_500_lines_and_a_short_loop():
  sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
  assert max(sizes.values()) <= 500, max(sizes.items(), key=lambda kv: kv[1])
  assert sizes["m6_jax.train.loop"] < 300


def test_loading_a_config_starts_no_jax():
  """`python -m m6_jax.main` loads the config while parsing flags, before the host-memory
  restart: `--help`, flag errors and that restart must not pay for importing JAX and Flax."""
  import subprocess
  import sys

  code = (
    "import sys; from configs import base, finetune_text_to_image; from m6_jax import config; "
    "config.validate_for_counting(base.get_config()); finetune_text_to_image.get_config(); "
    "print(sorted(m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
