"""Optimizers: learning-rate schedules, the optimizer named by the config, clipping, and a train-step
helper that uses a transformation's fused in-place step when it has one.

Choosing the optimizer (`config.optim.name`):

* "adamw": `optax.adamw`, built in;
* a dotted path "package.module.factory" (e.g. "coat.optim.fp8_adamw", or "optax.adamw"): the
  factory is imported and called as

    factory(learning_rate: optax.Schedule, *, b1: float, b2: float, eps: float,
            weight_decay: float, **config.optim.options) -> optax.GradientTransformation

  (`config.optim.options`, optional, holds factory-specific keyword arguments, e.g.
  `{"impl": "jnp"}` for COAT's FP8 AdamW). `common` imports no family package: the name is the only
  link. A factory whose signature has a `placement` argument also gets the parameters'
  `common.sharding.ParamPlacement` (mesh and spec by parameter path), to lay its state out per
  device shard.

Fused in-place steps: a factory may return a `FusedGradientTransformation`, an
`optax.GradientTransformation` (init and update work as usual, so optax utilities keep working) that
also offers `apply(grads, state, params, grad_scale) -> (new_params, new_state)`, which writes the
new parameters directly (e.g. a kernel whose outputs alias the donated parameter buffers) instead of
returning an update that `optax.apply_updates` writes again. `apply_gradients` uses it when present;
global-norm clipping passes its scale into the fused step instead of materialising clipped gradients.
"""

from collections.abc import Callable
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from common import registry
from common.errors import ConfigError

# apply(grads, state, params, grad_scale) -> (new_params, new_state); grad_scale is None or an
# fp32 scalar that multiplies every gradient (global-norm clipping).
ApplyFn = Callable[[Any, Any, Any, jax.Array | None], tuple[Any, Any]]


class FusedGradientTransformation(optax.GradientTransformation):
  """An optax transformation with a fused step that updates the parameters in place.

  It is an `optax.GradientTransformation` (a NamedTuple of init and update), so `tx.init`,
  `tx.update`, `optax.chain` and `optax.tree_map_params` work unchanged; `apply` is an extra
  attribute. `update` followed by `optax.apply_updates` and `apply` compute the same step.

  Attributes:
    init: as optax: params -> state.
    update: as optax: (grads, state, params) -> (updates, state).
    apply: (grads, state, params, grad_scale) -> (new_params, new_state); grad_scale is None or an
      fp32 scalar the gradients are multiplied by before the step.
  """

  def __new__(cls, init, update, apply: ApplyFn):
    obj = super().__new__(cls, init, update)
    obj.apply = apply
    return obj


def apply_gradients(tx: optax.GradientTransformation, grads: Any, opt_state: Any,
                    params: Any) -> tuple[Any, Any]:
  """One optimizer step: `(new_params, new_opt_state)`.

  Uses `tx.apply` when `tx` is a `FusedGradientTransformation` (its parameter and state buffers are
  updated in place when the caller's jit donates them), otherwise `tx.update` and
  `optax.apply_updates`. Both give the same values.

  Args:
    tx: the optimizer (e.g. from `make_optimizer`).
    grads: gradients, a pytree like params.
    opt_state: tx's state.
    params: the parameters.
  """
  if isinstance(tx, FusedGradientTransformation):
    return tx.apply(grads, opt_state, params, None)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def clip_by_global_norm(tx: optax.GradientTransformation,
                        max_norm: float) -> optax.GradientTransformation:
  """`optax.chain(optax.clip_by_global_norm(max_norm), tx)`, keeping tx's fused step.

  The state is the chain's, `(EmptyState(), tx_state)`, whether tx is fused or not (checkpoints do
  not depend on it). For a fused tx the returned transformation's `apply` computes the clip scale
  min(1, max_norm / ||g||) once and passes it to `tx.apply`, so clipped gradients are never written.
  """
  chained = optax.chain(optax.clip_by_global_norm(max_norm), tx)
  if not isinstance(tx, FusedGradientTransformation):
    return chained

  def apply(grads, state, params, grad_scale=None):
    clip_state, inner_state = state
    g_norm = optax.tree.norm(grads)
    scale = jnp.where(g_norm < max_norm, jnp.float32(1.0),
                      jnp.float32(max_norm) / g_norm.astype(jnp.float32))
    if grad_scale is not None:
      scale = scale * grad_scale
    new_params, inner_state = tx.apply(grads, inner_state, params, scale)
    return new_params, (clip_state, inner_state)

  return FusedGradientTransformation(chained.init, chained.update, apply)


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over `cfg.warmup_steps`, then constant or cosine to the end.

  Cosine decays from `cfg.learning_rate` to `cfg.learning_rate * cfg.final_lr_fraction` at
  `total_steps`.
  """
  lr, warmup = float(cfg.learning_rate), int(cfg.warmup_steps)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(
        lr, decay_steps=max(total_steps - warmup, 1), alpha=float(cfg.final_lr_fraction))
  else:
    raise ConfigError(f"optim.schedule={cfg.schedule!r}: expected 'constant' or 'cosine'.")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def optimizer_factory(name: str) -> Callable[..., optax.GradientTransformation]:
  """The factory named by `config.optim.name`: "adamw" or a dotted "module.function" path."""
  if name == "adamw":
    return optax.adamw
  if not isinstance(name, str) or "." not in name:
    raise ConfigError(f"optim.name={name!r}: expected 'adamw' or a dotted factory path such as "
                      "'coat.optim.fp8_adamw'.")
  factory = registry.import_object(name, "optim.name")
  if not callable(factory):
    raise ConfigError(f"optim.name={name!r} is not callable.")
  return factory


def _takes(fn: Callable, name: str) -> bool:
  """Whether `fn`'s signature has a parameter called `name`."""
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                   placement: Any = None) -> optax.GradientTransformation:
  """Builds the optimizer named by `cfg.name` (module docstring), with global-norm clipping.

  Args:
    cfg: `config.optim`: name, learning-rate keys, b1, b2, eps, weight_decay, clip_norm (0: off),
      optional options (extra keyword arguments of the factory).
    total_steps: the run's length (for the cosine schedule).
    placement: the parameters' `common.sharding.ParamPlacement`, passed to factories whose
      signature has a `placement` argument (to lay their state out per shard); None: not passed.
  """
  lr = learning_rate_schedule(cfg, total_steps)
  factory = optimizer_factory(cfg.name)
  options = cfg.get("options", None) or {}
  if isinstance(options, ml_collections.ConfigDict):
    options = options.to_dict()
  if placement is not None and "placement" not in options and _takes(factory, "placement"):
    options = {**options, "placement": placement}
  try:
    opt = factory(lr, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                  weight_decay=float(cfg.weight_decay), **options)
  except TypeError as e:
    raise ConfigError(
        f"optim.name={cfg.name!r} must accept (learning_rate, *, b1, b2, eps, weight_decay, "
        f"**optim.options); calling it failed: {e}") from e
  if not isinstance(opt, optax.GradientTransformation):
    raise ConfigError(f"optim.name={cfg.name!r} returned {type(opt).__name__}, not an "
                      "optax.GradientTransformation.")
  if cfg.clip_norm and cfg.clip_norm > 0:
    opt = clip_by_global_norm(opt, float(cfg.clip_norm))
  return opt
