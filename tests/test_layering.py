"""The package's layering, checked on its source: no import cycles, every module in a layer
and no import of a higher layer, and mesh axis names only under m6_jax/parallel/."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "m6_jax"
MESH_AXIS_NAMES = ("fsdp", "tensor", "expert")  # "data" is also a plain word (config.data)
# Bottom to top: a module may import its own layer and the layers below it. Training sits
# above evaluation (a model family's periodic evaluator) and the command line above all.
LAYERS = (
  "errors",
  "parallel",
  "model",
  "data",
  "config",
  "checkpoint",
  "infer",
  "serve",
  "evaluation",
  "train",
  "aot",
  "cli",
  "main",
)


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
  path = ROOT.parent / module.replace(".", "/")
  return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: pathlib.Path) -> set[str]:
  """The m6_jax modules `path` imports, at module level or inside functions (a lazy import
  hides a cycle from Python, not from the reader)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("m6_jax"):
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        out.add(candidate if _exists(candidate) else node.module)
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("m6_jax")}
  return out


MODULES = {_module(p): p for p in ROOT.rglob("*.py")}


def _layer(module: str) -> int:
  """The layer of a module: its top-level package or module under m6_jax."""
  parts = module.split(".")
  name = parts[1] if len(parts) > 1 else ""
  assert name in LAYERS, f"{module} is in no layer of {LAYERS}; place it in one"
  return LAYERS.index(name)


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


def test_every_module_is_in_a_layer_and_imports_none_above_it():
  upward = []
  for module, path in sorted(MODULES.items()):
    if module == "m6_jax":
      continue
    _layer(module)
    for imported in _imports(path):
      if imported != "m6_jax" and _layer(imported) > _layer(module):
        upward.append(f"{module} -> {imported}")
  assert not upward, "imports of a higher layer: " + ", ".join(upward)


def test_the_layer_order_is_checked_on_real_edges():
  """The check above is not vacuous: the package has imports across layers, and an edge of
  the wrong direction would be seen."""
  assert _layer("m6_jax.train.loop") > _layer("m6_jax.evaluation.evaluate")
  assert "m6_jax.data.tasks" in _imports(MODULES["m6_jax.config.defaults"])
  assert _layer("m6_jax.data.tasks") < _layer("m6_jax.config.defaults")


def test_mesh_axis_names_only_under_parallel():
  for module, path in MODULES.items():
    if module.startswith("m6_jax.parallel"):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Constant) and node.value in MESH_AXIS_NAMES:
        raise AssertionError(f"{path}:{node.lineno} names the mesh axis {node.value!r}")


# A family's own files: its family module and the model, step, evaluator and loader named for it.
FAMILY_FILES = ("m6_jax.train.families", "m6_jax.model.vqgan", "m6_jax.train.vqgan_step")
FAMILY_FILES += ("m6_jax.evaluation.vqgan_eval", "m6_jax.infer.image_tokenizer")


def test_no_family_name_is_compared_outside_the_families_own_files():
  from m6_jax.config import FAMILIES

  for module, path in MODULES.items():
    if module.startswith(FAMILY_FILES):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        names = [o.value for o in operands if isinstance(o, ast.Constant)]
        names += [
          e.value
          for o in operands
          if isinstance(o, (ast.Tuple, ast.List, ast.Set))
          for e in o.elts
          if isinstance(e, ast.Constant)
        ]
        found = set(names) & set(FAMILIES)
        assert not found, f"{path}:{node.lineno} compares the family name {found}"


def test_no_flag_is_read_outside_the_command_line():
  """Libraries take typed arguments: absl flags live in m6_jax/cli/ and m6_jax/main.py."""
  for module, path in MODULES.items():
    if module.startswith("m6_jax.cli") or module == "m6_jax.main":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "absl":
        names = {a.name for a in node.names}
        assert not names & {"flags", "app"}, f"{module} imports absl {names & {'flags', 'app'}}"


def test_loading_a_config_starts_no_jax():
  """`python -m m6_jax.main` loads the config while parsing flags, before the host-memory
  restart: `--help`, flag errors and that restart must not pay for importing JAX and Flax."""
  import subprocess
  import sys

  code = (
    "import sys; from configs import base, finetune_text_to_image; from m6_jax import config; "
    "config.validate_for_counting(base.get_config()); finetune_text_to_image.get_config(); "
    "import m6_jax.main; "
    "print(sorted(m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
