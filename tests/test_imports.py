"""The import graph of our packages reads top-down (launch -> families -> common -> kernels): no
cycles, and imports at the top of their module (parsed, not run; docs/DESIGN.md, "Layout").

Every import statement is an edge, at module level or inside a function; those under
`if TYPE_CHECKING:` are not (they never run). `import a.b` and `from a import b` (b a module) are
edges to the module a.b only: a package's own `__init__` is imported first anyway, and a submodule
naming its parent package that way is no cycle. A function-local import is allowed only for an
optional or heavy dependency, and says so in a comment on its line or the line before (linter
directives alone do not count).
"""

import ast
import io
import os
import re
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every top-level package of the repository (a folder with __init__.py) is checked, so a new family
# is without an edit here; these must be among them.
EXPECTED = {"common", "kernels", "sid2", "microdit", "terdit", "coat", "autoencoder", "configs",
            "launch"}


def packages(root: str) -> list[str]:
  return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "__init__.py")))


def modules(root: str, package_names) -> dict[str, str]:
  """{dotted module name: file path} of every .py file under the packages."""
  out = {}
  for package in package_names:
    for dirpath, _, files in os.walk(os.path.join(root, package)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
          out[name.removesuffix(".__init__")] = path
  return out


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
  return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _enclosing(node: ast.AST, parents: dict, kinds) -> ast.AST | None:
  while node in parents:
    node = parents[node]
    if isinstance(node, kinds):
      return node
  return None


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
  block = _enclosing(node, parents, ast.If)
  while block is not None:
    if "TYPE_CHECKING" in ast.unparse(block.test):
      return True
    block = _enclosing(block, parents, ast.If)
  return False


# Linter directives say nothing about why: a comment must hold words besides them.
_DIRECTIVES = re.compile(r"pylint:\s*\S+|noqa(:\s*[\w,]+)?|type:\s*\S+")


def _comment_lines(source: str) -> set[int]:
  """The lines with a comment that is more than linter directives."""
  return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
          if tok.type == tokenize.COMMENT and re.search(r"\w", _DIRECTIVES.sub("", tok.string))}


def imports(name: str, path: str, ours: dict[str, str]):
  """(edges: {module of ours it imports}, uncommented: ["file:line: statement"] of function-local
  imports without a comment on their line or the line before)."""
  with open(path, encoding="utf-8") as f:
    source = f.read()
  tree = ast.parse(source, path)
  parents, comments = _parents(tree), _comment_lines(source)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  edges, uncommented = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
      subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in ours]
      targets = subs + ([base] if len(subs) < len(node.names) else [])
    else:
      continue
    if _type_checking_only(node, parents):
      continue
    if (_enclosing(node, parents, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        and not {node.lineno, node.lineno - 1} & comments):
      uncommented.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)}")
    edges |= {t for t in targets if t in ours and t != name}
  return edges, uncommented


def graph(root: str, package_names):
  ours = modules(root, package_names)
  edges, uncommented = {}, []
  for name, path in sorted(ours.items()):
    edges[name], bad = imports(name, path, ours)
    uncommented += bad
  return edges, uncommented


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (a list of modules, first = last) per strongly connected component (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(_cycle_through(min(component), component, edges))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return found


def _cycle_through(start: str, component: set[str], edges) -> list[str]:
  """The shortest path start -> ... -> start inside the component (breadth first)."""
  paths, seen = [[start]], {start}
  while paths:
    path = paths.pop(0)
    for w in sorted(edges[path[-1]] & component):
      if w == start:
        return path + [start]
      if w not in seen:
        seen.add(w)
        paths.append(path + [w])
  raise AssertionError(f"no cycle through {start}")


def test_every_package_is_checked():
  assert EXPECTED <= set(packages(ROOT))


def test_the_import_graph_has_no_cycles():
  edges, _ = graph(ROOT, packages(ROOT))
  found = cycles(edges)
  assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_function_local_imports_say_why():
  _, uncommented = graph(ROOT, packages(ROOT))
  assert not uncommented, ("function-local imports without a comment saying why (an optional or "
                           "heavy dependency; otherwise import at the top):\n"
                           + "\n".join(uncommented))


@pytest.fixture
def toy(tmp_path):
  """A package `p` with a cycle a -> b -> a (b's import is function-local and uncommented), an
  edge c -> a under TYPE_CHECKING only, and submodules importing their parent package."""
  files = {
      "p/__init__.py": "from p import a\n",
      "p/a.py": "from p import b, c\nimport os\n",
      "p/b.py": "def f():\n  from . import a\n  # optional: heavy\n  import numpy\n"
                "  import scipy  # pylint: disable=import-outside-toplevel  # noqa: F401\n",
      "p/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from p.a import x\n"
                "def g():\n  import json  # the why\n",
      "p/d.py": "from p import c\n",
  }
  for rel, text in files.items():
    (tmp_path / rel).parent.mkdir(exist_ok=True)
    (tmp_path / rel).write_text(text)
  return str(tmp_path)


def test_the_checker_finds_cycles_and_uncommented_local_imports(toy):
  edges, uncommented = graph(toy, ["p"])
  assert edges == {"p": {"p.a"}, "p.a": {"p.b", "p.c"}, "p.b": {"p.a"}, "p.c": set(),
                   "p.d": {"p.c"}}
  assert cycles(edges) == [["p.a", "p.b", "p.a"]]
  assert [u.split(": ", 1)[1] for u in uncommented] == ["from . import a", "import scipy"]
