"""The network of `config.model`: its class by dotted name, built with its numerics and inference form.

`config.model.name` is the dotted path of the class; every other key of `config.model` is a
constructor keyword argument, plus `rngs=nnx.Rngs(params=key)` (docs/DESIGN.md, "The network
contract"; what the class must provide is typed in common/training/contracts.py).
"""

from typing import Any, Sequence

from flax import nnx
import jax
import ml_collections

from common.nn import numerics
from common import registry
from common.weights.deployment import deploy


def model_class(model_cfg: ml_collections.ConfigDict, kind: str = "model"):
  """Imports the network class named by `model_cfg.name` ("package.module.Class"), a registered
  plug-in of `kind` when the config was read from a file (`common.registry`)."""
  return registry.import_object(model_cfg.get("name", None), "config.model.name", kind)


def build_model(model_cfg: ml_collections.ConfigDict, key: jax.Array,
                numerics_rules: Sequence[Any] = (), *, deployed: bool = False) -> nnx.Module:
  """Builds the network: `config.model.name(**other keys, rngs=nnx.Rngs(params=key))`, then gives
  its linear layers the implementations `numerics_rules` (`config.numerics.rules`) choose, and
  with `deployed` their inference forms (`common.weights.deployment.deploy`)."""
  cls = model_class(model_cfg)
  kwargs = registry.config_kwargs(model_cfg)
  registry.check_kwargs(cls.__init__, kwargs, "config.model")
  model = registry.build(cls, "config.model", **kwargs, rngs=nnx.Rngs(params=key))
  numerics.apply_rules(model, numerics_rules)
  if deployed:
    deploy(model)
  return model
