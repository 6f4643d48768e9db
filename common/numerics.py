"""Which implementation each linear layer uses: config rules matched on module paths.

A network is written once with `common.layers.Dense`. After it is built, `apply_rules` walks it
and replaces every `Dense` whose module path matches a rule by the rule's implementation (model
surgery, as qwix's `quantize_model` does for maxdiffusion's FP8). Full precision, TerDiT's ternary
QAT (`terdit.numerics.TernaryLinear`) and COAT's FP8 (`coat`) are such implementations; `common`
names none of them, they are registered by dotted path in the config:

    config.numerics.rules = (
        # (module-path regex, implementation "package.module.Class", constructor kwargs)
        (r"blocks/\\d+/attn/(qkv|out)", "terdit.numerics.TernaryLinear", {}),
        (r".*", "common.numerics.FullPrecision", {}),
    )

Paths are the module's attribute path joined by "/" (e.g. "blocks/3/mlp/w1"); the parameter
paths are that plus "/kernel", "/bias". A rule matches with `re.fullmatch`; the first matching rule
decides, and a `Dense` no rule matches stays as it is.

An implementation is an `nnx.Module` class with a classmethod
`from_dense(dense: common.layers.Dense, **kwargs) -> nnx.Module`: it takes over the layer's
widths, logical axis names, compute dtype and its initialised kernel and bias (so the family's
initialisation is kept), and is called like the Dense, `x [..., in] -> [..., out]`. A `from_dense`
with a `path` parameter also receives the layer's module path (e.g. to seed a per-layer init).
"""

from collections.abc import Sequence
import inspect
import re
from typing import Any

from flax import nnx

from common import registry
from common.errors import ConfigError
from common.layers import Dense

Rule = tuple[str, str, dict[str, Any]]


class FullPrecision(Dense):
  """The plain `Dense`, as an explicit rule target (e.g. to keep a final layer out of a later,
  broader rule)."""

  @classmethod
  def from_dense(cls, dense: Dense) -> Dense:
    return dense


def _parse(rules: Sequence[Any]) -> list[tuple[re.Pattern, Any, dict[str, Any], str]]:
  parsed = []
  for i, rule in enumerate(rules or ()):
    rule = tuple(rule)
    if len(rule) not in (2, 3):
      raise ConfigError(f"config.numerics.rules[{i}] = {rule!r}: expected (path regex, "
                        "implementation dotted name[, kwargs dict]).")
    pattern, name = rule[0], rule[1]
    kwargs = dict(rule[2]) if len(rule) == 3 and rule[2] is not None else {}
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"config.numerics.rules[{i}]: bad regex {pattern!r}: {e}") from e
    impl = registry.import_object(name, f"config.numerics.rules[{i}]")
    if not hasattr(impl, "from_dense"):
      raise ConfigError(f"config.numerics.rules[{i}]: {name} has no `from_dense` classmethod, "
                        "so it cannot implement a linear layer.")
    registry.check_kwargs(impl.from_dense, kwargs, f"config.numerics.rules[{i}]")
    parsed.append((regex, impl, kwargs, name))
  return parsed


def linear_paths(model: nnx.Module) -> list[tuple[str, Dense]]:
  """Every `Dense` of `model` with its module path ("blocks/0/attn/qkv")."""
  return [("/".join(str(p) for p in path), node) for path, node in nnx.iter_graph(model)
          if isinstance(node, Dense)]


def apply_rules(model: nnx.Module, rules: Sequence[Any]) -> dict[str, str]:
  """Replaces, in place, each `Dense` of `model` that a rule matches by the rule's implementation.

  Args:
    model: a built network.
    rules: (path regex, implementation dotted name[, kwargs]) triples, first match wins.
  Returns:
    {module path: implementation name} of the layers the rules matched.
  Raises:
    ConfigError: a malformed rule, or a rule that matches no layer (a typo would otherwise leave
      the model silently in full precision).
  """
  parsed = _parse(rules)
  if not parsed:
    return {}
  chosen, used = {}, set()
  replacements = []
  for path, dense in linear_paths(model):
    for i, (regex, impl, kwargs, name) in enumerate(parsed):
      if regex.fullmatch(path):
        used.add(i)
        chosen[path] = name
        extra = {"path": path} if _accepts_path(impl.from_dense) else {}
        new = impl.from_dense(dense, **kwargs, **extra)
        if new is not dense:
          replacements.append((path, new))
        break
  unused = [parsed[i][3] + f" ({rules[i][0]!r})" for i in range(len(parsed)) if i not in used]
  if unused:
    raise ConfigError(f"config.numerics.rules match no linear layer of the model: {unused}. "
                      f"Linear layers: {[p for p, _ in linear_paths(model)][:12]} ...")
  for path, new in replacements:
    _set_module(model, path.split("/"), new)
  return chosen


def _accepts_path(fn: Any) -> bool:
  """Whether an implementation's `from_dense` takes the layer's module path (`path=`), e.g. to
  seed a per-layer random initialisation."""
  try:
    return "path" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _set_module(root: Any, parts: list[str], value: nnx.Module) -> None:
  node = root
  for p in parts[:-1]:
    node = node[int(p)] if isinstance(node, (list, tuple)) or _is_index(node, p) else getattr(node, p)
  last = parts[-1]
  if isinstance(node, list) or _is_index(node, last):
    node[int(last)] = value
  else:
    setattr(node, last, value)


def _is_index(node: Any, part: str) -> bool:
  return part.isdigit() and not hasattr(node, part) and hasattr(node, "__getitem__")
