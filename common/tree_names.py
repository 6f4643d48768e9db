"""Flat parameter names for nested pure dicts: the keys of safetensors files and exports.

`flatten({"a": {0: {"b": leaf}}})` gives `{"a.0.b": leaf}`; `unflatten` inverts it, turning
all-digit parts back into int keys (the indices of `nnx.List` paths in `nnx.to_pure_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping[Any, Any], sep: str = ".") -> dict[str, Any]:
  """A nested mapping -> {"a.0.b": leaf} (keys joined by `sep`; empty mappings vanish)."""
  out: dict[str, Any] = {}

  def walk(node: Mapping[Any, Any], prefix: str) -> None:
    for k, v in node.items():
      name = f"{prefix}{k}"
      if isinstance(v, Mapping):
        walk(v, name + sep)
      else:
        out[name] = v

  walk(tree, "")
  return out


def unflatten(flat: Mapping[str, Any], sep: str = ".") -> dict[Any, Any]:
  """{"a.0.b": leaf} -> {"a": {0: {"b": leaf}}}; all-digit parts become ints."""
  tree: dict[Any, Any] = {}
  for path, value in flat.items():
    parts = [int(p) if p.isdigit() else p for p in path.split(sep)]
    node = tree
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return tree
