"""Plug-ins by dotted name: networks, recipes, optimizers, precision modes, numerics
implementations and weight converters are named in configs as "package.module.Object" and built
with the config's other keys as keyword arguments.

Trust (docs/DESIGN.md, "Plug-ins"): a name the user wrote (on the command line or in a config file
passed with --config) is their own code and imports whatever it names. A name read from a file on
disk (an export's config.json, an autoencoder export) is data: inside `with from_file(path):` it
resolves only to an object of one of our packages that a `register(kind)` decorator marked as a
plug-in of the kind the config key asks for; anything else is a one-line ConfigError. Importing one
of our own modules runs none of the file's code, and only registered callables get the file's
keyword arguments.

A new plug-in registers where it is defined:

    @registry.register("model")
    class MyNet(nnx.Module): ...

    MY_MODE = registry.add("precision", "mypkg.precision.MY_MODE", Precision(...))  # an instance
"""

import contextlib
import contextvars
import importlib
import inspect
import os
from typing import Any, Iterator, Sequence

from common.errors import ConfigError

# The kinds of plug-in a config names: config.model.name ("model"; "autoencoder" for the network of
# an autoencoder export), config.diffusion.name, config.optim.name, config.precision,
# config.numerics.rules[i][1], config.init_from.converter.
KINDS = ("model", "autoencoder", "diffusion", "optimizer", "precision", "numerics", "converter")
# Top-level packages a name read from a file may import: ours, which run nothing on import.
OUR_PACKAGES = ("common", "sid2", "microdit", "terdit", "coat", "autoencoder", "kernels")
# Plug-in modules that moved (common/ grouped by role; the autoencoder networks and recipe out of
# common/autoencoders/ into the autoencoder family, the loader staying as common/autoencoders.py):
# exports and checkpoints written before name them by their old module, which resolves to the new
# one (longest prefix first).
MOVED_MODULES = {
    "common.adm": "common.diffusion.adm",
    "common.numerics": "common.nn.numerics",
    "common.init_from": "common.weights.init_from",
    "common.autoencoders.kl_vae": "autoencoder.kl_vae",
    "common.autoencoders.small_kl": "autoencoder.small_kl",
    "common.autoencoders.recipe": "autoencoder.recipe",
}
# Modules that register plug-ins, imported (by name, so that common/ does not import the families)
# only to list the allowed names in an error message; tests/test_registry.py checks it is complete.
PLUGIN_MODULES = (
    "common.nn.numerics", "common.diffusion.adm", "common.weights.init_from", "sid2.model",
    "microdit.model", "terdit.model", "terdit.ternary", "coat.linear", "coat.activations",
    "coat.optim", "coat.precision", "autoencoder.small_kl", "autoencoder.kl_vae",
    "autoencoder.recipe",
)

_REGISTERED: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("registry_source",
                                                                      default=None)


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown plug-in kind {kind!r}; kinds: {KINDS}")


def add(kind: str, name: str, obj: Any) -> Any:
  """Registers `obj` as the plug-in `name` ("package.module.Object", where it is defined) of
  `kind` and returns it (for instances such as precision presets, which have no `__qualname__`)."""
  _check_kind(kind)
  _REGISTERED[kind][name] = obj
  return obj


def register(*kinds: str):
  """Class/function decorator: registers the object under its dotted path for each of `kinds`."""
  def decorate(obj):
    for kind in kinds:
      add(kind, f"{obj.__module__}.{obj.__qualname__}", obj)
    return obj
  return decorate


def registered(kind: str) -> list[str]:
  """The sorted dotted names of `kind`'s plug-ins (imports PLUGIN_MODULES to find them all)."""
  _check_kind(kind)
  for module in PLUGIN_MODULES:
    try:
      importlib.import_module(module)
    except ImportError:  # a family's optional dependency missing: list what is there
      pass
  return sorted(_REGISTERED[kind])


@contextlib.contextmanager
def from_file(source: str | os.PathLike) -> Iterator[None]:
  """Within this scope, names are read from `source` (a file) and resolve only to registered
  plug-ins of our packages (module docstring)."""
  token = _SOURCE.set(os.fspath(source))
  try:
    yield
  finally:
    _SOURCE.reset(token)


def file_source() -> str | None:
  """The file that names come from in the current scope (None: the user's own config)."""
  return _SOURCE.get()


def _refuse(name: Any, where: str, kind: str, source: str, why: str,
            short: Sequence[str]) -> ConfigError:
  return ConfigError(f"{where}={name!r} read from {source} {why}; a name read from a file must be "
                     f"a registered {kind} plug-in: one of {[*short, *registered(kind)]}.")


def moved_name(name: str) -> str:
  """`name` with a module that moved (MOVED_MODULES) replaced by its new place."""
  for old in sorted(MOVED_MODULES, key=len, reverse=True):
    if name.startswith(old + "."):
      return MOVED_MODULES[old] + name[len(old):]
  return name


def import_object(name: str, where: str, kind: str, short: Sequence[str] = ()) -> Any:
  """The object that "package.module.Object" names; `where` is the config key (for messages).

  Outside `from_file` any dotted name imports (the user's own code). Inside, only a plug-in of
  `kind` registered in one of OUR_PACKAGES resolves.

  Args:
    short: the short names the caller resolves itself before calling (e.g. "vp", "edm"), listed
      with the registered names when a name is refused.

  Raises:
    ConfigError: not a dotted name, cannot be imported, or (from a file) not a registered plug-in
      of `kind`.
  """
  _check_kind(kind)
  source = _SOURCE.get()
  if not isinstance(name, str) or "." not in name:
    if source is not None:
      raise _refuse(name, where, kind, source, "is not a dotted name", short)
    raise ConfigError(f"{where} must be a dotted path such as 'sid2.model.ResidualUViT', got "
                      f"{name!r}.")
  name = moved_name(name)
  parts = name.split(".")
  if source is not None and (parts[0] not in OUR_PACKAGES
                             or not all(p.isidentifier() for p in parts)):
    raise _refuse(name, where, kind, source, "is not in one of our packages", short)
  module_name, attr = name.rsplit(".", 1)
  try:
    obj = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    if source is not None:
      raise _refuse(name, where, kind, source, f"cannot be imported ({e})", short) from e
    raise ConfigError(f"{where}={name!r} cannot be imported: {e}") from e
  if source is not None and not any(obj is v for v in _REGISTERED[kind].values()):
    raise _refuse(name, where, kind, source, f"is not a registered {kind} plug-in",
                  short)
  return obj


def build(fn: Any, where: str, /, *args: Any, **kwargs: Any) -> Any:
  """`fn(*args, **kwargs)` for a plug-in built from config keys (`where`). Inside `from_file` a
  TypeError or ValueError (a key of the wrong type in the file) is a one-line ConfigError naming
  the file; outside it propagates (the user's own code)."""
  source = _SOURCE.get()
  if source is None:
    return fn(*args, **kwargs)
  try:
    return fn(*args, **kwargs)
  except (TypeError, ValueError) as e:
    detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise ConfigError(f"{where} read from {source} cannot build "
                      f"{getattr(fn, '__qualname__', fn)}: {type(e).__name__}: {detail}") from e


def check_kwargs(fn: Any, kwargs: dict, where: str, skip: tuple[str, ...] = ("self", "rngs")) -> None:
  """Raises ConfigError naming the keys of `kwargs` that `fn` does not take (unless it takes
  **kwargs)."""
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise ConfigError(f"{where} has keys that {getattr(fn, '__qualname__', fn)} does not take: "
                      f"{unknown}. It takes: {sorted(k for k in params if k not in skip)}.")


def config_kwargs(cfg: Any, exclude: tuple[str, ...] = ("name",)) -> dict:
  """A ConfigDict (or mapping) as plain keyword arguments; lists become tuples."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k not in exclude}
