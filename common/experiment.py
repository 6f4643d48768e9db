"""One config assembled into jitted functions: init, train step and sampler.

`Experiment` knows nothing about the family it trains: the network class comes from
`config.model.name` (a dotted path, the other keys are its constructor arguments) and the diffusion
recipe from `config.diffusion` (docs/DESIGN.md).

The train state is a dict of pure pytrees, `{"step", "params", "opt_state", "ema"}`, placed on the
mesh by the logical axis names of the parameters.
"""

import functools
import importlib
import inspect

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from common import sharding
from common.data import dataset_info
from common.diffusion import make_diffusion
from common.ema import ema_update
from common.errors import ConfigError
from common.optim import learning_rate_schedule, make_optimizer


def model_class(model_cfg: ml_collections.ConfigDict):
  """Imports the network class named by `model_cfg.name` ("package.module.Class")."""
  name = model_cfg.get("name", None)
  if not name or "." not in name:
    raise ConfigError(f"config.model.name must be a dotted class path such as "
                      f"'sid2.model.ResidualUViT', got {name!r}.")
  module_name, cls_name = name.rsplit(".", 1)
  try:
    cls = getattr(importlib.import_module(module_name), cls_name)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"config.model.name={name!r} cannot be imported: {e}") from e
  return cls


def build_model(model_cfg: ml_collections.ConfigDict, key: jax.Array) -> nnx.Module:
  """Builds the network: `config.model.name(**other keys, rngs=nnx.Rngs(params=key))`."""
  cls = model_class(model_cfg)
  kwargs = {k: v for k, v in model_cfg.to_dict().items() if k != "name"}
  params = inspect.signature(cls.__init__).parameters
  if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
      raise ConfigError(f"config.model has keys that {model_cfg.name} does not take: {unknown}. "
                        f"It takes: {sorted(k for k in params if k not in ('self', 'rngs'))}.")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return cls(**kwargs, rngs=nnx.Rngs(params=key))


class Experiment:
  """Jitted init / train-step / sample functions for one config on one mesh."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    self.rules = tuple(tuple(r) for r in config.mesh.rules)
    self.recipe = make_diffusion(config.diffusion)
    self.total_steps = int(config.train.steps)
    self.tx = make_optimizer(config.optim, self.total_steps)
    self.lr_schedule = learning_rate_schedule(config.optim, self.total_steps)

    abstract_model = nnx.eval_shape(lambda: build_model(config.model, jax.random.key(0)))
    self.graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(abstract_rest):
      raise ConfigError(f"{config.model.name} holds non-parameter state "
                        f"({list(nnx.to_pure_dict(abstract_rest))}); networks must keep only "
                        "nnx.Param variables (dropout takes a key argument instead of stored rngs).")
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    self.abstract_params = nnx.to_pure_dict(abstract_params)
    self.param_shardings = sharding.tree_shardings(self.abstract_params, logical, mesh, self.rules)
    self.num_params = sum(x.size for x in jax.tree.leaves(self.abstract_params))

    abstract_state = jax.eval_shape(self._init, jax.random.key(0))
    self.state_shardings = self._state_shardings(abstract_state)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, self.state_shardings)
    self._samplers = {}

  # ---- state ------------------------------------------------------------------------------------
  def _init(self, key):
    model = build_model(self.config.model, key)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params), "ema": params}

  def _state_shardings(self, abstract_state):
    rep = sharding.replicated(self.mesh)

    def like_param(value, param_sharding, param):
      # A copy of the parameter (AdamW's m, v) is sharded like it; anything else at a parameter's
      # place in the optimizer state (e.g. COAT's FP8 groups [n_groups, 128]) is replicated.
      if isinstance(value, (jax.ShapeDtypeStruct, jax.Array)) and value.shape == param.shape:
        return param_sharding
      return jax.tree.map(lambda _: rep, value)

    opt = optax.tree_map_params(
        self.tx, like_param, abstract_state["opt_state"], self.param_shardings,
        self.abstract_params, transform_non_params=lambda v: jax.tree.map(lambda _: rep, v),
        is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
    return {"step": rep, "params": self.param_shardings, "opt_state": opt,
            "ema": self.param_shardings}

  def init_state(self, seed: int):
    """Initial train state, created directly on the mesh."""
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    return init(jax.random.fold_in(jax.random.key(seed), 0))

  # ---- training -----------------------------------------------------------------------------------
  def _merge(self, params):
    return nnx.merge(self.graphdef, params)

  def _loss(self, params, batch, key):
    model = self._merge(params)
    k_cond, k_loss, k_drop = jax.random.split(key, 3)
    cond = batch["label"]
    uncond = model.null_cond(cond)
    p = float(self.config.train.cond_drop_prob)
    if p > 0:
      keep = jax.random.bernoulli(k_cond, 1.0 - p, (batch["image"].shape[0],))
      cond = jax.tree.map(
          lambda c, u: jnp.where(keep.reshape((-1,) + (1,) * (c.ndim - 1)), c, u), cond, uncond)
    apply_fn = functools.partial(_apply, model, dropout_key=k_drop)
    return self.recipe.loss(apply_fn, batch["image"], cond, k_loss).mean()

  def _train_step(self, state, batch, key):
    loss, grads = jax.value_and_grad(self._loss)(state["params"], batch, key)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    ema = ema_update(state["ema"], params, step, decay=float(self.config.train.ema_decay),
                     start_step=int(self.config.train.ema_start_step),
                     warmup=bool(self.config.train.ema_warmup))
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": self.lr_schedule(state["step"])}
    return {"step": step, "params": params, "opt_state": opt_state, "ema": ema}, metrics

  @functools.cached_property
  def train_step(self):
    """`(state, batch, key) -> (state, metrics)`; the input state's buffers are donated."""
    batch_shardings = {"image": sharding.batch_sharding(self.mesh, self.rules, 4),
                       "label": sharding.batch_sharding(self.mesh, self.rules, 1)}
    return jax.jit(self._train_step, donate_argnums=0,
                   in_shardings=(self.state_shardings, batch_shardings, None),
                   out_shardings=(self.state_shardings, None))

  def step_key(self, step: int) -> jax.Array:
    """The PRNG key of a train step: a function of (seed, step) only, so resumed runs match."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), 1), step)

  # ---- sampling -----------------------------------------------------------------------------------
  @functools.cached_property
  def info(self):
    """The dataset's image size, channels and classes (read lazily: a train step needs no data)."""
    return dataset_info(self.config.data)

  @property
  def sample_shape(self) -> tuple[int, int, int]:
    return (self.info.image_size, self.info.image_size, self.info.channels)

  def sample_labels(self, n: int, offset: int = 0) -> jax.Array:
    """Class labels 0, 1, ..., C-1, 0, 1, ... (zeros for unconditional data)."""
    c = max(self.info.num_classes, 1)
    return (jnp.arange(offset, offset + n) % c).astype(jnp.int32)

  def _sample(self, params, key, cond, *, sampler, num_steps, guidance_scale, guidance_interval,
              churn):
    model = self._merge(params)
    shape = (cond.shape[0],) + self.sample_shape
    return self.recipe.sample(
        functools.partial(_apply, model), key, shape, cond, model.null_cond(cond),
        sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
        guidance_interval=guidance_interval, churn=churn)

  def sampler(self, *, sampler: str, num_steps: int, guidance_scale: float,
              guidance_interval, churn: float = 0.0):
    """A jitted `(params, key, labels [B]) -> images [B, H, W, C] in [-1, 1]`, compiled once.

    Samplers are cached by their settings, so periodic sample grids reuse one compilation.
    """
    kw = dict(sampler=sampler, num_steps=int(num_steps), guidance_scale=float(guidance_scale),
              guidance_interval=tuple(float(g) for g in guidance_interval), churn=float(churn))
    key = tuple(sorted(kw.items()))
    if key not in self._samplers:
      self._samplers[key] = jax.jit(functools.partial(self._sample, **kw),
                                    in_shardings=(self.param_shardings, None, None))
    return self._samplers[key]

  def config_sampler(self, **overrides):
    """The sampler described by `config.sample`, with keyword overrides."""
    s = self.config.sample
    kw = dict(sampler=s.sampler, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
              guidance_interval=s.guidance_interval, churn=s.get("churn", 0.0))
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return self.sampler(**kw)


def _apply(model, x, noise_cond, cond, dropout_key=None):
  return model(x, noise_cond, cond, dropout_key=dropout_key)
