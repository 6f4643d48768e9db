"""One config assembled into jitted functions: init, train step and generation.

`Experiment` knows nothing about the family, modality or objective it trains (docs/DESIGN.md): the
network class comes from `config.model.name` (a dotted path, the other keys are its constructor
arguments), the objective from `config.diffusion` (`common.diffusion.recipes.make_diffusion`: "vp", "edm" or
a dotted recipe class), the optimizer from `config.optim`. A batch is a dict pytree
{"x": [B, H, W, C], "cond": pytree} that flows through whole.

The train state is a dict of pure pytrees, `{"step", "params", "opt_state", "ema"}`, placed on the
mesh by the logical axis names of the parameters.
"""

import functools
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common.training import contracts
from common.nn import numerics
from common import registry
from common.training import sharding
from common.autoencoders import load_autoencoder
from common.diffusion.recipes import make_diffusion, recipe_class
from common.training.ema import ema_update
from common.errors import ConfigError, ShapeError
from common.nn.network import build_model, model_class
from common.training.optim import (apply_gradients, learning_rate_schedule, make_optimizer,
                          optimizer_factory)
from common.text import load_text_encoder


def numerics_rules(config: ml_collections.ConfigDict) -> tuple:
  """`config.numerics.rules` followed by the rules of the precision mode `config.precision`
  (`common.nn.numerics.config_rules`); empty for a bf16 config without rules."""
  return numerics.config_rules(config)


def resolve_plugins(config: ml_collections.ConfigDict) -> None:
  """Resolves every plug-in name in `config` (network, recipe, precision mode, numerics rules,
  optimizer, init_from converter) without building anything. Under `registry.from_file` this
  refuses a config read from a file that names anything unregistered, even in a key the mode at
  hand would not use; raises ConfigError."""
  model_class(config.model)
  if config.diffusion.get("name", None) not in ("vp", "edm"):
    recipe_class(config.diffusion.get("name", None))
  numerics.parse_rules(numerics.config_rules(config))
  optim = numerics.optim_config(config)
  optimizer_factory(optim.get("name", "adamw"))
  converter = config.get("init_from", {}).get("converter", "")
  if converter:
    registry.import_object(converter, "init_from.converter", "converter")


SAMPLE_KEYS = ("sampler", "num_steps", "guidance_scale", "guidance_interval", "churn")


class Experiment:
  """Jitted init / train-step / generation functions for one config on one mesh."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
               deployed: bool = False):
    """Args:
      config: the experiment config.
      mesh: the device mesh.
      deployed: use the network's inference form (`common.weights.deployment.deploy`: each layer with a
        `deployed()` method swapped, e.g. packed ternary weights). Such an Experiment only
        generates: its `params` hold every variable of the deployed network and it has no train
        state (`abstract_state` is None).
    """
    self.config, self.mesh, self.deployed = config, mesh, deployed
    self.rules = tuple(tuple(r) for r in config.mesh.rules)
    self.recipe = make_diffusion(config.diffusion)
    self.total_steps = int(config.train.steps)
    self.grad_accum = int(config.train.get("grad_accum_steps", 1))
    if self.grad_accum < 1 or config.train.batch_size % self.grad_accum:
      raise ConfigError(f"train.grad_accum_steps={self.grad_accum} must be >= 1 and divide "
                        f"train.batch_size={config.train.batch_size}.")
    self.lr_schedule = learning_rate_schedule(config.optim, self.total_steps)

    abstract_model = nnx.eval_shape(
        lambda: build_model(config.model, jax.random.key(0), numerics_rules(config),
                            deployed=deployed))
    contracts.check_network(abstract_model, self.recipe.network,
                            f"config.model.name={config.model.name!r}")
    if deployed:
      self.graphdef, abstract_params = nnx.split(abstract_model)
      abstract_rest = None
    else:
      self.graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    if abstract_rest is not None and jax.tree.leaves(abstract_rest):
      raise ConfigError(f"{config.model.name} holds non-parameter state "
                        f"({list(nnx.to_pure_dict(abstract_rest))}); networks must keep only "
                        "nnx.Param variables (dropout takes a key argument instead of stored rngs).")
    self.abstract_model = abstract_model
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    self.abstract_params = nnx.to_pure_dict(abstract_params)
    self.param_shardings = sharding.tree_shardings(
        self.abstract_params, logical, mesh, self.rules,
        replicated=tuple(config.mesh.get("replicated", ()) or ()))
    self.placement = sharding.ParamPlacement.from_shardings(mesh, self.param_shardings)
    self.num_params = sum(x.size for x in jax.tree.leaves(self.abstract_params))
    self._generators = {}
    if deployed:  # an inference graph: no optimizer, no train state
      self.tx = self.abstract_state = self.state_shardings = None
      return
    self.tx = make_optimizer(numerics.optim_config(config), self.total_steps, self.abstract_params,
                             placement=self.placement)

    abstract_state = jax.eval_shape(self._init, jax.random.key(0))
    self.state_shardings = self._state_shardings(abstract_state)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, self.state_shardings)

  # ---- state ------------------------------------------------------------------------------------
  def _init(self, key):
    model = build_model(self.config.model, key, numerics_rules(self.config))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params), "ema": params}

  def _state_shardings(self, abstract_state):
    """NamedShardings of the train state, declared by path (`common.training.sharding.state_partition`):
    params and EMA by their logical names, optimizer-state copies of a parameter like it,
    optimizer-state objects by their own `partition_specs`, everything else replicated."""
    param_specs = jax.tree.map(lambda s: s.spec, self.param_shardings)
    opt_specs = sharding.state_partition(self.tx, abstract_state["opt_state"],
                                         self.abstract_params, param_specs)
    opt = jax.tree.map(lambda spec: jax.sharding.NamedSharding(self.mesh, spec), opt_specs,
                       is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    rep = sharding.replicated(self.mesh)
    return {"step": rep, "params": self.param_shardings, "opt_state": opt,
            "ema": self.param_shardings}

  def init_state(self, seed: int):
    """Initial train state, created directly on the mesh."""
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    return init(jax.random.fold_in(jax.random.key(seed), 0))

  # ---- the network's inputs ------------------------------------------------------------------------
  def example_inputs(self, batch_size: int):
    """(x, cond) ShapeDtypeStructs of `batch_size` examples, as the network declares them."""
    return self.abstract_model.example_inputs(batch_size)

  @property
  def num_classes(self) -> int:
    """The classes of a class-conditional network (one that declares cond["label"]: it is a
    `common.training.contracts.ClassConditional`), else 0."""
    return int(self.abstract_model.num_classes) if "label" in self.example_inputs(1)[1] else 0

  @property
  def sample_shape(self) -> tuple[int, ...]:
    """The shape of one example the network denoises ([H, W, C]: pixels or latents)."""
    return tuple(self.example_inputs(1)[0].shape[1:])

  def model_batch(self, batch: dict) -> dict:
    """`batch` with only the conditioning the network declares (`example_inputs`): a data set may
    carry more (class labels beside captions; labels an autoencoder ignores), which stays on the
    host. Raises ShapeError unless x and every declared condition have the declared shapes, and
    ConfigError if a declared class label is missing (-1) from the data."""
    b = int(np.shape(batch.get("x"))[0]) if "x" in batch else 0
    x_spec, cond_spec = self.example_inputs(max(b, 1))
    cond = batch.get("cond", {})
    want = {"x": tuple(x_spec.shape), "cond": jax.tree.map(lambda s: tuple(s.shape), cond_spec)}
    kept = {k: cond[k] for k in cond_spec if k in cond}
    got = {"x": tuple(np.shape(batch.get("x"))), "cond": jax.tree.map(np.shape, kept)}
    if got != want:
      raise ShapeError(f"the data batch has shapes {got} (of cond keys {sorted(cond)}) but "
                       f"{self.config.model.name} (config.model) expects {want}: check config.data "
                       "against config.model.")
    if "label" in kept and np.size(kept["label"]) and int(np.min(kept["label"])) < 0:
      raise ConfigError(f"{self.config.model.name} is class-conditional but the data has no class "
                        f"label for some examples (label -1, e.g. a captioned image folder or COCO "
                        "latents): train it on labelled data (Fashion-MNIST, ImageNet latents).")
    num_classes = self.config.model.get("num_classes", None)
    if ("label" in kept and num_classes and np.size(kept["label"])
        and int(np.max(kept["label"])) >= int(num_classes)):
      raise ConfigError(f"the data has class label {int(np.max(kept['label']))} but "
                        f"config.model.num_classes={num_classes}: set it to the dataset's number "
                        "of classes")
    return {"x": batch["x"], "cond": kept}

  # ---- training -----------------------------------------------------------------------------------
  def _merge(self, params):
    return nnx.merge(self.graphdef, params)

  def _loss(self, params, batch, key, caches=None):
    # The mesh is visible while tracing, so networks may pin activation shardings
    # (`jax.lax.with_sharding_constraint` with a bare PartitionSpec, e.g. MicroDiT's blocks).
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      model = self._merge(params)
      numerics.use_step_caches(model, caches)
      per_example, metrics = self.recipe.loss(model, batch, key)
    return per_example.mean(), metrics

  def _grads(self, params, batch, key):
    """(loss, metrics, grads), averaged over `train.grad_accum_steps` micro-batches.

    Micro-batch i holds rows i, i + k, i + 2k, ... of the batch, so each one keeps its share of
    every device's rows (no data moves between devices); its key is fold_in(key, i). Per-step
    caches of the layers (`common.nn.numerics.step_caches`, e.g. COAT's FP8 weights) are computed
    once, here, outside the micro-batch loop and without gradient.
    """
    caches = jax.lax.stop_gradient(numerics.step_caches(self._merge(params)))
    grad_fn = jax.value_and_grad(functools.partial(self._loss, caches=caches), has_aux=True)
    k = self.grad_accum
    if k == 1:
      (loss, metrics), grads = grad_fn(params, batch, key)
      return loss, metrics, grads
    micro = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0), batch)

    def body(carry, inputs):
      i, mb = inputs
      (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                         jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), key))
    (loss, metrics), grads = zeros
    total, _ = jax.lax.scan(body, (loss, metrics, grads), (jnp.arange(k), micro))
    return jax.tree.map(lambda v: v / k, total)

  def _train_step(self, state, batch, key):
    loss, metrics, grads = self._grads(state["params"], batch, key)
    params, opt_state = apply_gradients(self.tx, grads, state["opt_state"], state["params"])
    step = state["step"] + 1
    ema = ema_update(state["ema"], params, step, decay=float(self.config.train.ema_decay),
                     start_step=int(self.config.train.ema_start_step),
                     warmup=bool(self.config.train.ema_warmup))
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": self.lr_schedule(state["step"])}
    return {"step": step, "params": params, "opt_state": opt_state, "ema": ema}, metrics

  @functools.cached_property
  def train_step(self):
    """`(state, batch, key) -> (state, metrics)`; the input state's buffers are donated.

    The batch keeps the shardings `sharding.global_batch` gave its leaves (by rank)."""
    return jax.jit(self._train_step, donate_argnums=0,
                   in_shardings=(self.state_shardings, None, None),
                   out_shardings=(self.state_shardings, None))

  @functools.cached_property
  def eval_loss(self):
    """Jitted `(params, batch, key) -> mean loss` of the recipe, without gradients: the loss of
    given weights on given draws (e.g. to compare runs on identical batches, noise and times)."""
    return jax.jit(lambda params, batch, key: self._loss(params, batch, key)[0])

  def step_key(self, step: int) -> jax.Array:
    """The PRNG key of a train step: a function of (seed, step) only, so resumed runs match."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), 1), step)

  # ---- generation -----------------------------------------------------------------------------------
  def _generate(self, params, key, batch, *, settings):
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      return self.recipe.preview(self._merge(params), batch, key, settings)

  def generator(self, **settings):
    """A jitted `(params, key, batch) -> samples [B, *sample_shape] float32` with batch =
    {"x": [B, *sample_shape], "cond": pytree} (`preview_batch`): samples for the conditions (a
    diffusion recipe uses x only for its shape; an autoencoder reconstructs it). Compiled once per
    settings (config.sample's keys, overridable) and cached, so periodic grids reuse one
    compilation."""
    s = self.config.sample
    kw = {k: s.get(k) for k in SAMPLE_KEYS if s.get(k) is not None}
    kw.update({k: v for k, v in settings.items() if v is not None})
    kw["guidance_interval"] = tuple(float(g) for g in kw.get("guidance_interval", (-1e9, 1e9)))
    cache_key = tuple(sorted(kw.items()))
    if cache_key not in self._generators:
      self._generators[cache_key] = jax.jit(functools.partial(self._generate, settings=kw),
                                            in_shardings=(self.param_shardings, None, None))
    return self._generators[cache_key]

  @functools.cached_property
  def autoencoder(self):
    """The configured autoencoder (`config.autoencoder`, a spec for
    `common.autoencoders.load_autoencoder`), or None when the network works on pixels."""
    spec = self.config.get("autoencoder", "")
    if not spec:
      return None
    return load_autoencoder(spec)

  @functools.cached_property
  def text_encoder(self):
    """The configured text encoder (`config.text_encoder`), or None."""
    spec = self.config.get("text_encoder", "")
    if not spec:
      return None
    return load_text_encoder(spec)

  def to_images(self, samples) -> np.ndarray:
    """Samples of the network's space -> float32 images in [-1, 1] ([N, H, W, C]), decoded
    through the configured autoencoder when there is one."""
    if self.autoencoder is not None:
      samples = self.autoencoder.decode(jnp.asarray(samples))
    return np.asarray(jax.device_get(samples), np.float32)

  def preview_batch(self, n: int, offset: int = 0, prompts: Sequence[str] | None = None,
                    data_x: np.ndarray | None = None):
    """A batch for `generator`: `conditions(n, offset, prompts)` with x = `data_x` tiled to n rows
    (real data, for recipes that reconstruct) or zeros. Returns (batch, meaning)."""
    cond, meaning = self.conditions(n, offset, prompts)
    if data_x is None:
      x = np.zeros((n,) + self.sample_shape, np.float32)
    else:
      x = np.resize(np.asarray(data_x, np.float32), (n,) + tuple(np.shape(data_x)[1:]))
    return {"x": jnp.asarray(x), "cond": cond}, meaning

  def conditions(self, n: int, offset: int = 0, prompts: Sequence[str] | None = None):
    """The conditions of `n` samples and what they mean, for grids and sampling jobs.

    Text-conditional networks (`config.text_encoder` set) take `prompts` (or
    `config.sample.prompts`), cycled from `offset`; class-conditional ones cycle the classes
    0..C-1; unconditional ones get {}.

    Returns:
      (cond pytree of [n, ...] arrays, {"labels": int32 [n]} or {"prompts": [n] str} or {}).
    """
    _, spec = self.example_inputs(n)
    if self.text_encoder is None and set(spec) - {"label"}:
      raise ConfigError(f"{self.config.model.name} is conditioned on {sorted(spec)}, which prompts "
                        "give: set config.text_encoder (a local text encoder, or 'minilm') to "
                        "sample it.")
    if self.text_encoder is not None:
      prompts = list(prompts or self.config.sample.get("prompts", ()) or ())
      if not prompts:
        raise ConfigError("a text-conditional model samples from prompts: pass --prompts=FILE "
                          "(one a line) or set config.sample.prompts.")
      chosen = [prompts[(offset + i) % len(prompts)] for i in range(n)]
      enc = self.text_encoder.encode(chosen)
      cond = {k: jnp.asarray(enc[k]) for k in spec}
      want = jax.tree.map(lambda s: tuple(s.shape), spec)
      if jax.tree.map(lambda a: tuple(a.shape), cond) != want:
        raise ShapeError(f"text encoder {self.config.text_encoder!r} gives "
                         f"{jax.tree.map(np.shape, enc)}, the network expects {want}.")
      return cond, {"prompts": np.asarray(chosen)}
    if "label" in spec:
      labels = (np.arange(offset, offset + n) % self.num_classes).astype(np.int32)
      return {"label": jnp.asarray(labels)}, {"labels": labels}
    return {}, {}

  def check_generation(self, prompts: Sequence[str] | None = None) -> None:
    """Loads the configured text encoder and autoencoder and checks that they fit the network, on
    the conditions of one sample (`conditions(1, prompts=prompts)`): a missing encoder file, a
    text-conditional network without a text encoder or prompts, caption embeddings of the wrong
    shape or an autoencoder with other latent channels is one error before a run starts, not after
    its last checkpoint. The encoders stay loaded for the grids."""
    self.conditions(1, prompts=prompts)
    ae = self.autoencoder
    if ae is not None and ae.latent_channels != self.sample_shape[-1]:
      raise ShapeError(f"config.autoencoder={self.config.autoencoder!r} has {ae.latent_channels} "
                       f"latent channels but {self.config.model.name} denoises "
                       f"{list(self.sample_shape)}: set config.autoencoder to the one the latents "
                       "were made with.")

  def grid_columns(self, n_conditions: int | None = None) -> int:
    """Columns of a sample grid: one per class (up to 16), else 8."""
    c = self.num_classes
    if 0 < c <= 16:
      return c
    return n_conditions if n_conditions and n_conditions <= 16 else 8
