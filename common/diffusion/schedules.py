"""Noise schedules: logSNR schedules for VP diffusion and sigma schedules for EDM.

VP schedules map continuous time t in [0, 1] (t = 0: clean, t = 1: noise) to the logSNR
lambda_t = log(alpha_t^2 / sigma_t^2) (SiD, arXiv 2301.11093). Every schedule is a
small frozen dataclass with

* `logsnr(t)`: lambda(t), float32, same shape as `t`;
* `neg_dlogsnr_dt(t)`: -d lambda / dt in closed form (positive: lambda decreases with t), float32,
  the importance-sampling Jacobian of the VDM++ weighted loss (VDM++, arXiv 2303.00848).

All math is done in float32 whatever the dtype of `t`. The clip endpoints t0/t1
keep tan() finite at t = 0 and t = 1.

EDM (Karras et al. 2022, arXiv 2206.00364): `edm_sigmas` (the sampling sigma grid, eq. 5) and
`sample_lognormal_sigma` (the training noise distribution, ln sigma ~ N(P_mean, P_std^2)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from common.errors import ConfigError


class LogSNRSchedule(Protocol):
  """Interface shared by the logSNR schedules."""

  def logsnr(self, t: jax.Array) -> jax.Array:
    ...

  def neg_dlogsnr_dt(self, t: jax.Array) -> jax.Array:
    ...


def _cosine_bounds(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
  """Returns (t0, t1) with lambda_cos(0) = logsnr_max and lambda_cos(1) = logsnr_min.

  Spec A.3: t0 = atan(exp(-lambda_max / 2)), t1 = atan(exp(-lambda_min / 2)).
  """
  if not logsnr_min < logsnr_max:
    raise ConfigError(
        f"logSNR schedule needs logsnr_min < logsnr_max, got {logsnr_min} and {logsnr_max}.")
  t0 = math.atan(math.exp(-0.5 * logsnr_max))
  t1 = math.atan(math.exp(-0.5 * logsnr_min))
  return t0, t1


def _clipped_cosine_logsnr(t: jax.Array, logsnr_min: float, logsnr_max: float) -> jax.Array:
  """lambda_cos(t) = -2 log tan(t0 + t (t1 - t0)) (SiD, arXiv 2301.11093, clipped cosine). float32."""
  t0, t1 = _cosine_bounds(logsnr_min, logsnr_max)
  t = jnp.asarray(t, jnp.float32)
  return -2.0 * jnp.log(jnp.tan(t0 + t * (t1 - t0)))


def _clipped_cosine_neg_dlogsnr_dt(t: jax.Array, logsnr_min: float,
                                   logsnr_max: float) -> jax.Array:
  """-d lambda_cos / dt = 4a / sin(2(a t + b)), a = t1 - t0, b = t0. float32."""
  t0, t1 = _cosine_bounds(logsnr_min, logsnr_max)
  a = t1 - t0
  t = jnp.asarray(t, jnp.float32)
  return 4.0 * a / jnp.sin(2.0 * (a * t + t0))


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
  """Clipped cosine schedule (SiD, arXiv 2301.11093).

  lambda(t) = -2 log tan(t0 + t (t1 - t0)), so lambda(0) = logsnr_max, lambda(1) = logsnr_min.

  Attributes:
    logsnr_min: logSNR at t = 1 (nats). SiD default -15.
    logsnr_max: logSNR at t = 0 (nats). SiD default +15.
  """
  logsnr_min: float = -15.0
  logsnr_max: float = 15.0

  def __post_init__(self):
    _cosine_bounds(self.logsnr_min, self.logsnr_max)

  def logsnr(self, t: jax.Array) -> jax.Array:
    """t: any shape in [0, 1] -> lambda(t), same shape, float32."""
    return _clipped_cosine_logsnr(t, self.logsnr_min, self.logsnr_max)

  def neg_dlogsnr_dt(self, t: jax.Array) -> jax.Array:
    """t: any shape in [0, 1] -> -d lambda/dt, same shape, float32 (> 0)."""
    return _clipped_cosine_neg_dlogsnr_dt(t, self.logsnr_min, self.logsnr_max)


@dataclasses.dataclass(frozen=True)
class ShiftedCosineSchedule:
  """Shifted clipped cosine (SiD, arXiv 2301.11093, eq. 5).

  lambda(t) = lambda_cos(t) + 2 log(noise_d / image_d): the clip to [logsnr_min, logsnr_max] is
  applied to the base cosine *before* the shift, so lambda(0) = logsnr_max + shift (the SiD
  convention, not the k-diffusion variant that keeps the shifted endpoints inside the clip).

  Attributes:
    image_d: image side in pixels (d).
    noise_d: base resolution of the unshifted schedule (SiD: 64).
    logsnr_min, logsnr_max: clip of the base cosine (nats).
  """
  image_d: float = 64.0
  noise_d: float = 64.0
  logsnr_min: float = -15.0
  logsnr_max: float = 15.0

  def __post_init__(self):
    _cosine_bounds(self.logsnr_min, self.logsnr_max)
    if self.image_d <= 0 or self.noise_d <= 0:
      raise ConfigError(f"shifted_cosine needs positive image_d and noise_d, got {self.image_d}, "
                        f"{self.noise_d}.")

  @property
  def shift(self) -> float:
    """2 log(noise_d / image_d) (nats); negative (more noise) when image_d > noise_d."""
    return 2.0 * math.log(self.noise_d / self.image_d)

  def logsnr(self, t: jax.Array) -> jax.Array:
    """t: any shape in [0, 1] -> lambda(t), same shape, float32."""
    return _clipped_cosine_logsnr(t, self.logsnr_min, self.logsnr_max) + self.shift

  def neg_dlogsnr_dt(self, t: jax.Array) -> jax.Array:
    """The shift is constant in t, so this is the clipped cosine's derivative."""
    return _clipped_cosine_neg_dlogsnr_dt(t, self.logsnr_min, self.logsnr_max)


@dataclasses.dataclass(frozen=True)
class InterpolatedCosineSchedule:
  """Shift interpolated in t between two base resolutions (SiD, arXiv 2301.11093: "interpolate 32->256").

  lambda(t) = t * [lambda_cos(t) + 2 log(noise_d_low / image_d)]
            + (1 - t) * [lambda_cos(t) + 2 log(noise_d_high / image_d)]
            = lambda_cos(t) + 2 log(noise_d_high / image_d) - 2 t log(noise_d_high / noise_d_low).

  The high-noise end (t -> 1) uses the stronger shift (base noise_d_low). Defaults are SiD's 32->256
  with the +-15 clip.

  Attributes:
    image_d: image side in pixels (d).
    noise_d_low: base resolution of the shift at t = 1.
    noise_d_high: base resolution of the shift at t = 0.
    logsnr_min, logsnr_max: clip of the base cosine (nats).
  """
  image_d: float = 512.0
  noise_d_low: float = 32.0
  noise_d_high: float = 256.0
  logsnr_min: float = -15.0
  logsnr_max: float = 15.0

  def __post_init__(self):
    _cosine_bounds(self.logsnr_min, self.logsnr_max)
    if min(self.image_d, self.noise_d_low, self.noise_d_high) <= 0:
      raise ConfigError("interpolated schedule needs positive image_d, noise_d_low, noise_d_high, "
                        f"got {self.image_d}, {self.noise_d_low}, {self.noise_d_high}.")

  def logsnr(self, t: jax.Array) -> jax.Array:
    """t: any shape in [0, 1] -> lambda(t), same shape, float32."""
    t = jnp.asarray(t, jnp.float32)
    shift_low = 2.0 * math.log(self.noise_d_low / self.image_d)
    shift_high = 2.0 * math.log(self.noise_d_high / self.image_d)
    base = _clipped_cosine_logsnr(t, self.logsnr_min, self.logsnr_max)
    return base + t * shift_low + (1.0 - t) * shift_high

  def neg_dlogsnr_dt(self, t: jax.Array) -> jax.Array:
    """-d lambda/dt = 4a / sin(2(a t + b)) + 2 log(noise_d_high / noise_d_low)."""
    const = 2.0 * math.log(self.noise_d_high / self.noise_d_low)
    return _clipped_cosine_neg_dlogsnr_dt(t, self.logsnr_min, self.logsnr_max) + const


@dataclasses.dataclass(frozen=True)
class SiD2Schedule(InterpolatedCosineSchedule):
  """SiD2 "cosine-interpolated" schedule (SiD2, arXiv 2410.19324, App. B).

  lambda(t) = (1 - t) [lambda_cos(t) + 2 log(512 / d)] + t [lambda_cos(t) + 2 log(32 / d)], with the
  base cosine clipped to [-10, 10]; -d lambda/dt gains the constant 2 log(512/32) = 5.545.
  """
  image_d: float = 512.0
  noise_d_low: float = 32.0
  noise_d_high: float = 512.0
  logsnr_min: float = -10.0
  logsnr_max: float = 10.0


_SCHEDULES = {
    "cosine": CosineSchedule,
    "shifted_cosine": ShiftedCosineSchedule,
    "interpolated_cosine": InterpolatedCosineSchedule,
    "sid2": SiD2Schedule,
}


def get_logsnr_schedule(name: str, **kwargs: Any) -> LogSNRSchedule:
  """Builds a logSNR schedule by name.

  Args:
    name: one of "cosine", "shifted_cosine", "interpolated_cosine", "sid2".
    **kwargs: the dataclass fields of that schedule (e.g. image_d=256, logsnr_min=-15).

  Raises:
    ConfigError: unknown name or keyword.
  """
  if name not in _SCHEDULES:
    raise ConfigError(f"Unknown logSNR schedule {name!r}; choose one of {sorted(_SCHEDULES)}.")
  cls = _SCHEDULES[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ConfigError(f"Unknown option(s) {unknown} for logSNR schedule {name!r}; "
                      f"valid options: {sorted(fields)}.")
  return cls(**{k: float(v) for k, v in kwargs.items()})


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> jax.Array:
  """EDM sampling noise levels (Karras et al. 2022, eq. 5), with sigma_N = 0 appended.

  sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N.

  Args:
    num_steps: N >= 1 (static). With N = 1 the grid is [sigma_max, 0].
    sigma_min, sigma_max: noise std range in data units.
    rho: time-discretization exponent.

  Returns:
    [N + 1] float32, decreasing from sigma_max to sigma_min, then 0.
  """
  if num_steps < 1:
    raise ConfigError(f"num_steps must be >= 1, got {num_steps}.")
  i = jnp.arange(num_steps, dtype=jnp.float32)
  frac = i / max(num_steps - 1, 1)
  inv_rho = 1.0 / rho
  sigmas = (sigma_max**inv_rho + frac * (sigma_min**inv_rho - sigma_max**inv_rho))**rho
  return jnp.concatenate([sigmas.astype(jnp.float32), jnp.zeros((1,), jnp.float32)])


def sample_lognormal_sigma(key: jax.Array, shape: tuple[int, ...], p_mean: float,
                           p_std: float) -> jax.Array:
  """EDM training noise levels: ln sigma ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1).

  Returns:
    sigma of `shape`, float32, > 0 (data units).
  """
  return jnp.exp(p_mean + p_std * jax.random.normal(key, shape, jnp.float32))
