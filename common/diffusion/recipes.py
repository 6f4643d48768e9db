"""Diffusion recipes: VPDiffusion (logSNR; SiD / SiD2) and EDMDiffusion (Karras et al.; MicroDiT).

A recipe is what the trainer sees of a training objective (docs/DESIGN.md):

  recipe.loss(model, batch, key) -> (per-example loss [B] float32, metrics {name: scalar})
  recipe.preview(model, batch, key, settings) -> samples [B, H, W, C] float32 conditioned on
      batch["cond"] (shape from batch["x"]), drawn with `settings` (config.sample as a dict)
  recipe.network -> the Protocol its network implements (typed in common/training/contracts.py)

where `model(x_in, noise_cond, cond, dropout_key=None)` is the denoiser network
(`common.training.contracts.Denoiser`), returning F or (F, aux). Underneath, for any apply_fn(x_in [B, H, W, C], noise_cond [B] float32, cond) -> F:

  recipe.per_example_loss(apply_fn, x, cond, key) -> per-example loss [B] float32
  recipe.sample(apply_fn, key, shape, cond, uncond, *, sampler, num_steps, guidance_scale,
                guidance_interval) -> x0 [B, H, W, C] float32
  recipe.denoise(apply_fn, z, noise, cond) -> x_hat [B, H, W, C] float32

An `aux` dict may carry "loss_mask" (float32 [B, H, W], 1 where the loss counts: MicroDiT's kept
patches); the per-example loss is then the mean over those pixels only.
Everything is jit-compatible with `sampler` and `num_steps` static.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from common.training import contracts
from common.diffusion import losses
from common.diffusion import parametrization as param
from common import registry
from common.diffusion import samplers
from common.diffusion import schedules
from common.errors import ConfigError

ApplyFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _check_interval(guidance_interval) -> tuple[float, float] | None:
  if guidance_interval is None:
    return None
  try:
    lo, hi = (float(v) for v in guidance_interval)
  except (TypeError, ValueError) as e:
    raise ConfigError(
        f"guidance_interval must be (lo, hi) in logSNR, got {guidance_interval!r}.") from e
  if lo > hi:
    raise ConfigError(f"guidance_interval (lo, hi) needs lo <= hi, got {guidance_interval!r}.")
  return lo, hi


def _maybe_clip(x: jax.Array, clip_x: bool) -> jax.Array:
  return jnp.clip(x, -1.0, 1.0) if clip_x else x


def split_output(out) -> tuple[jax.Array, dict]:
  """A network's output F, or (F, aux), as (F float32, aux dict)."""
  if isinstance(out, tuple):
    f, aux = out
    return jnp.asarray(f, jnp.float32), dict(aux)
  return jnp.asarray(out, jnp.float32), {}


def _output_only(apply_fn: ApplyFn) -> ApplyFn:
  """apply_fn whose result is F alone (aux outputs dropped): what the samplers need."""
  return lambda x, noise, cond: split_output(apply_fn(x, noise, cond))[0]


def drop_condition(cond: Any, uncond: Any, prob: float, key: jax.Array) -> Any:
  """Replaces each example's condition by the unconditional one with probability `prob` (the
  classifier-free guidance dropout of Ho & Salimans 2022, arXiv 2207.12598 Sec. 3.2).

  cond, uncond: pytrees of [B, ...] arrays with the same structure.
  """
  leaves = jax.tree.leaves(cond)
  if prob <= 0 or not leaves:
    return cond
  keep = jax.random.bernoulli(key, 1.0 - prob, (leaves[0].shape[0],))
  return jax.tree.map(
      lambda c, u: jnp.where(keep.reshape((-1,) + (1,) * (c.ndim - 1)), c, u), cond, uncond)


class _DenoiserObjective:
  """The batch-level contract shared by the diffusion recipes (module docstring)."""

  network = contracts.Denoiser  # what they train (common.training.contracts.Recipe)
  cond_drop_prob: float

  def loss(self, model, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
    """Per-example loss [B] float32 of a batch {"x": [B, H, W, C], "cond": pytree}, and no
    extra metrics. The condition is dropped for CFG with probability `cond_drop_prob`; dropout
    inside the network draws from `key`."""
    k_cond, k_loss, k_drop = jax.random.split(key, 3)
    cond = batch.get("cond", {})
    cond = drop_condition(cond, model.null_cond(cond), float(self.cond_drop_prob), k_cond)
    apply_fn = lambda x, noise, c: model(x, noise, c, dropout_key=k_drop)
    return self.per_example_loss(apply_fn, batch["x"], cond, k_loss), {}

  def preview(self, model, batch: dict, key: jax.Array, settings: dict) -> jax.Array:
    """Samples [B, H, W, C] float32 for the conditions of `batch` (`settings`: the keyword
    arguments of `sample`, e.g. config.sample)."""
    cond = batch.get("cond", {})
    keys = {"sampler", "num_steps", "guidance_scale", "guidance_interval", "churn"}
    return self.sample(lambda x, noise, c: model(x, noise, c), key, batch["x"].shape, cond,
                       model.null_cond(cond), **{k: v for k, v in settings.items() if k in keys})


def _masked_error(out: jax.Array, tgt: jax.Array, aux: dict) -> jax.Array:
  """Per-example mean squared error [B], over the pixels of aux["loss_mask"] when present."""
  mask = aux.get("loss_mask")
  if mask is None:
    return losses.mean_sq_error(out, tgt)
  return losses.masked_mean_sq_error(out, tgt, mask)


@dataclasses.dataclass(frozen=True)
class VPDiffusion(_DenoiserObjective):
  """Variance-preserving diffusion in continuous time with a logSNR schedule (SiD, SiD2, VDM++).

  Training (VDM, arXiv 2107.00630; VDM++, arXiv 2303.00848): t ~ U(0, 1), lambda = schedule.logsnr(t), z = alpha x + sigma eps; the
  network gets (z, lambda) and predicts `prediction`; the loss is the weighted MSE of that target,
  weight = 1/2 (-d lambda/dt) w_target(lambda) for the sigmoid weighting (see common.diffusion.losses).

  Attributes:
    schedule: a logSNR schedule (common.diffusion.schedules).
    prediction: "v", "eps" or "x": what the network output F is.
    sigmoid_bias: b of the sigmoid weighting sigmoid(b - lambda) on the eps-loss.
    weighting: "sigmoid" (VDM++ with the Jacobian) or "uniform" (unweighted MSE of the target).
    clip_x: clip the final samples to [-1, 1].
    cond_drop_prob: probability of training on the unconditional condition (CFG dropout).
  """
  schedule: Any
  prediction: str = "v"
  sigmoid_bias: float = 0.0
  weighting: str = "sigmoid"
  clip_x: bool = False
  cond_drop_prob: float = 0.0

  def __post_init__(self):
    if self.prediction not in param.PREDICTIONS:
      raise ConfigError(f"Unknown diffusion.prediction {self.prediction!r}; choose one of "
                        f"{param.PREDICTIONS}.")
    if self.weighting not in losses.WEIGHTINGS:
      raise ConfigError(f"Unknown diffusion.weighting {self.weighting!r}; choose one of "
                        f"{losses.WEIGHTINGS}.")

  def denoise(self, apply_fn: ApplyFn, z: jax.Array, noise: jax.Array, cond: Any) -> jax.Array:
    """x_hat from the network. z: [B, H, W, C]; noise: logSNR lambda, [B] (or scalar). float32."""
    lam = jnp.broadcast_to(jnp.asarray(noise, jnp.float32), (z.shape[0],))
    out, _ = split_output(apply_fn(z, lam, cond))
    return param.convert(out, z, lam, self.prediction, "x")

  def per_example_loss(self, apply_fn: ApplyFn, x: jax.Array, cond: Any,
                       key: jax.Array) -> jax.Array:
    """Per-example weighted loss [B] float32 (mean over pixels, or over aux["loss_mask"]).

    x: [B, H, W, C] data."""
    x = jnp.asarray(x, jnp.float32)
    b = x.shape[0]
    key_t, key_eps = jax.random.split(key)
    t = jax.random.uniform(key_t, (b,), jnp.float32)
    lam = self.schedule.logsnr(t)
    eps = jax.random.normal(key_eps, x.shape, jnp.float32)
    z = param.diffuse(x, eps, lam)
    out, aux = split_output(apply_fn(z, lam, cond))
    tgt = param.target(self.prediction, x, eps, lam)
    weight = losses.vp_loss_weight(lam, self.schedule.neg_dlogsnr_dt(t), self.prediction,
                                   self.weighting, self.sigmoid_bias)
    return weight * _masked_error(out, tgt, aux)

  def sample(self, apply_fn: ApplyFn, key: jax.Array, shape: Sequence[int], cond: Any,
             uncond: Any = None, *, sampler: str = "ddpm", num_steps: int = 128,
             guidance_scale: float | jax.Array = 1.0,
             guidance_interval: Sequence[float] | None = None, churn: float = 0.0) -> jax.Array:
    """Draws samples [B, H, W, C] float32, starting from z ~ N(0, I) at lambda(t = 1).

    The grid is uniform in t: the network is evaluated at lambda(t_i), t_i = 1 - i/N, i < N, and the
    last step goes to clean data (lambda = +inf), returning the last x_hat; lambda(t = 0) itself is
    never used (VDM-style final denoising step).

    Args:
      apply_fn: the network.
      key: PRNG key.
      shape: [B, H, W, C] (static).
      cond, uncond: conditional and unconditional cond pytrees ([B, ...] leaves).
      sampler: "ddpm" (ancestral) or "ddim" (static).
      num_steps: network evaluations per sample (x2 batch inside the guidance interval) (static).
      guidance_scale: CFG weight w (1: conditional model only).
      guidance_interval: (lo, hi) in this schedule's logSNR; None: guide everywhere.
      churn: must be 0 (EDM-only option; accepted for a uniform signature).
    """
    if sampler not in ("ddpm", "ddim"):
      raise ConfigError(f"Unknown sampler {sampler!r} for VP diffusion; choose 'ddpm' or 'ddim'.")
    if not (isinstance(churn, (int, float)) and float(churn) == 0.0):
      raise ConfigError("churn is an EDM (heun) option; VP samplers need churn = 0.")
    if num_steps < 1:
      raise ConfigError(f"num_steps must be >= 1, got {num_steps}.")
    interval = _check_interval(guidance_interval)
    batch = shape[0]
    apply_fn = _output_only(apply_fn)

    def denoise_fn(z, lam):
      lam_b = jnp.full((batch,), lam, jnp.float32)
      out = samplers.guided_apply(apply_fn, z, lam_b, cond, uncond, guidance_scale, lam, interval)
      return param.convert(out, z, lam_b, self.prediction, "x")

    logsnrs = samplers.vp_logsnr_grid(self.schedule, num_steps)
    x0 = samplers.vp_sample(denoise_fn, key, shape, logsnrs, sampler=sampler)
    return _maybe_clip(x0, self.clip_x)


@dataclasses.dataclass(frozen=True)
class EDMDiffusion(_DenoiserObjective):
  """EDM (Karras et al. 2022) as used by MicroDiT (micro_diffusion `models/model.py`).

  Training: ln sigma ~ N(p_mean, p_std^2), n = sigma eps; the network gets c_in (x + n) and
  c_noise = ln(sigma)/4; D = c_skip (x + n) + c_out F; loss = (sigma^2 + sd^2)/(sigma sd)^2 
  ||D - x||^2 (mean over pixels).

  Attributes:
    sigma_data: data std sd.
    p_mean, p_std: training noise distribution.
    sigma_min, sigma_max, rho: sampling grid (eq. 5).
    clip_x: clip the final samples to [-1, 1].
    cond_drop_prob: probability of training on the unconditional condition (CFG dropout).
  """
  sigma_data: float = 0.5
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  clip_x: bool = False
  cond_drop_prob: float = 0.0

  def __post_init__(self):
    if not self.sigma_data > 0 or not self.p_std >= 0 or not 0 < self.sigma_min < self.sigma_max:
      raise ConfigError("EDM diffusion needs sigma_data > 0, p_std >= 0 and 0 < sigma_min < "
                        f"sigma_max; got {self}.")

  def denoise(self, apply_fn: ApplyFn, z: jax.Array, noise: jax.Array, cond: Any) -> jax.Array:
    """D(z; sigma). z = x + n: [B, H, W, C] (unscaled); noise: sigma, [B] (or scalar). float32."""
    d, _ = self._denoise_aux(apply_fn, z, noise, cond)
    return d

  def _denoise_aux(self, apply_fn: ApplyFn, z: jax.Array, noise: jax.Array, cond: Any):
    z = jnp.asarray(z, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(noise, jnp.float32), (z.shape[0],))
    c_skip, c_out, c_in, c_noise = param.edm_precond(sigma, self.sigma_data)
    out, aux = split_output(apply_fn(param.broadcast_like(c_in, z) * z, c_noise, cond))
    return param.broadcast_like(c_skip, z) * z + param.broadcast_like(c_out, z) * out, aux

  def per_example_loss(self, apply_fn: ApplyFn, x: jax.Array, cond: Any,
                       key: jax.Array) -> jax.Array:
    """Per-example EDM loss [B] float32 (mean over pixels, or over aux["loss_mask"]).

    x: [B, H, W, C] data."""
    x = jnp.asarray(x, jnp.float32)
    key_s, key_n = jax.random.split(key)
    sigma = schedules.sample_lognormal_sigma(key_s, (x.shape[0],), self.p_mean, self.p_std)
    n = param.broadcast_like(sigma, x) * jax.random.normal(key_n, x.shape, jnp.float32)
    d, aux = self._denoise_aux(apply_fn, x + n, sigma, cond)
    return losses.edm_loss_weight(sigma, self.sigma_data) * _masked_error(d, x, aux)

  def sample(self, apply_fn: ApplyFn, key: jax.Array, shape: Sequence[int], cond: Any,
             uncond: Any = None, *, sampler: str = "heun", num_steps: int = 32,
             guidance_scale: float | jax.Array = 1.0,
             guidance_interval: Sequence[float] | None = None, churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> jax.Array:
    """Draws samples [B, H, W, C] float32 with EDM Heun (Alg. 2) from x_0 ~ N(0, sigma_max^2).

    Args:
      apply_fn, key, shape, cond, uncond, num_steps, guidance_scale: as for VPDiffusion.sample.
      sampler: "heun" (static).
      guidance_interval: (lo, hi) in normalized logSNR lambda = log(sigma_data^2 / sigma^2),
        checked at the sigma of each network evaluation; None: guide everywhere.
      churn, s_tmin, s_tmax, s_noise: S_churn, S_tmin, S_tmax, S_noise (churn = 0: deterministic).
    """
    if sampler != "heun":
      raise ConfigError(f"Unknown sampler {sampler!r} for EDM diffusion; use 'heun'.")
    if num_steps < 1:
      raise ConfigError(f"num_steps must be >= 1, got {num_steps}.")
    interval = _check_interval(guidance_interval)
    batch = shape[0]
    apply_fn = _output_only(apply_fn)

    def denoise_fn(x, sigma):
      sigma_b = jnp.full((batch,), sigma, jnp.float32)
      c_skip, c_out, c_in, c_noise = param.edm_precond(sigma, self.sigma_data)
      lam = param.edm_logsnr(sigma, self.sigma_data)
      out = samplers.guided_apply(apply_fn, c_in * x, jnp.broadcast_to(c_noise, sigma_b.shape),
                                  cond, uncond, guidance_scale, lam, interval)
      return c_skip * x + c_out * out

    sigmas = schedules.edm_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)
    x0 = samplers.edm_heun_sample(denoise_fn, key, shape, sigmas, churn=churn, s_tmin=s_tmin,
                                  s_tmax=s_tmax, s_noise=s_noise)
    return _maybe_clip(x0, self.clip_x)


_VP_KEYS = {"name", "schedule", "prediction", "sigmoid_bias", "weighting", "clip_x",
            "cond_drop_prob"}
_EDM_KEYS = {"name", "sigma_data", "p_mean", "p_std", "sigma_min", "sigma_max", "rho", "clip_x",
             "cond_drop_prob"}


def _to_dict(cfg) -> dict[str, Any]:
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


def recipe_class(name: Any) -> Any:
  """The recipe class that a dotted `config.diffusion.name` names (a registered one when the config
  was read from a file: `common.registry`)."""
  return registry.import_object(name, "config.diffusion.name", "diffusion", short=("vp", "edm"))


def make_diffusion(cfg):
  """Builds a recipe from `config.diffusion` (an ml_collections ConfigDict or a mapping).

  cfg.name == "vp": cfg.schedule (name + kwargs of schedules.get_logsnr_schedule), cfg.prediction,
    cfg.sigmoid_bias, cfg.weighting, optional cfg.clip_x, cfg.cond_drop_prob.
  cfg.name == "edm": sigma_data, p_mean, p_std, sigma_min, sigma_max, rho, optional clip_x,
    cond_drop_prob.
  Otherwise cfg.name is the dotted path of a recipe class (module docstring's contract), built with
  the other keys as keyword arguments (e.g. an autoencoder's reconstruction + KL objective).
  Missing optional keys take the constructor defaults.

  Raises:
    ConfigError: unknown recipe, schedule, prediction or weighting name, or an unknown key.
  """
  d = _to_dict(cfg)
  name = d.get("name")
  if name == "vp":
    unknown = sorted(set(d) - _VP_KEYS)
    if unknown:
      raise ConfigError(
          f"Unknown key(s) {unknown} in config.diffusion (vp); valid: {sorted(_VP_KEYS)}.")
    sched_cfg = d.get("schedule") or {}
    if not isinstance(sched_cfg, dict):
      raise ConfigError(f"config.diffusion.schedule must be a dict with a name (e.g. "
                        f"{{'name': 'cosine'}}), got {sched_cfg!r:.80}.")
    sched_cfg = dict(sched_cfg)
    if "name" not in sched_cfg:
      raise ConfigError("config.diffusion.schedule.name is missing (e.g. 'sid2', 'cosine').")
    sched_name = sched_cfg.pop("name")
    schedule = schedules.get_logsnr_schedule(sched_name, **sched_cfg)
    kwargs = {k: d[k] for k in ("prediction", "sigmoid_bias", "weighting", "clip_x",
                                "cond_drop_prob") if k in d}
    for k in ("sigmoid_bias", "cond_drop_prob"):
      if k in kwargs:
        kwargs[k] = float(kwargs[k])
    return VPDiffusion(schedule=schedule, **kwargs)
  if name == "edm":
    unknown = sorted(set(d) - _EDM_KEYS)
    if unknown:
      raise ConfigError(
          f"Unknown key(s) {unknown} in config.diffusion (edm); valid: {sorted(_EDM_KEYS)}.")
    kwargs = {k: (bool(v) if k == "clip_x" else float(v)) for k, v in d.items() if k != "name"}
    return EDMDiffusion(**kwargs)
  if isinstance(name, str) and "." in name:
    cls = recipe_class(name)
    kwargs = registry.config_kwargs(d)
    registry.check_kwargs(cls, kwargs, "config.diffusion")
    recipe = registry.build(cls, "config.diffusion", **kwargs)
    contracts.check(recipe, contracts.Recipe, f"config.diffusion.name={name!r}")
    return recipe
  raise ConfigError(f"Unknown config.diffusion.name {name!r}; choose 'vp', 'edm' or the dotted "
                    "path of a recipe class.")
