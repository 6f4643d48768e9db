"""ADM / DiT discrete-time diffusion with learned variance: the recipe DiT and TerDiT train with.

Select it with `config.diffusion.name = "common.diffusion.adm.ADMDiffusion"`; every other key of
`config.diffusion` is a field of `ADMDiffusion` (defaults reproduce DiT, facebookresearch/DiT
`diffusion/__init__.py:create_diffusion`).

The process (Ho et al. 2020, arXiv 2006.11239; Nichol & Dhariwal 2021 "IDDPM", arXiv 2102.09672):
T discrete steps with betas beta_0..beta_{T-1} ("linear": 1e-4..0.02 scaled by 1000/T;
"cosine": IDDPM eq. 17), abar_t = prod_{s<=t} (1 - beta_s), and
  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)                      (DDPM eq. 4)
  q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I)               (DDPM eq. 6-7)
  beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
The network gets x_t and t, and outputs 2C channels when the variance is learned: eps_hat (C) and v
(C), with log Sigma = (v + 1)/2 log beta_t + (1 - (v + 1)/2) log beta~_t       (IDDPM eq. 15).

Training (IDDPM Sec. 3.1, eq. 16; openai/guided-diffusion `gaussian_diffusion.py:training_losses`
with DiT's loss type MSE): t ~ U{0..T-1}, and per example
  mse = mean over elements of (eps - eps_hat)^2                            (L_simple)
  vb  = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per element, or at t = 0 the
        discretized Gaussian NLL of x_0 (DDPM Sec. 3.3), with eps_hat under stop-gradient so
        that only v learns from it (mean over elements)
  loss = mse + vlb_weight * T * vb.
T * vb is the one-term estimate of the whole bound L_vlb, so this is L_simple + lambda L_vlb with
lambda = vlb_weight. DiT (loss type MSE, `rescale_learned_sigmas=False`) adds vb with weight 1;
at T = 1000 and lambda = 0.001 (the defaults) the effective weight lambda * T is exactly 1, the
same loss (IDDPM's RESCALED_MSE scales vb by T / 1000, also 1 at T = 1000).

Sampling runs on a respaced process (IDDPM Sec. 4, guided-diffusion `respace.py`): a subset S of
the T timesteps with betas 1 - abar_{s_i} / abar_{s_{i-1}}; the network still gets the original
timestep and its v interpolates between the respaced process's log beta and log beta~. Ancestral
DDPM (`p_sample`) or DDIM (Song et al. 2021, arXiv 2010.02502 eq. 12, with `ddim_eta`).

Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598): eps = eps_u + w (eps_c - eps_u) on
the eps channels; the variance channels come from the conditional branch, as DiT's
`models.py:forward_with_cfg`. DiT guides only the first 3 channels (a known quirk: with 4-channel
latents the 4th eps channel is the conditional one); we guide all C eps channels by default, and
`guided_channels = 3` reproduces DiT (and TerDiT, which copies it). A guidance interval is given in
logSNR log(abar_t / (1 - abar_t)) of the original timestep of each network evaluation (the "vp"
recipe's convention: alpha^2 = abar_t): guidance applies where lo <= logSNR <= hi.

Layout: our arrays are NHWC ([B, H, W, C]); the learned-sigma output is [B, H, W, 2C] with eps in
channels [:C] and v in [C:] (DiT's NCHW output split along channels).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from common import registry
from common.diffusion.recipes import (ApplyFn, _check_interval, _DenoiserObjective, drop_condition,
                              split_output)
from common.errors import ConfigError, ShapeError

NOISE_SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2")
NOISE_CONDS = ("timestep", "logsnr")
SAMPLERS = ("ddpm", "ddim")


# ---- schedules and respacing (numpy, float64, at trace time) -------------------------------------
def named_betas(name: str, num_steps: int) -> np.ndarray:
  """Betas [T] float64 of a named schedule (guided-diffusion `get_named_beta_schedule`).

  "linear": DDPM's 1e-4..0.02 (arXiv 2006.11239 Sec. 4) scaled by 1000 / T so that any T gives a
  similar process. "cosine" (alias "squaredcos_cap_v2", DiT's name): IDDPM eq. 17 with s = 0.008,
  betas clipped at 0.999.
  """
  if name == "linear":
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  if name in ("cosine", "squaredcos_cap_v2"):
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1.0 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999)
                     for i in range(num_steps)], dtype=np.float64)
  raise ConfigError(f"Unknown diffusion.noise_schedule {name!r}; choose one of {NOISE_SCHEDULES}.")


def space_timesteps(num_timesteps: int, spec: str | int | Sequence[int]) -> list[int]:
  """The retained timesteps of a respaced process, sorted (guided-diffusion `respace.py`).

  spec: "N" or N (N steps evenly strided over [0, T-1], rounded), "n1,n2,..." (T split into equal
  sections, n_i steps strided within section i), or "ddimN" (the fixed integer stride of the DDIM
  paper giving exactly N steps: range(0, T, stride)).

  Raises:
    ConfigError: an unparsable spec, or more steps than a section holds.
  """
  if isinstance(spec, str) and spec.startswith("ddim"):
    try:
      want = int(spec[len("ddim"):])
    except ValueError as e:
      raise ConfigError(f"timestep respacing {spec!r}: 'ddimN' needs an integer N.") from e
    for stride in range(1, num_timesteps):
      if len(range(0, num_timesteps, stride)) == want:
        return list(range(0, num_timesteps, stride))
    raise ConfigError(f"timestep respacing {spec!r}: no integer stride gives exactly {want} of "
                      f"{num_timesteps} steps.")
  try:
    if isinstance(spec, str):
      counts = [int(s) for s in spec.split(",")]
    elif isinstance(spec, int):
      counts = [spec]
    else:
      counts = [int(s) for s in spec]
  except ValueError as e:
    raise ConfigError(f"timestep respacing {spec!r}: expected 'N', 'n1,n2,...' or 'ddimN'.") from e
  if not counts or any(c < 1 for c in counts):
    raise ConfigError(f"timestep respacing {spec!r}: step counts must be >= 1.")
  size_per, extra = divmod(num_timesteps, len(counts))
  start, steps = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ConfigError(f"timestep respacing {spec!r}: cannot take {count} steps from a section "
                        f"of {size} of the {num_timesteps} steps.")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))  # Python's round (half to even), as the reference
      cur += stride
    start += size
  return sorted(set(steps))


@dataclasses.dataclass(frozen=True, eq=False)
class Process:
  """The tables of a discrete Gaussian diffusion over betas [N] (float64 numpy; used as float32).

  `timesteps` [N] are the original timesteps these steps stand for (range(N) when not respaced):
  what the network is conditioned on.
  """
  betas: np.ndarray
  timesteps: np.ndarray

  @classmethod
  def respaced(cls, base_betas: np.ndarray, use_timesteps: Sequence[int]) -> "Process":
    """The process that keeps `use_timesteps` of `base_betas`: beta'_i = 1 - abar_{s_i} /
    abar_{s_{i-1}} (IDDPM Sec. 4; guided-diffusion `respace.py:SpacedDiffusion`)."""
    abar = np.cumprod(1.0 - np.asarray(base_betas, np.float64))
    keep = sorted(int(s) for s in use_timesteps)
    prev = np.concatenate([[1.0], abar[keep][:-1]])
    return cls(betas=1.0 - abar[keep] / prev, timesteps=np.asarray(keep, np.int64))

  def __post_init__(self):
    b = np.asarray(self.betas, np.float64)
    if b.ndim != 1 or b.shape[0] < 2 or not ((b > 0).all() and (b <= 1).all()):
      raise ConfigError(f"A diffusion process needs >= 2 betas in (0, 1], got {b.shape[0]} "
                        f"in [{b.min():.3g}, {b.max():.3g}].")

  @functools.cached_property
  def tables(self) -> dict[str, np.ndarray]:
    """Per-step coefficients [N] float64 (DDPM eq. 4, 6-7; IDDPM eq. 15)."""
    b = np.asarray(self.betas, np.float64)
    abar = np.cumprod(1.0 - b)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = b * (1.0 - abar_prev) / (1.0 - abar)
    fixed_large = np.append(post_var[1], b[1:])  # better decoder NLL at t = 0 (guided-diffusion)
    return {
        "abar": abar, "abar_prev": abar_prev,
        "sqrt_abar": np.sqrt(abar), "sqrt_one_minus_abar": np.sqrt(1.0 - abar),
        "sqrt_recip_abar": np.sqrt(1.0 / abar), "sqrt_recipm1_abar": np.sqrt(1.0 / abar - 1.0),
        "post_var": post_var,
        # beta~_0 = 0: its log is clipped to log beta~_1
        "post_log_var": np.log(np.append(post_var[1], post_var[1:])),
        "post_coef1": b * np.sqrt(abar_prev) / (1.0 - abar),
        "post_coef2": (1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar),
        "log_betas": np.log(b),
        "fixed_large_var": fixed_large, "fixed_large_log_var": np.log(fixed_large),
        "logsnr": np.log(abar) - np.log1p(-abar),
    }

  @property
  def num_steps(self) -> int:
    return int(np.shape(self.betas)[0])

  def take(self, name: str, t: jax.Array, like: jax.Array) -> jax.Array:
    """tables[name][t] as float32, broadcast against `like` [B, ...]. t: int [B] or scalar."""
    v = jnp.asarray(self.tables[name], jnp.float32)[t]
    return v.reshape(jnp.shape(v) + (1,) * (jnp.ndim(like) - jnp.ndim(v)))

  # ---- q -----------------------------------------------------------------------------------------
  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4). [B, ...] float32."""
    return self.take("sqrt_abar", t, x0) * x0 + self.take("sqrt_one_minus_abar", t, x0) * noise

  def q_posterior(self, x0: jax.Array, xt: jax.Array, t: jax.Array):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7), each
    [B, ...] float32."""
    mean = self.take("post_coef1", t, xt) * x0 + self.take("post_coef2", t, xt) * xt
    var = jnp.broadcast_to(self.take("post_var", t, xt), xt.shape)
    log_var = jnp.broadcast_to(self.take("post_log_var", t, xt), xt.shape)
    return mean, var, log_var

  def predict_x0(self, xt: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps. [B, ...] float32."""
    return self.take("sqrt_recip_abar", t, xt) * xt - self.take("sqrt_recipm1_abar", t, xt) * eps

  def predict_eps(self, xt: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1). [B, ...] float32."""
    return ((self.take("sqrt_recip_abar", t, xt) * xt - x0)
            / self.take("sqrt_recipm1_abar", t, xt))

  # ---- p -----------------------------------------------------------------------------------------
  def p_mean_variance(self, out: jax.Array, xt: jax.Array, t: jax.Array, *, learn_sigma: bool,
                      sigma_small: bool = False, clip_denoised: bool = False) -> dict:
    """p(x_{t-1} | x_t) from a network output (guided-diffusion `p_mean_variance`, eps model).

    Args:
      out: [B, H, W, 2C] (eps_hat, v) when learn_sigma, else [B, H, W, C] eps_hat. float32.
      xt: [B, H, W, C].
      t: int [B] step indices of this process.
      learn_sigma: interpolate log-variances with v (IDDPM eq. 15); else a fixed variance:
        beta~_t when sigma_small, else beta_t (with beta~_1 at t = 0).
      clip_denoised: clip the x_0 prediction to [-1, 1] before the posterior mean.
    Returns:
      {"mean", "variance", "log_variance", "pred_xstart", "eps"}: [B, H, W, C] float32
      ("eps" is the network's eps_hat).
    """
    c = xt.shape[-1]
    eps = out[..., :c]
    if learn_sigma:
      frac = (out[..., c:] + 1.0) / 2.0
      log_var = (frac * self.take("log_betas", t, xt)
                 + (1.0 - frac) * self.take("post_log_var", t, xt))
    elif sigma_small:
      log_var = jnp.broadcast_to(self.take("post_log_var", t, xt), xt.shape)
    else:
      log_var = jnp.broadcast_to(self.take("fixed_large_log_var", t, xt), xt.shape)
    if learn_sigma:
      var = jnp.exp(log_var)
    else:
      var = jnp.broadcast_to(
          self.take("post_var" if sigma_small else "fixed_large_var", t, xt), xt.shape)
    x0 = self.predict_x0(xt, t, eps)
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
    mean, _, _ = self.q_posterior(x0, xt, t)
    return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": x0, "eps": eps}


# ---- likelihood terms ----------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (float32)."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x: jax.Array) -> jax.Array:
  # The tanh approximation of the standard normal CDF (guided-diffusion losses.py).
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
  """log P(x) of N(means, e^(2 log_scales)) integrated over the 8-bit bin of x in [-1, 1] (bin
  width 2/255; the edge bins extend to -+inf), in nats, elementwise (DDPM Sec. 3.3, eq. 13;
  guided-diffusion `losses.py`)."""
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _masked_mean(v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Per-example mean [B] of v [B, H, W, C]: over all elements, or over channels and then the pixels
  where mask [B, H, W] is 1 (as common.diffusion.losses.masked_mean_sq_error)."""
  if mask is None:
    return jnp.mean(v.reshape(v.shape[0], -1), axis=-1)
  m = jnp.asarray(mask, jnp.float32)
  per_pixel = v.mean(-1)
  return jnp.sum((per_pixel * m).reshape(v.shape[0], -1), -1) / jnp.maximum(
      jnp.sum(m.reshape(m.shape[0], -1), -1), 1.0)


# ---- the recipe ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
@registry.register("diffusion")
class ADMDiffusion(_DenoiserObjective):
  """DiT / ADM discrete diffusion with learned variance and the hybrid loss (module docstring).

  The recipe contract of common.diffusion.recipes: `loss(model, batch, key)` (batch means of "mse" and "vb"
  as metrics), `preview(model, batch, key, settings)` (settings: config.sample), and underneath
  `per_example_loss`, `training_losses`, `sample`, `sample_loop`, `denoise` for any
  apply_fn(x_t [B, H, W, C], noise_cond [B] float32, cond) -> F or (F, aux).

  Attributes:
    diffusion_steps: T, the number of training timesteps.
    noise_schedule: "linear" (DDPM, scaled by 1000/T) or "cosine" (IDDPM; "squaredcos_cap_v2").
    learn_sigma: the network outputs 2C channels (eps_hat, v) and learns the variance from the vb
      term; False: C channels (eps_hat), a fixed variance and the plain eps MSE.
    sigma_small: with learn_sigma False, sample with variance beta~_t instead of beta_t.
    vlb_weight: lambda of L_simple + lambda L_vlb with L_vlb = T * vb (per-step weight lambda T;
      DiT: 1 at T = 1000).
    noise_cond: what the network gets as noise_cond [B] float32: "timestep" (the original
      timestep t in [0, T-1], DiT/ADM) or "logsnr" (log(abar_t / (1 - abar_t)), for networks
      built for the logSNR recipes).
    clip_denoised: clip each x_0 prediction to [-1, 1] while sampling (ADM on pixels: True; DiT
      on latents: False).
    timestep_respacing: "" (sampling takes `num_steps` evenly strided steps, DiT's
      `create_diffusion(str(num_steps))`), or an ADM spec "N", "n1,n2,..." or "ddimN"; its step
      count must then equal the sampler's num_steps (config.sample.num_steps).
    ddim_eta: eta of the DDIM sampler (0: deterministic).
    guided_channels: how many eps channels classifier-free guidance applies to; 0: all C
      (standard CFG); 3: DiT's `forward_with_cfg` (guides channels 0-2 only).
    cond_drop_prob: probability of training on the unconditional condition (CFG dropout; DiT:
      0.1, done by its LabelEmbedder).
  """
  diffusion_steps: int = 1000
  noise_schedule: str = "linear"
  learn_sigma: bool = True
  sigma_small: bool = False
  vlb_weight: float = 0.001
  noise_cond: str = "timestep"
  clip_denoised: bool = False
  timestep_respacing: str = ""
  ddim_eta: float = 0.0
  guided_channels: int = 0
  cond_drop_prob: float = 0.0

  def __post_init__(self):
    if int(self.diffusion_steps) < 2:
      raise ConfigError(f"diffusion.diffusion_steps must be >= 2, got {self.diffusion_steps}.")
    if self.noise_schedule not in NOISE_SCHEDULES:
      raise ConfigError(f"Unknown diffusion.noise_schedule {self.noise_schedule!r}; choose one of "
                        f"{NOISE_SCHEDULES}.")
    if self.noise_cond not in NOISE_CONDS:
      raise ConfigError(f"Unknown diffusion.noise_cond {self.noise_cond!r}; choose one of "
                        f"{NOISE_CONDS}.")
    if not self.vlb_weight >= 0:
      raise ConfigError(f"diffusion.vlb_weight must be >= 0, got {self.vlb_weight}.")
    if not self.ddim_eta >= 0:
      raise ConfigError(f"diffusion.ddim_eta must be >= 0, got {self.ddim_eta}.")
    if int(self.guided_channels) < 0:
      raise ConfigError(f"diffusion.guided_channels must be >= 0 (0: all), got "
                        f"{self.guided_channels}.")
    if not 0.0 <= self.cond_drop_prob <= 1.0:
      raise ConfigError(f"diffusion.cond_drop_prob must lie in [0, 1], got {self.cond_drop_prob}.")
    if not isinstance(self.timestep_respacing, str):
      raise ConfigError("diffusion.timestep_respacing must be a string ('' , 'N', 'n1,n2,...' or "
                        f"'ddimN'), got {self.timestep_respacing!r}.")
    if self.timestep_respacing:
      space_timesteps(int(self.diffusion_steps), self.timestep_respacing)  # validates the spec

  # ---- processes --------------------------------------------------------------------------------
  @functools.cached_property
  def base_betas(self) -> np.ndarray:
    """Betas [T] float64 of the training process."""
    return named_betas(self.noise_schedule, int(self.diffusion_steps))

  @functools.cached_property
  def process(self) -> Process:
    """The training process (all T steps)."""
    return Process(betas=self.base_betas, timesteps=np.arange(int(self.diffusion_steps)))

  def sampling_process(self, num_steps: int) -> Process:
    """The respaced process sampling walks: `timestep_respacing`, or num_steps evenly strided
    steps.

    Raises:
      ConfigError: a spec whose step count differs from num_steps, or fewer than 2 steps.
    """
    t_total = int(self.diffusion_steps)
    if self.timestep_respacing:
      keep = space_timesteps(t_total, self.timestep_respacing)
      if len(keep) != num_steps:
        raise ConfigError(f"diffusion.timestep_respacing={self.timestep_respacing!r} takes "
                          f"{len(keep)} steps but the sampler is asked for num_steps={num_steps}: "
                          f"set config.sample.num_steps={len(keep)}.")
    else:
      if not 2 <= num_steps <= t_total:
        raise ConfigError(f"num_steps must lie in [2, {t_total}] (diffusion.diffusion_steps), got "
                          f"{num_steps}.")
      keep = space_timesteps(t_total, int(num_steps))
    return Process.respaced(self.base_betas, keep)

  def _network_noise_cond(self, timesteps: jax.Array) -> jax.Array:
    """noise_cond [B] float32 of original timesteps [B] (int)."""
    if self.noise_cond == "logsnr":
      return jnp.asarray(self.process.tables["logsnr"], jnp.float32)[timesteps]
    return jnp.asarray(timesteps, jnp.float32)

  def _check_output(self, out: jax.Array, x: jax.Array) -> None:
    c = x.shape[-1]
    want = 2 * c if self.learn_sigma else c
    if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != want:
      raise ShapeError(
          f"ADMDiffusion (learn_sigma={self.learn_sigma}) needs the network output "
          f"[B, H, W, {want}] for inputs {tuple(x.shape)}, got {tuple(out.shape)}: "
          + ("give the network 2C output channels (eps and the variance interpolation)."
             if self.learn_sigma else "the network must output C channels (eps)."))

  # ---- training ---------------------------------------------------------------------------------
  def training_losses(self, apply_fn: ApplyFn, x: jax.Array, t: jax.Array, noise: jax.Array,
                      cond: Any) -> dict[str, jax.Array]:
    """The loss terms of examples x at timesteps t with noise (guided-diffusion
    `training_losses`, DiT's loss type MSE).

    Args:
      apply_fn: the network.
      x: [B, H, W, C] data x_0.
      t: int [B] timesteps in [0, T-1].
      noise: [B, H, W, C] eps.
      cond: the condition pytree.
    Returns:
      {"mse", "vb", "loss"}, each [B] float32: eps MSE (mean over elements, or over
      aux["loss_mask"]), the vb term in bits per element (0 when learn_sigma is False) and
      loss = mse + vlb_weight * T * vb.
    """
    x = jnp.asarray(x, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    t = jnp.asarray(t, jnp.int32)
    proc = self.process
    xt = proc.q_sample(x, t, noise)
    out, aux = split_output(apply_fn(xt, self._network_noise_cond(t), cond))
    self._check_output(out, x)
    mask = aux.get("loss_mask")
    c = x.shape[-1]
    mse = _masked_mean(jnp.square(noise - out[..., :c]), mask)
    if not self.learn_sigma:
      return {"mse": mse, "vb": jnp.zeros_like(mse), "loss": mse}
    # The vb term trains the variance only: the mean's eps is frozen (IDDPM Sec. 3.1).
    frozen = jnp.concatenate([jax.lax.stop_gradient(out[..., :c]), out[..., c:]], axis=-1)
    vb = _masked_mean(self._vb_elements(frozen, x, xt, t), mask)
    return {"mse": mse, "vb": vb,
            "loss": mse + float(self.vlb_weight) * int(self.diffusion_steps) * vb}

  def _vb_elements(self, out: jax.Array, x0: jax.Array, xt: jax.Array,
                   t: jax.Array) -> jax.Array:
    """L_t per element in bits [B, H, W, C]: KL(q || p) for t > 0, the decoder NLL at t = 0
    (guided-diffusion `_vb_terms_bpd`, clip_denoised=False)."""
    proc = self.process
    true_mean, _, true_log_var = proc.q_posterior(x0, xt, t)
    p = proc.p_mean_variance(out, xt, t, learn_sigma=self.learn_sigma,
                             sigma_small=self.sigma_small)
    kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(
        x0, p["mean"], 0.5 * p["log_variance"]) / math.log(2.0)
    first = (t == 0).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.where(first, nll, kl)

  def _loss_terms(self, apply_fn: ApplyFn, x: jax.Array, cond: Any,
                  key: jax.Array) -> dict[str, jax.Array]:
    x = jnp.asarray(x, jnp.float32)
    key_t, key_eps = jax.random.split(key)
    t = jax.random.randint(key_t, (x.shape[0],), 0, int(self.diffusion_steps), jnp.int32)
    noise = jax.random.normal(key_eps, x.shape, jnp.float32)
    return self.training_losses(apply_fn, x, t, noise, cond)

  def per_example_loss(self, apply_fn: ApplyFn, x: jax.Array, cond: Any,
                       key: jax.Array) -> jax.Array:
    """Per-example hybrid loss [B] float32 with t ~ U{0..T-1} and eps ~ N(0, I).
    x: [B, H, W, C] data."""
    return self._loss_terms(apply_fn, x, cond, key)["loss"]

  def loss(self, model, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
    """Per-example loss [B] float32 of a batch {"x": [B, H, W, C], "cond": pytree} and the batch
    means of its terms {"mse", "vb"}. The condition is dropped for CFG with probability
    `cond_drop_prob`; dropout inside the network draws from `key`."""
    k_cond, k_loss, k_drop = jax.random.split(key, 3)
    cond = batch.get("cond", {})
    cond = drop_condition(cond, model.null_cond(cond), float(self.cond_drop_prob), k_cond)
    apply_fn = lambda x, noise, c: model(x, noise, c, dropout_key=k_drop)
    terms = self._loss_terms(apply_fn, batch["x"], cond, k_loss)
    return terms["loss"], {"mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"])}

  # ---- sampling ---------------------------------------------------------------------------------
  def denoise(self, apply_fn: ApplyFn, z: jax.Array, noise: jax.Array, cond: Any) -> jax.Array:
    """x_0 prediction [B, H, W, C] float32 from x_t = z at original timestep(s) `noise` (int
    [B] or scalar in [0, T-1])."""
    z = jnp.asarray(z, jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(noise, jnp.int32), (z.shape[0],))
    out, _ = split_output(apply_fn(z, self._network_noise_cond(t), cond))
    self._check_output(out, z)
    return self.process.predict_x0(z, t, out[..., :z.shape[-1]])

  def guided_output(self, apply_fn: ApplyFn, x: jax.Array, timesteps: jax.Array, cond: Any,
                    uncond: Any, guidance_scale: float | jax.Array,
                    interval: tuple[float, float] | None = None) -> jax.Array:
    """The network output [B, H, W, C'] float32 at original timesteps [B] (int, all equal), with
    classifier-free guidance on the first `guided_channels` (0: all C) eps channels; the other
    channels (and the variance) are the conditional branch's, as DiT's `forward_with_cfg`.

    Both branches run as one doubled batch [2B] (cond first). With `interval` (lo, hi) in
    logSNR, steps whose logSNR lies outside run the conditional branch only (w = 1).
    """
    nc = self._network_noise_cond(timesteps)
    out_only = lambda xx, n, cc: split_output(apply_fn(xx, n, cc))[0]
    if uncond is None or (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0):
      if uncond is None and not (isinstance(guidance_scale, (int, float))
                                 and guidance_scale == 1.0):
        raise ValueError("guidance_scale != 1 needs an unconditional `uncond` pytree.")
      return out_only(x, nc, cond)
    c = x.shape[-1]
    k = int(self.guided_channels) or c
    if k > c:
      raise ConfigError(f"diffusion.guided_channels={k} exceeds the {c} eps channels.")
    w = jnp.asarray(guidance_scale, jnp.float32)
    b = x.shape[0]

    def doubled(_):
      out = out_only(jnp.concatenate([x, x]), jnp.concatenate([nc, nc]),
                     jax.tree.map(lambda a, u: jnp.concatenate([a, u]), cond, uncond))
      out_c, out_u = out[:b], out[b:]
      guided = out_u[..., :k] + w * (out_c[..., :k] - out_u[..., :k])
      return jnp.concatenate([guided, out_c[..., k:]], axis=-1)

    if interval is None:
      return doubled(None)
    logsnr = jnp.asarray(self.process.tables["logsnr"], jnp.float32)[timesteps[0]]
    inside = jnp.logical_and(logsnr >= interval[0], logsnr <= interval[1])
    return jax.lax.cond(inside, doubled, lambda _: out_only(x, nc, cond), None)

  def sample_loop(self, apply_fn: ApplyFn, x_init: jax.Array, cond: Any, uncond: Any = None, *,
                  noise_fn: Callable[[jax.Array], jax.Array] | None = None,
                  sampler: str = "ddpm", num_steps: int = 250,
                  guidance_scale: float | jax.Array = 1.0,
                  guidance_interval: Sequence[float] | None = None,
                  return_trajectory: bool = False):
    """Runs the reverse process from x_init = x_T [B, H, W, C] over the respaced steps.

    DDPM (guided-diffusion `p_sample`): x_{t-1} = mean + [t > 0] exp(log_var / 2) noise.
    DDIM (`ddim_sample`, Song et al. eq. 12): x_{t-1} = x0 sqrt(abar_prev) +
      sqrt(1 - abar_prev - s^2) eps + [t > 0] s noise, s = eta sqrt((1 - abar_prev)/(1 - abar))
      sqrt(1 - abar / abar_prev), with eps re-derived from the (clipped) x0.

    Args:
      apply_fn, cond, uncond, guidance_scale: as `sample`.
      x_init: [B, H, W, C] starting noise.
      noise_fn: noise_fn(k) -> [B, H, W, C] noise of step k = 0..N-1 (noisiest first); None only
        for deterministic DDIM (eta = 0).
      sampler: "ddpm" or "ddim" (static).
      num_steps: N (static; see `sampling_process`).
      guidance_interval: (lo, hi) in logSNR or None.
      return_trajectory: also return every step's x [N, B, H, W, C] (x after step k at [k]).
    Returns:
      x_0 [B, H, W, C] float32, or (x_0, trajectory).
    """
    if sampler not in SAMPLERS:
      raise ConfigError(f"Unknown sampler {sampler!r} for ADM diffusion; choose one of "
                        f"{SAMPLERS}.")
    num_steps = int(num_steps)
    interval = _check_interval(guidance_interval)
    proc = self.sampling_process(num_steps)
    x_init = jnp.asarray(x_init, jnp.float32)
    stochastic = sampler == "ddpm" or float(self.ddim_eta) > 0
    if stochastic and noise_fn is None:
      raise ValueError(f"sampler {sampler!r} (ddim_eta={self.ddim_eta}) needs a noise_fn.")
    b = x_init.shape[0]
    original = jnp.asarray(proc.timesteps, jnp.int32)

    def body(x, k):
      i = num_steps - 1 - k
      t = jnp.full((b,), i, jnp.int32)
      out = self.guided_output(apply_fn, x, jnp.full((b,), original[i], jnp.int32), cond, uncond,
                               guidance_scale, interval)
      self._check_output(out, x)
      p = proc.p_mean_variance(out, x, t, learn_sigma=self.learn_sigma,
                               sigma_small=self.sigma_small, clip_denoised=self.clip_denoised)
      nonzero = (i > 0).astype(jnp.float32)
      if sampler == "ddpm":
        x_next = p["mean"] + nonzero * jnp.exp(0.5 * p["log_variance"]) * noise_fn(k)
      else:
        eps = proc.predict_eps(x, t, p["pred_xstart"])
        abar, abar_prev = proc.take("abar", t, x), proc.take("abar_prev", t, x)
        s = (float(self.ddim_eta) * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar))
             * jnp.sqrt(1.0 - abar / abar_prev))
        x_next = (p["pred_xstart"] * jnp.sqrt(abar_prev)
                  + jnp.sqrt(1.0 - abar_prev - s**2) * eps)
        if stochastic:
          x_next = x_next + nonzero * s * noise_fn(k)
      return x_next, (x_next if return_trajectory else None)

    x0, traj = jax.lax.scan(body, x_init, jnp.arange(num_steps))
    return (x0, traj) if return_trajectory else x0

  def sample(self, apply_fn: ApplyFn, key: jax.Array, shape: Sequence[int], cond: Any,
             uncond: Any = None, *, sampler: str = "ddpm", num_steps: int = 250,
             guidance_scale: float | jax.Array = 1.0,
             guidance_interval: Sequence[float] | None = None, churn: float = 0.0) -> jax.Array:
    """Draws samples [B, H, W, C] float32 from x_T ~ N(0, I) (DiT `sample.py`: ancestral DDPM,
    250 steps).

    Args:
      apply_fn: the network.
      key: PRNG key (initial and per-step noise).
      shape: [B, H, W, C] (static).
      cond, uncond: conditional and unconditional cond pytrees ([B, ...] leaves).
      sampler: "ddpm" (ancestral, learned variance) or "ddim" (static).
      num_steps: respaced steps N (static); network evaluations = N (x2 batch when guided).
      guidance_scale: CFG weight w (1: conditional only).
      guidance_interval: (lo, hi) in logSNR log(abar_t / (1 - abar_t)); None: everywhere.
      churn: must be 0 (EDM-only option; accepted for a uniform signature).
    """
    if not (isinstance(churn, (int, float)) and float(churn) == 0.0):
      raise ConfigError("churn is an EDM (heun) option; ADM samplers need churn = 0.")
    key_init, key_loop = jax.random.split(key)
    shape = tuple(shape)
    x_init = jax.random.normal(key_init, shape, jnp.float32)
    noise_fn = lambda k: jax.random.normal(jax.random.fold_in(key_loop, k), shape, jnp.float32)
    return self.sample_loop(apply_fn, x_init, cond, uncond, noise_fn=noise_fn, sampler=sampler,
                            num_steps=num_steps, guidance_scale=guidance_scale,
                            guidance_interval=guidance_interval)
