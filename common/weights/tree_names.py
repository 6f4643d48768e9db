"""Parameter names: a path's keys joined into one string, and flat names for nested pure dicts.

`key_path_str(path, sep)` is the one way a path (a `jax.tree_util` key path or an nnx graph / state
path) becomes a name: "blocks/3/attn/qkv/kernel" with "/" (numerics rules, lr multipliers,
shardings), "blocks.3.attn.qkv.kernel" with "." (exports, summaries, foreign weight names).
`flatten({"a": {0: {"b": leaf}}})` gives `{"a.0.b": leaf}` (the keys of safetensors files and
exports); `unflatten` inverts it, turning all-digit parts back into int keys (the indices of
`nnx.List` paths in `nnx.to_pure_dict`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def key_path_str(path: Iterable[Any], sep: str = "/") -> str:
  """A path -> its keys joined by `sep`: a DictKey's `key`, a SequenceKey's `idx`, a GetAttrKey's
  `name`, or the key itself (the str / int keys of nnx paths)."""
  return sep.join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


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
