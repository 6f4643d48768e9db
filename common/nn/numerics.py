"""Numerics: which implementation each layer uses, by config rules matched on module paths.

A network is written once with `common.nn.layers`. After it is built, `apply_rules` walks it and gives
every layer that a rule matches the rule's implementation (model surgery, as qwix's
`quantize_model` does for maxdiffusion's FP8). Full precision, TerDiT's ternary QAT
(`terdit.ternary.TernaryDense`) and COAT's FP8 (`coat.linear.FP8Dense`,
`coat.activations.FP8Residuals`) are such implementations; `common` names none of them, they are
registered by dotted path in the config:

    config.numerics.rules = (
        # (module-path regex, implementation "package.module.Class"[, kwargs[, required]])
        (r"blocks/\\d+/attn/(qkv|out)", "terdit.ternary.TernaryDense", {}),
        (r".*", "common.nn.numerics.FullPrecision", {}),
    )

Paths are the module's attribute path joined by "/" (e.g. "blocks/3/mlp/fc1"); the parameter
paths are that plus "/kernel", "/bias". A rule matches a module when the regex `re.fullmatch`es
its path AND the module is an instance of a class the implementation `replaces`; the first such
rule decides, and a module no rule matches stays as it is. A rule with `required=True` (the
default) that matches no module is a ConfigError (a typo would otherwise leave the model silently
in full precision); a precision preset's rules are not required (a family may lack a layer kind).

An implementation is a class with
  * `replaces`: the layer class(es) it applies to (default `common.nn.layers.Dense`);
  * a classmethod `from_module(module, **kwargs) -> nnx.Module` (or, for linear layers only, the
    older name `from_dense(dense, **kwargs)`) returning the module to use in the layer's place.
    A linear implementation takes over the Dense's widths, logical axis names, compute dtype and
    its initialised kernel and bias under the same attribute names (so parameter paths and the
    family's initialisation are kept) and is called like it, `x [..., in] -> [..., out]`. A
    constructor with a `path` parameter also receives the layer's module path (e.g. to seed a
    per-layer random initialisation).
    A non-linear layer (`common.nn.layers.NONLINEAR_LAYERS`) is not replaced but given a residual
    policy (its `residuals` attribute, see common/nn/layers.py), so its parameters stay untouched.

Per-step caches (weights prepared once per optimizer step): a module may define `step_cache(self)
-> pytree` (e.g. its FP8 weight codes and scale) and `use_step_cache(self, cache)`. The trainer
computes `step_caches(model)` once per step, outside any gradient-accumulation loop and without
gradient, and hands them to the network of every micro-batch with `use_step_caches`; a module that
gets no cache (sampling, evaluation) computes the same values itself.

Precision modes (`config.precision`): a name in `PRECISIONS` ("bf16", "coat") or the dotted path of
a `Precision` object, which supplies default numerics rules (placed after `config.numerics.rules`,
so finer user rules win) and an optimizer (used when `config.optim.name` keeps its default
"adamw"; name it explicitly, e.g. "optax.adamw", to override). `config_rules(config)` and
`optim_config(config)` resolve them; `common` imports no family package, only the dotted names.
"""

from collections.abc import Sequence
import dataclasses
import inspect
import re
from typing import Any

from flax import nnx
import ml_collections

from common.nn import layers
from common import registry
from common.errors import ConfigError
from common.nn.layers import Dense
from common.weights.tree_names import key_path_str

Rule = tuple[str, str, dict[str, Any]]

# Precision-mode names and the `Precision` objects they stand for (dotted names only).
PRECISIONS = {"bf16": "common.nn.numerics.BF16", "coat": "coat.precision.COAT"}


@registry.register("numerics")
class FullPrecision(Dense):
  """Keeps a layer as the network wrote it: a `Dense` stays a plain `Dense`, a non-linear layer
  keeps plain autodiff. An explicit rule target, e.g. to keep a final layer out of a later,
  broader rule."""

  replaces = (Dense,) + layers.NONLINEAR_LAYERS

  @classmethod
  def from_module(cls, module: nnx.Module) -> nnx.Module:
    if isinstance(module, layers.NONLINEAR_LAYERS):
      module.residuals = None
    return module

  @classmethod
  def from_dense(cls, dense: Dense) -> Dense:
    return dense


@dataclasses.dataclass(frozen=True)
class Precision:
  """A precision mode (`config.precision`): default numerics rules and optimizer.

  Attributes:
    rules: numerics rules as in `config.numerics.rules`; applied after the config's own rules
      and not required to match (module docstring).
    optimizer: dotted optimizer factory used when `config.optim.name` is "adamw" ("": keep it).
    optimizer_options: keyword arguments of that factory, under `config.optim.options` (the
      config's own options win).
  """
  rules: tuple = ()
  optimizer: str = ""
  optimizer_options: tuple[tuple[str, Any], ...] = ()


BF16 = registry.add("precision", "common.nn.numerics.BF16", Precision())


def precision(config: ml_collections.ConfigDict) -> Precision:
  """The `Precision` that `config.precision` names ("bf16" when absent)."""
  name = config.get("precision", "bf16") or "bf16"
  dotted = PRECISIONS.get(name, name) if isinstance(name, str) else ""
  if "." not in dotted:
    raise ConfigError(f"config.precision={name!r}: expected one of {sorted(PRECISIONS)} or the "
                      "dotted path of a common.nn.numerics.Precision.")
  preset = registry.import_object(dotted, "config.precision", "precision",
                                  short=tuple(PRECISIONS))
  if not isinstance(preset, Precision):
    raise ConfigError(f"config.precision={name!r} ({dotted}) is a {type(preset).__name__}, "
                      "not a common.nn.numerics.Precision.")
  return preset


def config_rules(config: ml_collections.ConfigDict) -> tuple:
  """`config.numerics.rules` followed by the precision preset's rules (marked not required)."""
  rules = config.get("numerics", {}).get("rules", ()) or ()
  if not isinstance(rules, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in rules):
    raise ConfigError(f"config.numerics.rules = {rules!r:.80}: expected a list of (path regex, "
                      "implementation dotted name[, kwargs dict[, required bool]]) rules.")
  own = tuple(tuple(r) for r in rules)
  preset = tuple((r[0], r[1], dict(r[2]) if len(r) > 2 and r[2] else {}, False)
                 for r in precision(config).rules)
  return own + preset


def optim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.optim` with the precision preset's optimizer when the config keeps "adamw"."""
  cfg = config.optim
  preset = precision(config)
  if not preset.optimizer or cfg.get("name", "adamw") != "adamw":
    return cfg
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.name = preset.optimizer
  options = cfg.get("options", None) or {}
  if isinstance(options, ml_collections.ConfigDict):
    options = options.to_dict()
  cfg.options = {**dict(preset.optimizer_options), **dict(options)}
  return cfg


@dataclasses.dataclass(frozen=True)
class _Parsed:
  regex: re.Pattern
  impl: Any
  kwargs: dict
  name: str
  required: bool
  replaces: tuple

  def build(self, module: nnx.Module, path: str) -> nnx.Module:
    fn = self.impl.from_module if hasattr(self.impl, "from_module") else self.impl.from_dense
    extra = {"path": path} if _accepts_path(fn) else {}
    return fn(module, **self.kwargs, **extra)


def _accepts_path(fn: Any) -> bool:
  """Whether an implementation's constructor takes the layer's module path (`path=`), e.g. to
  seed a per-layer random initialisation."""
  try:
    return "path" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def parse_rules(rules: Sequence[Any]) -> list[_Parsed]:
  """`config.numerics.rules` checked, with their implementations resolved (module docstring);
  raises ConfigError."""
  parsed = []
  for i, rule in enumerate(rules or ()):
    rule = tuple(rule)
    where = f"config.numerics.rules[{i}]"
    if len(rule) not in (2, 3, 4):
      raise ConfigError(f"{where} = {rule!r}: expected (path regex, implementation dotted "
                        "name[, kwargs dict[, required bool]]).")
    pattern, name = rule[0], rule[1]
    kwargs_ok = len(rule) < 3 or rule[2] is None or hasattr(rule[2], "keys")
    if not isinstance(pattern, str) or not kwargs_ok:
      raise ConfigError(f"{where} = {rule!r:.120}: expected (path regex, implementation dotted "
                        "name[, kwargs dict[, required bool]]).")
    kwargs = dict(rule[2]) if len(rule) >= 3 and rule[2] is not None else {}
    required = bool(rule[3]) if len(rule) == 4 else True
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"{where}: bad regex {pattern!r}: {e}") from e
    impl = registry.import_object(name, where, "numerics")
    ctor = getattr(impl, "from_module", None) or getattr(impl, "from_dense", None)
    if ctor is None:
      raise ConfigError(f"{where}: {name} has no `from_module` (or `from_dense`) classmethod, so "
                        "it cannot implement a layer.")
    replaces = getattr(impl, "replaces", Dense)
    replaces = tuple(replaces) if isinstance(replaces, (tuple, list)) else (replaces,)
    registry.check_kwargs(ctor, kwargs, where)
    parsed.append(_Parsed(regex, impl, kwargs, name, required, replaces))
  return parsed


def module_paths(model: nnx.Module, classes: tuple = (Dense,)) -> list[tuple[str, nnx.Module]]:
  """Every module of `model` that is an instance of `classes`, with its path ("blocks/0/attn")."""
  return [(key_path_str(path), node) for path, node in nnx.iter_graph(model)
          if isinstance(node, classes)]


def linear_paths(model: nnx.Module) -> list[tuple[str, Dense]]:
  """Every `Dense` of `model` with its module path ("blocks/0/attn/qkv")."""
  return module_paths(model, (Dense,))


def apply_rules(model: nnx.Module, rules: Sequence[Any]) -> dict[str, str]:
  """Gives, in place, each layer of `model` that a rule matches the rule's implementation.

  Args:
    model: a built network.
    rules: (path regex, implementation dotted name[, kwargs[, required]]) tuples, first match wins.
  Returns:
    {module path: implementation name} of the layers the rules matched.
  Raises:
    ConfigError: a malformed rule, or a required rule that matches no layer.
  """
  parsed = parse_rules(rules)
  if not parsed:
    return {}
  classes = tuple({c for p in parsed for c in p.replaces})
  candidates = module_paths(model, classes)
  chosen, used, replacements = {}, set(), []
  for path, module in candidates:
    for i, rule in enumerate(parsed):
      if isinstance(module, rule.replaces) and rule.regex.fullmatch(path):
        used.add(i)
        chosen[path] = rule.name
        new = rule.build(module, path)
        if new is not module:
          replacements.append((path, new))
        break
  unused = [f"{p.name} ({p.regex.pattern!r})" for i, p in enumerate(parsed)
            if p.required and i not in used]
  if unused:
    raise ConfigError(f"config.numerics.rules match no layer of the model: {unused}. "
                      f"Layers: {[p for p, _ in candidates][:12]} ...")
  for path, new in replacements:
    _set_module(model, path.split("/"), new)
  return chosen


def step_caches(model: nnx.Module) -> dict[str, Any]:
  """{module path: module.step_cache()} of every module that defines `step_cache` (module
  docstring); {} for a network without any."""
  return {key_path_str(path): node.step_cache() for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module) and hasattr(node, "step_cache")}


def use_step_caches(model: nnx.Module, caches: dict[str, Any]) -> None:
  """Hands each module of `model` its cache from `step_caches` (`module.use_step_cache`)."""
  if not caches:
    return
  modules = {key_path_str(path): node for path, node in nnx.iter_graph(model)}
  for path, cache in caches.items():
    modules[path].use_step_cache(cache)


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
