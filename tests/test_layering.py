"""The package layering of docs/DESIGN.md, checked on every module's imports (parsed, not run).

`kernels/` is a leaf: it imports nothing of the project's own outside itself. `common/` imports no
family package (every top-level package but common, kernels, configs and launch: sid2, microdit,
terdit, coat, autoencoder, and a new family without an edit here). Models and kernels do not import
tfds, grain, TensorFlow or torch. tests/test_imports.py checks the import graph has no cycles.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))}
OURS = PACKAGES | {"benchmarks", "tests"}
FAMILIES = PACKAGES - {"common", "kernels", "configs", "launch"}
HEAVY = {"tensorflow", "tensorflow_datasets", "grain", "torch"}


def _modules(package: str):
  for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
    for f in sorted(files):
      if f.endswith(".py"):
        yield os.path.join(dirpath, f)


def _imports(path: str) -> list[tuple[int, str]]:
  """(line, top-level package) of every import statement in the file, nested ones included."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      out.append((node.lineno, node.module.split(".")[0]))
  return out


def _violations(package: str, forbidden: set[str]) -> list[str]:
  bad = []
  for path in _modules(package):
    for line, top in _imports(path):
      if top in forbidden:
        bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {top}")
  return bad


def test_kernels_import_nothing_of_ours():
  assert not _violations("kernels", OURS - {"kernels"})


def test_common_imports_no_family_package():
  assert not _violations("common", FAMILIES | {"configs", "launch", "benchmarks", "tests"})


def test_the_families_are_found():
  assert {"sid2", "microdit", "terdit", "coat", "autoencoder"} <= FAMILIES


@pytest.mark.parametrize("package", ["kernels", *sorted(FAMILIES)])
def test_models_and_kernels_stay_light(package):
  assert not _violations(package, HEAVY)


def test_the_checker_sees_imports(tmp_path):
  """The parser finds plain, dotted, `from` and function-local imports (so the tests can fail)."""
  src = tmp_path / "m.py"
  src.write_text("import coat.fp8\nfrom sid2 import model\ndef f():\n  import torch\n"
                 "from . import x\n")
  assert _imports(str(src)) == [(1, "coat"), (2, "sid2"), (4, "torch")]
