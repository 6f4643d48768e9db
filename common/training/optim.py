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
  `common.training.sharding.ParamPlacement` (mesh and spec by parameter path), to lay its state out per
  device shard.

Fused in-place steps: a factory may return a `FusedGradientTransformation`, an
`optax.GradientTransformation` (init and update work as usual, so optax utilities keep working) that
also offers `apply(grads, state, params, grad_scale) -> (new_params, new_state)`, which writes the
new parameters directly (e.g. a kernel whose outputs alias the donated parameter buffers) instead of
returning an update that `optax.apply_updates` writes again. `apply_gradients` uses it when present;
global-norm clipping passes its scale into the fused step instead of materialising clipped gradients.

Per-parameter learning rates (`config.optim.lr_multipliers`): ((parameter-path regex, multiplier),
...) pairs. A parameter's path is the "/"-join of its keys in the nested params dict (e.g.
"blocks/3/mlp/experts/w1/kernel"); the first rule whose regex `re.fullmatch`es it sets its learning
rate to multiplier x the schedule's, unmatched parameters keep x1. As a torch param group with its
own lr, the multiplier k scales the parameter's whole step, the decoupled weight decay included
(AdamW, Loshchilov & Hutter, arXiv 1711.05101, Alg. 2 line 12, k joining the schedule multiplier:
p <- p - k lr_t (m_hat / (sqrt(v_hat) + eps) + wd p)); the moments are untouched. For an optax
optimizer the update is multiplied per leaf (every optax optimizer built from a `learning_rate` is
linear in it); a `FusedGradientTransformation` built with `accepts_lr_scale=True` receives the
per-leaf scales in `apply(..., lr_scale=tree)` and multiplies its learning rate itself (one fused
in-place step as before); one without it falls back to `update` + `optax.apply_updates`. The
optimizer state keeps the structure it has without multipliers, so checkpoints do not depend on
them.
"""

from collections.abc import Callable, Sequence
import inspect
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from common import registry
from common.errors import ConfigError
# A parameter's path: its keys in the nested params dict joined with "/" ("blocks/3/mlp/w1/kernel").
from common.weights.tree_names import key_path_str as param_path

# apply(grads, state, params, grad_scale[, lr_scale]) -> (new_params, new_state); grad_scale is
# None or an fp32 scalar that multiplies every gradient (global-norm clipping); lr_scale (only
# passed to a transformation built with accepts_lr_scale=True) is None or a pytree like params of
# floats that multiply each parameter's learning rate.
ApplyFn = Callable[[Any, Any, Any, jax.Array | None], tuple[Any, Any]]


class FusedGradientTransformation(optax.GradientTransformation):
  """An optax transformation with a fused step that updates the parameters in place.

  It is an `optax.GradientTransformation` (a NamedTuple of init and update), so `tx.init`,
  `tx.update`, `optax.chain` and `optax.tree_map_params` work unchanged; `apply` is an extra
  attribute. `update` followed by `optax.apply_updates` and `apply` compute the same step.

  Attributes:
    init: as optax: params -> state.
    update: as optax: (grads, state, params) -> (updates, state).
    apply: (grads, state, params, grad_scale[, lr_scale]) -> (new_params, new_state); grad_scale
      is None or an fp32 scalar the gradients are multiplied by before the step.
    accepts_lr_scale: whether `apply` takes the keyword `lr_scale` (None or a pytree like params
      of floats multiplying each parameter's learning rate: `optim.lr_multipliers`).
  """

  def __new__(cls, init, update, apply: ApplyFn, *, accepts_lr_scale: bool = False):
    obj = super().__new__(cls, init, update)
    obj.apply = apply
    obj.accepts_lr_scale = bool(accepts_lr_scale)
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
  """Linear warmup from 0 over `cfg.warmup_steps`, then constant, cosine or step to the end.

  The schedule is a function of the optimizer's step count (0 for the first update). Cosine
  decays from `cfg.learning_rate` to `cfg.learning_rate * cfg.final_lr_fraction` at
  `total_steps`. "step" keeps `cfg.learning_rate` until `cfg.lr_switch_step` (counted from the
  first step, warmup included) and `cfg.lr_after_switch` from then on (TerDiT, arXiv 2405.14854
  Sec. 4.1: 5e-4, then 1e-4).
  """
  lr, warmup = float(cfg.learning_rate), int(cfg.warmup_steps)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(
        lr, decay_steps=max(total_steps - warmup, 1), alpha=float(cfg.final_lr_fraction))
  elif cfg.schedule == "step":
    switch = int(cfg.get("lr_switch_step", 0) or 0)
    if switch < max(warmup, 1):
      raise ConfigError(f"optim.schedule='step' needs optim.lr_switch_step >= max(1, "
                        f"optim.warmup_steps={warmup}), got {switch}.")
    if not float(cfg.get("lr_after_switch", 0.0) or 0.0) > 0.0:
      raise ConfigError("optim.schedule='step' needs optim.lr_after_switch > 0 (the learning "
                        "rate from optim.lr_switch_step on).")
    after = optax.join_schedules(
        [optax.constant_schedule(lr), optax.constant_schedule(float(cfg.lr_after_switch))],
        [switch - warmup])
  else:
    raise ConfigError(f"optim.schedule={cfg.schedule!r}: expected 'constant', 'cosine' or "
                      "'step'.")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _parse_multipliers(rules: Sequence[Any]) -> list[tuple[re.Pattern, float, str]]:
  parsed = []
  for i, rule in enumerate(rules or ()):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"optim.lr_multipliers[{i}] = {rule!r}: expected (parameter-path regex, "
                        "multiplier).")
    pattern, mult = rule
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"optim.lr_multipliers[{i}]: bad regex {pattern!r}: {e}") from e
    try:
      mult = float(mult)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"optim.lr_multipliers[{i}]: multiplier {mult!r} is not a number.") from e
    if not mult >= 0.0:
      raise ConfigError(f"optim.lr_multipliers[{i}]: multiplier {mult} must be >= 0.")
    parsed.append((regex, mult, pattern))
  return parsed


def lr_scale_tree(params: Any, rules: Sequence[Any]) -> Any:
  """Each parameter's learning-rate multiplier: a pytree like `params` of Python floats.

  Args:
    params: the parameters (arrays or ShapeDtypeStructs), a nested dict.
    rules: `optim.lr_multipliers`, ((path regex, multiplier), ...); the first rule whose regex
      fullmatches a parameter's path (`param_path`) decides, unmatched parameters get 1.0.
  Raises:
    ConfigError: a malformed rule, or one whose regex matches no parameter path at all (a typo
      would otherwise silently train those parameters at the full rate).
  """
  parsed = _parse_multipliers(rules)
  used = set()

  def scale(key_path, _):
    path = param_path(key_path)
    chosen = None
    for i, (regex, mult, _) in enumerate(parsed):
      if regex.fullmatch(path):
        used.add(i)
        if chosen is None:
          chosen = mult
    return 1.0 if chosen is None else chosen

  tree = jax.tree_util.tree_map_with_path(scale, params)
  unused = [p for i, (_, _, p) in enumerate(parsed) if i not in used]
  if unused:
    paths = [param_path(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ConfigError(f"optim.lr_multipliers: {unused} match no parameter path. Paths look like "
                      f"{paths[:8]} ...")
  return tree


def scale_learning_rates(tx: optax.GradientTransformation,
                         scales: Any) -> optax.GradientTransformation:
  """`tx` with each parameter's learning rate multiplied by its entry of `scales`.

  The state is tx's own (same structure). The updates of `tx.update` are multiplied per leaf;
  a fused `tx` that accepts `lr_scale` keeps its in-place step and gets `scales` there, any other
  fused `tx` is used through `update` (see the module docstring).

  Args:
    tx: the optimizer.
    scales: a pytree like the params of Python floats (`lr_scale_tree`).
  """
  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    return jax.tree.map(lambda u, s: u if s == 1.0 else u * jnp.asarray(s, u.dtype),
                        updates, scales), state

  if isinstance(tx, FusedGradientTransformation) and tx.accepts_lr_scale:
    def apply(grads, state, params, grad_scale=None):
      return tx.apply(grads, state, params, grad_scale, lr_scale=scales)
    return FusedGradientTransformation(tx.init, update, apply)
  return optax.GradientTransformation(tx.init, update)


def optimizer_factory(name: str) -> Callable[..., optax.GradientTransformation]:
  """The factory named by `config.optim.name`: "adamw" or a dotted "module.function" path."""
  if name == "adamw":
    return optax.adamw
  if not isinstance(name, str) or "." not in name:
    raise ConfigError(f"optim.name={name!r}: expected 'adamw' or a dotted factory path such as "
                      "'coat.optim.fp8_adamw'.")
  factory = registry.import_object(name, "optim.name", "optimizer", short=("adamw",))
  if not callable(factory):
    raise ConfigError(f"optim.name={name!r} is not callable.")
  return factory


def _takes(fn: Callable, name: str) -> bool:
  """Whether `fn`'s signature has a parameter called `name`."""
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, params: Any = None,
                   placement: Any = None) -> optax.GradientTransformation:
  """Builds the optimizer named by `cfg.name` (module docstring), with per-parameter learning-rate
  multipliers and global-norm clipping.

  Args:
    cfg: `config.optim`: name, learning-rate keys, b1, b2, eps, weight_decay, clip_norm (0: off),
      optional options (extra keyword arguments of the factory) and lr_multipliers.
    total_steps: the run's length (for the cosine schedule).
    params: the parameters (arrays or ShapeDtypeStructs); needed only when `cfg.lr_multipliers`
      is not empty, to resolve its regexes against the parameter paths.
    placement: the parameters' `common.training.sharding.ParamPlacement`, passed to factories whose
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
  rules = tuple(cfg.get("lr_multipliers", ()) or ())
  if rules:
    if params is None:
      raise ValueError("make_optimizer needs `params` to resolve optim.lr_multipliers.")
    opt = scale_learning_rates(opt, lr_scale_tree(params, rules))
  if cfg.clip_norm and cfg.clip_norm > 0:
    opt = clip_by_global_norm(opt, float(cfg.clip_norm))
  return opt
