"""Plug-ins by dotted name: networks, recipes and optimizers are named in configs as
"package.module.Object" and built with the config's other keys as keyword arguments."""

import importlib
import inspect
from typing import Any

from common.errors import ConfigError


def import_object(name: str, where: str) -> Any:
  """Imports "package.module.Object"; `where` names the config key in error messages."""
  if not isinstance(name, str) or "." not in name:
    raise ConfigError(f"{where} must be a dotted path such as 'sid2.model.ResidualUViT', got "
                      f"{name!r}.")
  module_name, attr = name.rsplit(".", 1)
  try:
    return getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"{where}={name!r} cannot be imported: {e}") from e


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
